"""Both resamplers (torch, compiled) against Pillow itself: every pixel equal, on the hardest
inputs, at every pass order, direction and aspect ratio."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from clip_runner.model.device_resample import resize_and_crop
from clip_runner.model.resample import (
    BYTE_SHIFTS,
    COMPILED,
    DEVICE_MAX_DOWNSCALE,
    ROW_BLOCK,
    byte_planes,
    fixed_point_weights,
    resize_and_crop_array,
    resized_size,
)
from tests.hard_images import hard_images, noise, stripes
from tests.helpers import REPO_ROOT


def pillow_resize_and_crop(image: Image.Image, edge: int, crop_h: int, crop_w: int) -> np.ndarray:
    """What CLIPImageProcessor does: Pillow's bicubic resize of the whole image, center crop."""
    new_w, new_h = resized_size(*image.size, edge)
    resized = np.asarray(image.resize((new_w, new_h), Image.Resampling.BICUBIC))
    out_w, out_h = min(crop_w, new_w), min(crop_h, new_h)
    left, top = (new_w - out_w) // 2, (new_h - out_h) // 2
    canvas = np.zeros((crop_h, crop_w, 3), dtype=np.uint8)
    pad_top, pad_left = (crop_h - out_h) // 2, (crop_w - out_w) // 2
    canvas[pad_top : pad_top + out_h, pad_left : pad_left + out_w] = resized[
        top : top + out_h, left : left + out_w
    ]
    return canvas


def torch_resize_and_crop(image: Image.Image, edge: int, crop_h: int, crop_w: int) -> np.ndarray:
    pixels = torch.from_numpy(np.array(image)).permute(2, 0, 1).contiguous()
    return resize_and_crop(pixels, edge, crop_h, crop_w).permute(1, 2, 0).numpy()


def compiled_resize_and_crop(image: Image.Image, edge: int, crop_h: int, crop_w: int) -> np.ndarray:
    return resize_and_crop_array(np.asarray(image), edge, crop_h, crop_w)  # a read-only array


RESAMPLERS = [torch_resize_and_crop, compiled_resize_and_crop]


@pytest.mark.parametrize(
    "image", [image for _, image in hard_images(scale=0.25)], ids=[n for n, _ in hard_images(0.25)]
)
@pytest.mark.parametrize("resample", RESAMPLERS)
def test_equals_pillow_on_the_hard_set(image: Image.Image, resample):
    np.testing.assert_array_equal(
        resample(image, 224, 224, 224), pillow_resize_and_crop(image, 224, 224, 224)
    )


@pytest.mark.parametrize(
    "size",
    [
        (640, 480),  # the seed's photos
        (480, 640),
        (300, 600),  # exactly twice as tall: Pillow still resizes horizontally first
        (300, 601),  # just over: Pillow resizes vertically first
        (300, 5000),
        (5000, 300),
        (224, 224),  # no resize at all
        (225, 224),
        (100, 70),  # upscaling
        (90, 400),  # upscaling a tall image: horizontal first
    ],
)
@pytest.mark.parametrize("resample", RESAMPLERS)
def test_equals_pillow_at_every_pass_order_and_direction(size: tuple[int, int], resample):
    image = noise(*size, seed=size[0] * 7 + size[1])
    np.testing.assert_array_equal(
        resample(image, 224, 224, 224), pillow_resize_and_crop(image, 224, 224, 224)
    )


@pytest.mark.parametrize("resample", RESAMPLERS)
def test_crop_larger_than_the_resized_image_is_zero_padded_like_the_cpu_path(resample):
    image = stripes(300, 200, period=3)
    np.testing.assert_array_equal(
        resample(image, 100, 120, 160), pillow_resize_and_crop(image, 100, 120, 160)
    )


def test_numba_is_there_to_compile_the_cpu_resampler():
    assert COMPILED  # requirements.txt has numba; without it images/loading.py falls back to Pillow


def with_padding_byte(pixels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """(H, W, 3) -> (H, W, 4) RGBX, the fourth byte random: the resize must not read it."""
    padding = rng.integers(0, 256, (*pixels.shape[:2], 1), dtype=np.uint8)
    return np.concatenate([pixels, padding], axis=2)


@pytest.mark.parametrize("layout", ["RGB", "RGBX"])
def test_compiled_equals_pillow_over_random_sizes_and_geometries(layout: str):
    """Sizes from 1 px to 1500 px each way (so both pass orders, up- and downscaling, aspect
    ratios up to 1500:1, and row counts on and off the horizontal pass's block) at three model
    geometries, one of them padded; pixels as three bytes or as Pillow stores them (RGBX)."""
    rng = np.random.default_rng(11)
    sizes = [(1, 1), (2000, 5), (5, 2000), (300, ROW_BLOCK), (300, ROW_BLOCK + 1)]
    sizes += [tuple(rng.integers(1, 1500, 2)) for _ in range(40)]
    for width, height in sizes:
        pixels = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
        given = with_padding_byte(pixels, rng) if layout == "RGBX" else pixels
        image = Image.fromarray(pixels)
        for geometry in ((224, 224, 224), (336, 336, 336), (100, 120, 160)):
            np.testing.assert_array_equal(
                resize_and_crop_array(given, *geometry),
                pillow_resize_and_crop(image, *geometry),
                err_msg=f"{width}x{height} at {geometry}",
            )


def test_compiled_takes_views_and_leaves_its_input_alone():
    pixels = np.asarray(noise(700, 500, seed=5))
    frame = np.zeros((520, 740, 3), dtype=np.uint8)
    frame[10:510, 20:720] = pixels
    before = frame.copy()
    view = frame[10:510, 20:720]  # not contiguous
    np.testing.assert_array_equal(
        resize_and_crop_array(view, 224, 224, 224), resize_and_crop_array(pixels, 224, 224, 224)
    )
    np.testing.assert_array_equal(frame, before)


def test_weights_are_pillows_fixed_point_and_sum_to_one():
    weights = fixed_point_weights(640, 298, 0, 298)
    assert np.array_equal(weights, np.round(weights))  # integers
    sums = weights.sum(axis=1) / 2**22
    np.testing.assert_allclose(sums, 1.0, atol=2e-6)  # each row rounds to ~1.0 in fixed point


@pytest.mark.parametrize("out_size", [1, 77, 224, 336, 448])
def test_byte_planes_recombine_to_the_weights_and_stay_float32_exact(out_size):
    """Up to DEVICE_MAX_DOWNSCALE every plane's row of byte x 255 sums below 2^24 (else
    byte_planes raises), and the planes give back the fixed-point weights exactly."""
    weights = fixed_point_weights(out_size * DEVICE_MAX_DOWNSCALE, out_size, 0, out_size)
    planes = byte_planes(weights).astype(np.int64)
    shifts = np.array([1 << shift for shift in BYTE_SHIFTS]).reshape(3, 1, 1)
    np.testing.assert_array_equal((planes * shifts).sum(axis=0), weights.astype(np.int64))


def test_a_downscale_float32_cannot_sum_exactly_is_refused():
    weights = fixed_point_weights(224 * 4 * DEVICE_MAX_DOWNSCALE, 224, 0, 224)
    with pytest.raises(ValueError, match="decode such an image on the CPU"):
        byte_planes(weights)


@pytest.mark.parametrize("geometry", [(224, 224, 224), (100, 120, 160)])
@pytest.mark.parametrize("size", [(640, 480), (300, 900), (90, 60)])
def test_a_batch_of_same_size_images_equals_each_resized_alone(size, geometry):
    images = torch.stack(
        [torch.from_numpy(np.array(noise(*size, seed=s))).permute(2, 0, 1) for s in range(3)]
    )
    together = resize_and_crop(images, *geometry)
    alone = torch.stack([resize_and_crop(image, *geometry) for image in images])
    assert together.shape == (3, 3, geometry[1], geometry[2])
    torch.testing.assert_close(together, alone, rtol=0, atol=0)


def test_a_numba_that_cannot_compile_the_resize_leaves_pillow_resizing():
    """Compiled at import in every API worker: a numba that fails there (another version than
    the pinned one, nowhere to write its cache) must cost speed, not the service. A fresh
    interpreter whose numba refuses to compile still prepares an image, to Pillow's pixels."""
    script = """
import io, logging, numba, numpy as np
from PIL import Image
def refuse(*args, **kwargs):
    raise numba.core.errors.TypingError("no typing for these loops")
numba.njit = refuse
logging.basicConfig()
from clip_runner.images import loading
from clip_runner.model import resample
image = Image.fromarray(np.random.default_rng(3).integers(0, 256, (300, 400, 3), np.uint8))
blob = io.BytesIO(); image.save(blob, "PNG")
geometry = loading.ImageGeometry(224, 224, 224)
ours = loading.prepare_image(blob.getvalue(), 0, geometry, 10**9)
print(resample.COMPILED, loading.COMPILED, ours.tobytes().hex())
"""
    done = subprocess.run(
        [sys.executable, "-c", script], cwd=REPO_ROOT, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    compiled_in_resample, compiled_in_loading, pixels = done.stdout.split()
    assert compiled_in_resample == compiled_in_loading == "False"
    image = Image.fromarray(np.random.default_rng(3).integers(0, 256, (300, 400, 3), np.uint8))
    assert bytes.fromhex(pixels) == pillow_resize_and_crop(image, 224, 224, 224).tobytes()
    assert "numba could not compile the resize (no typing for these loops)" in done.stderr
