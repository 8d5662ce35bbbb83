"""Property-based attacks: hypothesis on the decoders and schemathesis on the live API.

Both are bounded (example counts, deadlines) and talk only to 127.0.0.1.
"""

from __future__ import annotations

import dataclasses

import httpx
import numpy as np
import pytest
import schemathesis
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from clip_runner.errors import RequestError
from clip_runner.images.loading import (
    ImageGeometry,
    decode_image,
    decode_inline,
    device_decodable_jpeg,
    resize_and_crop,
)
from clip_runner.model.device_decode import DeviceJpegDecoder
from tests.helpers import (
    JPEG_END_MARKER,
    encode,
    oriented_exif,
    photo_like,
    with_preview,
    ycck_jpeg,
)

GEOMETRY = ImageGeometry(224, 224, 224)
MAX_PIXELS = 4_000_000  # the decoders' pixel limit here: a header claiming more is a 422 too
SEED_PNG = encode(photo_like(24, 16, seed=1))
SEED_JPEG = encode(photo_like(24, 16, seed=1), "JPEG")
# JPEGs the API workers forward to the runner (CLIP_DECODE=runner): baseline 4:2:0 and 4:4:4
# colour, and greyscale.
PHONE_PHOTO = photo_like(40, 30, seed=5)
FORWARDED_JPEGS = [
    encode(photo_like(40, 30, seed=2), "JPEG", quality=90),
    encode(photo_like(33, 64, seed=3), "JPEG", quality=50, subsampling=0),
    encode(photo_like(40, 30, seed=4).convert("L"), "JPEG"),
    # Also forwarded to a runner that decodes with Pillow: a phone's photo stored turned, a
    # progressive JPEG, one stored in RGB, a camera's MPO, CMYK JPEGs (Adobe's and YCCK).
    encode(PHONE_PHOTO, "JPEG", exif=oriented_exif(PHONE_PHOTO, 6)),
    encode(photo_like(40, 30, seed=6), "JPEG", quality=80, progressive=True),
    encode(photo_like(40, 30, seed=7), "JPEG", keep_rgb=True),
    with_preview(photo_like(40, 30, seed=8), photo_like(16, 12, seed=9)),
    encode(photo_like(40, 30, seed=10).convert("CMYK"), "JPEG", quality=85),
    ycck_jpeg(photo_like(40, 30, seed=11)),
]
SMALL_GEOMETRY = ImageGeometry(32, 32, 32)
# The runner's decoder as it runs without a GPU: Pillow's decode, the device resize on the CPU.
RUNNER_DECODER = DeviceJpegDecoder(torch.device("cpu"), *dataclasses.astuple(SMALL_GEOMETRY))


def decode_or_refuse(data: bytes) -> None:
    """The decoder's contract: an RGB image, or a 422 naming the image; nothing else escapes."""
    try:
        image = decode_image(data, index=3, max_pixels=MAX_PIXELS)
    except RequestError as error:
        assert error.status == 422 and error.index == 3 and error.message.startswith("images[3]")
        return
    assert image.mode == "RGB"
    pixels = resize_and_crop(image, GEOMETRY)
    assert pixels.shape == (224, 224, 3) and pixels.dtype == np.uint8


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=2048))
def test_arbitrary_bytes_decode_or_are_refused(data):
    decode_or_refuse(data)


def mutated(original: bytes, data: st.DataObject) -> bytearray:
    """Up to eight bytes of `original` overwritten at random places."""
    changed = bytearray(original)
    for _ in range(data.draw(st.integers(1, 8))):
        position = data.draw(st.integers(0, len(changed) - 1))
        changed[position] = data.draw(st.integers(0, 255))
    return changed


@settings(max_examples=300, deadline=None)
@given(st.sampled_from([SEED_PNG, SEED_JPEG]), st.data())
def test_mutated_real_images_decode_or_are_refused(original, data):
    changed = mutated(original, data)
    cut = data.draw(st.integers(0, len(changed)))
    decode_or_refuse(bytes(changed[:cut]))


def api_crop_or_none(data: bytes) -> np.ndarray | None:
    """What the API workers' own decode makes of `data`: its crop, or None for a 422."""
    try:
        return resize_and_crop(decode_image(data, index=0, max_pixels=MAX_PIXELS), SMALL_GEOMETRY)
    except RequestError:
        return None


@pytest.mark.filterwarnings("ignore::UserWarning:PIL.TiffImagePlugin")  # a damaged EXIF
@pytest.mark.filterwarnings("ignore:Image appears to be a malformed MPO")  # a damaged MPO
@settings(max_examples=300, deadline=None)
@given(st.sampled_from(FORWARDED_JPEGS), st.data())
def test_a_forwarded_broken_jpeg_gets_what_the_api_path_gives(original, data):
    """A JPEG the API workers forward untouched (its header and end marker check out, its coded
    data may be garbage) is decoded by the runner's CPU twin to exactly the API path's crop, or
    refused by both: without nvJPEG, the caller's answer does not depend on where the image was
    decoded (what the API workers send a runner decoding with Pillow, the GPU default)."""
    changed = mutated(original, data)
    if data.draw(st.booleans()):  # cut short, with the end marker the forwarding check wants
        changed = changed[: data.draw(st.integers(2, len(changed)))] + JPEG_END_MARKER
    blob = bytes(changed)
    assume(device_decodable_jpeg(blob, MAX_PIXELS, SMALL_GEOMETRY.shortest_edge, True))
    crops, decoded = RUNNER_DECODER([blob])
    expected = api_crop_or_none(blob)
    assert decoded == [expected is not None]
    if expected is not None:
        np.testing.assert_array_equal(crops[0].permute(1, 2, 0).numpy(), expected)


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=300))
def test_arbitrary_strings_as_inline_sources(text):
    try:
        data = decode_inline(text, index=0, max_bytes=10_000)
    except RequestError as error:
        assert error.status == 422 and error.index == 0
        return
    assert isinstance(data, bytes) and data


DOCUMENTED_ANSWERS = [
    schemathesis.checks.status_code_conformance,
    schemathesis.checks.content_type_conformance,
    schemathesis.checks.response_schema_conformance,
]


def test_openapi_fuzzing_finds_no_server_errors(served):
    """schemathesis generates /invocations bodies from the service's own OpenAPI schema.

    Driven through hypothesis directly: schemathesis' pytest plugin does not load under pytest 9.
    """
    schema = schemathesis.openapi.from_url(f"{served.url}/docs.json")
    operation = schema["/invocations"]["POST"]
    statuses: list[int] = []

    @settings(
        max_examples=80,
        deadline=None,
        database=None,
        suppress_health_check=list(HealthCheck),
    )
    @given(case=operation.as_strategy())
    def call(case):
        response = case.call(base_url=served.url, timeout=30)
        statuses.append(response.status_code)
        assert response.status_code < 500, (response.status_code, response.text[:500])
        # Its status declared, its body as the schema declared (openapi_document.py). Not
        # schemathesis' positive_data_acceptance: a schema cannot say which strings decode.
        case.validate_response(response, checks=DOCUMENTED_ANSWERS)
        if response.status_code >= 400:
            error = response.json()["error"]
            assert isinstance(error["type"], str) and isinstance(error["message"], str)

    call()
    assert len(statuses) >= 20  # random strings are rarely valid images: mostly 422s
    assert httpx.get(f"{served.url}/ping", timeout=5).status_code == 200
