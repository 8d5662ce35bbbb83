"""The formats the service decodes, and the ones it refuses before any other parser reads them."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from clip_runner.errors import RequestError
from clip_runner.images.formats import ACCEPTED_FORMATS, ACCEPTED_FORMATS_TEXT, image_signature
from clip_runner.images.loading import decode_image
from clip_runner.images.pixel_budget import image_header
from tests.helpers import encode, photo_like, pillows_own, with_preview

MAX_PIXELS = 40_000_000
PHOTO = photo_like(48, 32, seed=5)
# Opened by Pillow, and by nothing else here: EPS would run Ghostscript where it is installed.
EPS = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 48 32\n%%EndComments\nshowpage\n%%EOF\n"

ACCEPTED = {
    "JPEG": encode(PHOTO, "JPEG"),
    "MPO (a JPEG with a preview after it)": with_preview(PHOTO, PHOTO.resize((16, 12))),
    "PNG": encode(PHOTO, "PNG"),
    "WEBP": encode(PHOTO, "WEBP"),
    "AVIF": encode(PHOTO, "AVIF"),
    "GIF": encode(PHOTO, "GIF"),
    "BMP": encode(PHOTO, "BMP"),
    "TIFF": encode(PHOTO, "TIFF", compression="tiff_lzw"),
}
REFUSED = {
    "EPS": EPS,
    "PCX": encode(PHOTO, "PCX"),
    "PPM": encode(PHOTO, "PPM"),
    "ICO": encode(PHOTO, "ICO"),
    "SGI": encode(PHOTO, "SGI"),
    "QOI": encode(PHOTO, "QOI"),
    "JPEG 2000": encode(PHOTO, "JPEG2000"),
    "DDS": encode(PHOTO, "DDS"),
}


def test_the_message_names_every_accepted_format():
    for name in ACCEPTED_FORMATS:
        assert {"WEBP": "WebP"}.get(name, name) in ACCEPTED_FORMATS_TEXT


@pytest.mark.parametrize("name", sorted(ACCEPTED))
def test_accepted_formats_decode_to_pillows_own_pixels(name):
    blob = ACCEPTED[name]
    decoded = decode_image(blob, index=0, max_pixels=MAX_PIXELS)
    assert decoded.size == (48, 32)
    np.testing.assert_array_equal(np.asarray(decoded.convert("RGB")), pillows_own(blob))
    assert image_header(blob).pixels == 48 * 32


@pytest.mark.parametrize("name", sorted(REFUSED))
def test_other_formats_pillow_opens_are_refused_naming_the_accepted_ones(name):
    blob = REFUSED[name]
    with Image.open(io.BytesIO(blob)) as opened:  # Pillow itself would have taken it
        assert opened.format not in ACCEPTED_FORMATS and opened.width * opened.height > 0
    with pytest.raises(RequestError) as raised:
        decode_image(blob, index=2, max_pixels=MAX_PIXELS)
    error = raised.value
    assert (error.status, error.error_type, error.index) == (422, "invalid_image", 2)
    assert error.message == (
        f"images[2]: data is not in a recognised image format (send {ACCEPTED_FORMATS_TEXT})"
    )
    assert image_header(blob).pixels == 0  # the budget's header read does not open it either


def test_a_heic_photo_is_refused_by_name_with_what_to_send():
    """An iPhone's default photo format: told as such, not as unknown bytes."""
    heic = b"\x00\x00\x00\x18ftypheic\x00\x00\x00\x00mif1heic" + bytes(64)
    with pytest.raises(RequestError) as raised:
        decode_image(heic, index=0, max_pixels=MAX_PIXELS)
    assert raised.value.status == 422
    assert "a HEIC/HEIF image (iPhones' default)" in raised.value.message
    assert "send it as JPEG" in raised.value.message


@pytest.mark.parametrize("name", sorted(ACCEPTED))
def test_each_accepted_format_is_known_by_its_first_bytes(name):
    """As Pillow opens it (an MPO through its JPEG)."""
    blob = ACCEPTED[name]
    with Image.open(io.BytesIO(blob)) as opened:
        assert image_signature(blob[:12]) == {"MPO": "JPEG"}.get(opened.format, opened.format)


@pytest.mark.parametrize(
    "head",
    [
        b'{"images": []}',
        b" \n[1, 2]",
        b'"a string"',
        b"-12.5",
        b"null",
        b"",
        b"MM\x00\x2b",  # BigTIFF, which Pillow does not open
        b'{"aaftypavif": 1}'[:12],  # AVIF's brand where JSON may have it (after 4 bytes)
        b'{ "aftypavis": 0}'[:12],
        *(blob[:12] for blob in REFUSED.values()),
    ],
)
def test_json_and_other_formats_have_no_accepted_signature(head):
    assert image_signature(head) is None


def test_a_big_endian_tiff_is_known_too():
    """Pillow writes TIFFs little-endian; cameras and scanners write both orders."""
    assert image_signature(b"MM\x00*\x00\x00\x00\x08") == "TIFF"
