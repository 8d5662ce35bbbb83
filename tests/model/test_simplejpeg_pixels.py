"""simplejpeg's decode: used only where it gives Pillow's pixels, colour or greyscale, declining
everything else."""

from __future__ import annotations

import io
import logging

import numpy as np
import pytest
import simplejpeg
from PIL import Image

from clip_runner.model import simplejpeg_pixels
from clip_runner.model.pillow_pixels import pixel_array
from clip_runner.model.simplejpeg_pixels import decode_into
from tests.hard_images import hard_images
from tests.helpers import as_rgb, encode, photo_like, pillows_own


def decoded(blob: bytes) -> np.ndarray | None:
    """(H, W, 3) as simplejpeg_pixels decodes `blob` into the array Pillow's mode for it takes,
    or None where it declines."""
    with Image.open(io.BytesIO(blob)) as opened:
        out = pixel_array(opened)
    return as_rgb(out) if decode_into(blob, out) else None


def test_simplejpeg_agrees_with_this_pillow():
    """The pinned versions: if this fails, the service decodes with Pillow alone (slower)."""
    assert simplejpeg_pixels.AGREES
    assert simplejpeg_pixels.cpu_decoder_name().startswith("simplejpeg")


def test_the_probes_hold_every_subsampling_and_layout_they_name():
    probes = dict(simplejpeg_pixels._probes())
    subsamplings = {simplejpeg.decode_jpeg_header(blob)[3] for blob in probes.values()}
    assert subsamplings == {"444", "422", "420", "440", "411", "Gray"}
    with Image.open(io.BytesIO(probes["progressive"])) as opened:
        assert opened.info.get("progressive")
    assert b"\xff\xdd" in probes["restart markers"]  # its restart interval's marker
    with Image.open(io.BytesIO(probes["stored as RGB"])) as opened:
        assert [component[0] for component in opened.layer] == [82, 71, 66]  # R, G, B


def hard_jpegs() -> list[tuple[str, bytes]]:
    """The fidelity set's images, shrunk, in the layouts Pillow cannot write (simplejpeg's own
    encoder: 4:4:0 is what a lossless rotation makes of a 4:2:2 photo), the common ones, and in
    greyscale."""
    jpegs = []
    for name, image in hard_images(scale=0.2):
        pixels = np.ascontiguousarray(np.asarray(image.convert("RGB")))
        for subsampling in ("444", "422", "420", "440", "411"):
            blob = simplejpeg.encode_jpeg(
                pixels, quality=90, colorspace="RGB", colorsubsampling=subsampling
            )
            jpegs.append((f"{name} {subsampling}", blob))
        grey = np.ascontiguousarray(np.asarray(image.convert("L"))[..., None])
        jpegs.append((f"{name} greyscale", simplejpeg.encode_jpeg(grey, 90, colorspace="GRAY")))
    return jpegs


HARD_JPEGS = hard_jpegs()


@pytest.mark.parametrize(("name", "blob"), HARD_JPEGS, ids=[name for name, _ in HARD_JPEGS])
def test_every_subsampling_decodes_to_pillows_pixels(name, blob):
    ours = decoded(blob)
    assert ours is not None, name
    np.testing.assert_array_equal(ours, pillows_own(blob), err_msg=name)


@pytest.mark.parametrize("mode", ["RGB", "L"])
def test_what_libjpeg_warns_about_is_left_to_pillow(mode):
    """Cut short or overwritten, colour or greyscale: decoded only where Pillow decodes it too,
    to the same pixels; every file libjpeg warns about (Pillow decodes many of those) is
    declined."""
    original = encode(photo_like(160, 120, seed=4).convert(mode), "JPEG", quality=90)
    rng = np.random.default_rng(11)
    declined = accepted = 0
    for number in range(300):
        changed = bytearray(original)
        for _ in range(int(rng.integers(1, 6))):
            changed[int(rng.integers(200, len(changed)))] = int(rng.integers(256))
        if number % 2:
            changed = changed[: int(rng.integers(200, len(changed)))]
        blob = bytes(changed)
        try:
            theirs = pillows_own(blob)
        except (OSError, ValueError, SyntaxError, EOFError):
            theirs = None
        out = np.empty((120, 160, 4) if mode == "RGB" else (120, 160), np.uint8)
        if decode_into(blob, out):
            assert theirs is not None, f"mutation {number}: decoded where Pillow refuses"
            np.testing.assert_array_equal(as_rgb(out), theirs)
            accepted += 1
        else:
            declined += 1
    assert accepted > 20 and declined > 100  # both kinds, many of each


def test_an_image_of_another_size_than_the_array_is_declined():
    """simplejpeg, given a larger buffer, fills only its first rows; a smaller one it refuses.
    Pillow then decodes (it read the size the array has from its own header)."""
    blob = encode(photo_like(40, 30, seed=1), "JPEG")
    for shape in [(31, 40, 4), (30, 41, 4), (29, 40, 4), (30, 39, 4)]:
        assert not decode_into(blob, np.zeros(shape, np.uint8)), shape
    assert decode_into(blob, np.zeros((30, 40, 4), np.uint8))
    grey = encode(photo_like(40, 30, seed=1).convert("L"), "JPEG")
    for shape in [(31, 40), (30, 41), (29, 40), (30, 39)]:
        assert not decode_into(grey, np.zeros(shape, np.uint8)), shape
    assert decode_into(grey, np.zeros((30, 40), np.uint8))


@pytest.mark.parametrize("disagreeing", ["RGBX", "GRAY"])
def test_a_simplejpeg_that_disagrees_is_not_used(disagreeing, monkeypatch, caplog):
    """One pixel off in colour, or in greyscale only: either is noticed."""
    real = simplejpeg.decode_jpeg

    def off_by_one(data, **options):
        pixels = real(data, **options)
        if options["colorspace"] == disagreeing:
            pixels[0, 0, 0] ^= 1
        return pixels

    monkeypatch.setattr(simplejpeg, "decode_jpeg", off_by_one)
    with caplog.at_level(logging.WARNING, logger=simplejpeg_pixels.__name__):
        assert not simplejpeg_pixels._agrees_with_pillow()
    assert "to other pixels than Pillow" in caplog.text
    assert ("greyscale JPEG" in caplog.text) == (disagreeing == "GRAY")


def test_without_simplejpeg_nothing_is_decoded_and_pillow_is_named(monkeypatch, caplog):
    monkeypatch.setattr(simplejpeg_pixels, "simplejpeg", None)
    with caplog.at_level(logging.WARNING, logger=simplejpeg_pixels.__name__):
        assert not simplejpeg_pixels._agrees_with_pillow()
    assert not caplog.text  # an optional accelerator: its absence is not worth a warning
    monkeypatch.setattr(simplejpeg_pixels, "AGREES", False)
    out = np.full((30, 40, 4), 7, np.uint8)
    assert not decode_into(encode(photo_like(40, 30, seed=1), "JPEG"), out)
    assert (out == 7).all()
    assert simplejpeg_pixels.cpu_decoder_name() == "pillow"
