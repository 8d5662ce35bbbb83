"""A colour or greyscale JPEG decoded straight into an array: Pillow's own pixels, every one
written, the same refusals, and only where it applies; each with simplejpeg writing the array
(the service's way where it is installed) and with Pillow alone."""

from __future__ import annotations

import io
import logging

import numpy as np
import pytest
from PIL import Image

from clip_runner.model import pillow_pixels, simplejpeg_pixels
from clip_runner.model.pillow_pixels import decode_into_array, decodes_into_array
from tests.hard_images import encoded_set, hard_images, is_jpeg
from tests.helpers import as_rgb, damaged_copy, encode, photo_like, pillows_own, with_preview


def into_array(blob: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(blob)) as opened:
        assert decodes_into_array(opened)
        return decode_into_array(opened, blob)


@pytest.fixture(params=["simplejpeg", "pillow alone"])
def decoder(request, monkeypatch) -> str:
    """Each test twice: simplejpeg decoding where it can, and Pillow decoding every JPEG."""
    if request.param == "pillow alone":
        monkeypatch.setattr(simplejpeg_pixels, "AGREES", False)
    return request.param


def test_simplejpeg_writes_the_array_and_pillow_does_not_decode(decoder, monkeypatch):
    """Which of the two decodes: with simplejpeg, Pillow opens the JPEG but never maps the array
    to decode into it."""
    mapped = []
    map_buffer = Image.core.map_buffer
    monkeypatch.setattr(
        Image.core, "map_buffer", lambda *args: mapped.append(1) or map_buffer(*args)
    )
    blob = encode(photo_like(64, 48, seed=2), "JPEG")
    np.testing.assert_array_equal(into_array(blob)[..., :3], pillows_own(blob))
    assert len(mapped) == (0 if decoder == "simplejpeg" else 1)


def arrays_start_as(filler: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """The arrays decoded into start filled with `filler`, not as whatever memory held (and
    so does every `np.empty` meanwhile: harmless, its contents are undefined anyway)."""

    def filled(shape, dtype=float, order="C", **kwargs):
        return np.full(shape, filler, dtype, order)

    monkeypatch.setattr(pillow_pixels.np, "empty", filled)


def camera_jpeg(photo: Image.Image, **save_args: object) -> bytes:
    """`photo` with a smaller preview after it (an MPO)."""
    preview = photo_like(photo.width // 2 + 1, photo.height // 2, seed=9)
    return with_preview(photo, preview, **save_args)


def colour_jpegs() -> list[tuple[str, bytes]]:
    """The fidelity set's JPEGs (4:2:0, 4:2:2, 4:4:4; stripes, text, noise, odd sizes), shrunk
    for speed, and a photo of odd size: plain, with restart markers, progressive (common on the
    web; the API workers decode those themselves), with optimised Huffman tables, and with a
    camera's preview after it (an MPO)."""
    shrunk = [(name, blob) for name, blob in encoded_set(scale=0.25) if is_jpeg(blob)]
    photo = photo_like(641, 479, seed=5)
    return [
        *shrunk,
        ("photo 641x479", encode(photo, "JPEG", quality=95)),
        ("restart markers", encode(photo, "JPEG", restart_marker_rows=1)),
        ("progressive", encode(photo, "JPEG", quality=85, progressive=True)),
        ("optimised Huffman tables", encode(photo, "JPEG", optimize=True)),
        ("with a camera's preview (MPO)", camera_jpeg(photo, quality=90)),
    ]


def greyscale_jpegs() -> list[tuple[str, bytes]]:
    """Scans and black-and-white photos: the fidelity set's text and stripes and a photo of odd
    size, plain, progressive, and with a camera's preview after it."""
    shrunk = [
        (f"{name} greyscale", encode(image.convert("L"), "JPEG", quality=90))
        for name, image in hard_images(scale=0.25)
        if name.startswith(("text", "vertical stripes 2px"))
    ]
    photo = photo_like(641, 479, seed=6).convert("L")
    return [
        *shrunk,
        ("greyscale photo 641x479", encode(photo, "JPEG", quality=95)),
        ("greyscale progressive", encode(photo, "JPEG", quality=85, progressive=True)),
        ("greyscale with a preview (MPO)", camera_jpeg(photo, quality=90)),
    ]


def test_this_pillow_decodes_into_arrays():
    assert pillow_pixels.DIRECT


COLOUR_JPEGS = colour_jpegs()
JPEGS = COLOUR_JPEGS + greyscale_jpegs()


@pytest.mark.parametrize(("name", "blob"), JPEGS, ids=[name for name, _ in JPEGS])
def test_the_pixels_are_pillows_own_and_every_one_is_written(name, blob, decoder, monkeypatch):
    expected = pillows_own(blob)
    # The array starts as all 0 bytes, then as all 255: a pixel the decode left alone would
    # keep each in turn, and could not equal Pillow's pixel both times.
    for filler in (0, 255):
        arrays_start_as(filler, monkeypatch)
        decoded = into_array(blob)
        assert decoded.shape[:2] == expected.shape[:2] and decoded.dtype == np.uint8
        np.testing.assert_array_equal(as_rgb(decoded), expected, err_msg=name)


def test_greyscale_is_decoded_into_one_byte_per_pixel_and_colour_into_four():
    photo = photo_like(41, 29, seed=2)
    assert into_array(encode(photo, "JPEG")).shape == (29, 41, 4)
    assert into_array(encode(photo.convert("L"), "JPEG")).shape == (29, 41)


def outcome(decode, blob: bytes) -> tuple[str, np.ndarray | None]:
    try:
        return "decoded", as_rgb(decode(blob))
    except (OSError, ValueError, SyntaxError, EOFError) as exc:
        return f"{type(exc).__name__}: {exc}", None


@pytest.mark.parametrize("filler", [0, 255])
def test_broken_jpegs_are_refused_or_decoded_exactly_as_by_pillow(filler, decoder, monkeypatch):
    """Bytes overwritten (libjpeg may warn and go on) and files cut short, 300 of them, of a
    baseline and a progressive JPEG, an MPO and a greyscale JPEG; those that decode have every
    pixel written (as in the test above, with each `filler`). simplejpeg refuses every file
    libjpeg warns about, and Pillow then decides: the same refusals with the same messages."""
    arrays_start_as(filler, monkeypatch)
    rng = np.random.default_rng(7)
    photo = photo_like(160, 120, seed=3)
    originals = [
        encode(photo, "JPEG", quality=90),
        encode(photo, "JPEG", quality=90, progressive=True),
        camera_jpeg(photo, quality=90),
        encode(photo.convert("L"), "JPEG", quality=90),
    ]
    outcomes: list[bool] = []
    for number in range(300):
        original = originals[number % len(originals)]
        blob = damaged_copy(original, rng, most_overwrites=5, spare_head=200, end_marker=False)
        try:
            with Image.open(io.BytesIO(blob)) as opened:
                applies = decodes_into_array(opened)
        except (OSError, ValueError, SyntaxError, EOFError):  # the header itself is broken
            applies = False
        if not applies:
            continue
        ours, theirs = outcome(into_array, blob), outcome(pillows_own, blob)
        assert ours[0] == theirs[0]
        if ours[1] is not None:
            np.testing.assert_array_equal(ours[1], theirs[1])
        outcomes.append(ours[0] == "decoded")
    assert 30 < sum(outcomes) < len(outcomes) - 30  # both kinds, many of each


@pytest.mark.parametrize(
    "blob",
    [
        encode(photo_like(40, 30, seed=1), "PNG"),
        encode(photo_like(40, 30, seed=1).convert("CMYK"), "JPEG"),
    ],
    ids=["PNG", "CMYK JPEG"],
)
def test_other_images_are_left_to_pillow(blob):
    with Image.open(io.BytesIO(blob)) as opened:
        assert not decodes_into_array(opened)


def test_only_an_mpos_first_image_is_decoded_into_an_array():
    """An MPO moved on to its preview has that image's tile, further into the file: Pillow
    decodes it (simplejpeg would decode the first image of the bytes)."""
    blob = camera_jpeg(photo_like(64, 48, seed=1))
    with Image.open(io.BytesIO(blob)) as opened:
        assert opened.format == "MPO" and decodes_into_array(opened)
        opened.seek(1)
        assert opened.size == (33, 24) and not decodes_into_array(opened)


def test_an_image_already_decoded_is_not_decoded_again():
    with Image.open(io.BytesIO(encode(photo_like(40, 30, seed=1), "JPEG"))) as opened:
        opened.load()
        assert not decodes_into_array(opened)
        with pytest.raises(ValueError, match="already decoded"):  # not an array left empty
            decode_into_array(opened, b"")


def test_a_pillow_that_cannot_decode_into_arrays_is_noticed_and_callers_copy(monkeypatch, caplog):
    monkeypatch.delattr(Image.core, "map_buffer")
    with caplog.at_level(logging.WARNING, logger=pillow_pixels.__name__):
        assert not pillow_pixels._direct_decoding_works()
    assert "cannot decode into an array" in caplog.text
    monkeypatch.undo()
    # A Pillow whose mapping does not reach the array: the check sees other pixels (none).
    map_buffer = Image.core.map_buffer
    elsewhere = lambda target, *args: map_buffer(np.zeros_like(target), *args)  # noqa: E731
    monkeypatch.setattr(Image.core, "map_buffer", elsewhere)
    arrays_start_as(0, monkeypatch)
    with caplog.at_level(logging.WARNING, logger=pillow_pixels.__name__):
        assert not pillow_pixels._direct_decoding_works()
    assert "to other pixels" in caplog.text
    monkeypatch.undo()
    monkeypatch.setattr(pillow_pixels, "DIRECT", False)
    with Image.open(io.BytesIO(encode(photo_like(40, 30, seed=1), "JPEG"))) as opened:
        assert not decodes_into_array(opened)


def test_a_jpeg_decodes_into_the_array_it_is_given(decoder):
    """The runner passes memory of its own (pinned, on a GPU): the pixels land in it."""
    name, blob = COLOUR_JPEGS[-4]  # the 641x479 photo
    with Image.open(io.BytesIO(blob)) as opened:
        given = np.full((479, 641, 4), 7, np.uint8)
        assert decode_into_array(opened, blob, given) is given
    np.testing.assert_array_equal(given[..., :3], pillows_own(blob), err_msg=name)


@pytest.mark.parametrize(
    ("given", "refusal"),
    [
        (np.empty((479, 640, 4), np.uint8), "not uint8"),  # a size too small
        (np.empty((479, 641, 3), np.uint8), "not uint8"),  # RGB without the padding byte
        (np.empty((479, 641, 4), np.int16), "not uint8"),
        (np.empty((479, 641 * 2, 4), np.uint8)[:, ::2], "not C-contiguous"),
    ],
)
def test_an_array_of_another_layout_is_refused_before_anything_is_written(given, refusal):
    _, blob = COLOUR_JPEGS[-4]
    with Image.open(io.BytesIO(blob)) as opened:
        with pytest.raises(ValueError, match=refusal):
            decode_into_array(opened, blob, given)
        assert opened.tile  # still to decode: nothing was written anywhere


def test_a_greyscale_jpeg_refuses_an_rgb_array():
    blob = encode(photo_like(41, 29, seed=2).convert("L"), "JPEG")
    with Image.open(io.BytesIO(blob)) as opened:
        with pytest.raises(ValueError, match=r"not uint8 \(29, 41\)"):
            decode_into_array(opened, blob, np.empty((29, 41, 4), np.uint8))
