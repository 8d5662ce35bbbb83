"""The API workers' compiled resize against Pillow itself: every pixel equal, on the hardest
inputs, at every pass order, direction and aspect ratio, from three-byte or Pillow's own RGBX or
greyscale pixels, upright or read upright from their stored EXIF orientation; and numba loaded
only where it is used."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from clip_runner.images.compiled_resample import COMPILED, ROW_BLOCK, resize_and_crop_array
from tests.hard_images import PASS_ORDER_SIZES, hard_images, noise, stripes
from tests.helpers import REPO_ROOT, pillow_resize_and_crop


def compiled_resize_and_crop(image: Image.Image, edge: int, crop_h: int, crop_w: int) -> np.ndarray:
    return resize_and_crop_array(np.asarray(image), edge, crop_h, crop_w)  # a read-only array


def run_python(script: str) -> subprocess.CompletedProcess:
    """`script` in a fresh interpreter (this one has numba loaded already)."""
    done = subprocess.run(
        [sys.executable, "-c", script], cwd=REPO_ROOT, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    return done


def test_numba_is_there_to_compile_the_cpu_resampler():
    assert COMPILED  # requirements.txt has numba; without it images/loading.py falls back to Pillow


@pytest.mark.parametrize(
    "image", [image for _, image in hard_images(scale=0.25)], ids=[n for n, _ in hard_images(0.25)]
)
def test_equals_pillow_on_the_hard_set(image: Image.Image):
    np.testing.assert_array_equal(
        compiled_resize_and_crop(image, 224, 224, 224),
        pillow_resize_and_crop(image, 224, 224, 224),
    )


@pytest.mark.parametrize("size", PASS_ORDER_SIZES)
def test_equals_pillow_at_every_pass_order_and_direction(size: tuple[int, int]):
    image = noise(*size, seed=size[0] * 7 + size[1])
    np.testing.assert_array_equal(
        compiled_resize_and_crop(image, 224, 224, 224),
        pillow_resize_and_crop(image, 224, 224, 224),
    )


def test_crop_larger_than_the_resized_image_is_zero_padded_like_pillow():
    image = stripes(300, 200, period=3)
    np.testing.assert_array_equal(
        compiled_resize_and_crop(image, 100, 120, 160),
        pillow_resize_and_crop(image, 100, 120, 160),
    )


def with_padding_byte(pixels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """(H, W, 3) -> (H, W, 4) RGBX, the fourth byte random: the resize must not read it."""
    padding = rng.integers(0, 256, (*pixels.shape[:2], 1), dtype=np.uint8)
    return np.concatenate([pixels, padding], axis=2)


def in_layout(image: Image.Image, layout: str, rng: np.random.Generator) -> np.ndarray:
    """`image`'s pixels as the resize is given them: three bytes, Pillow's RGBX (a random
    padding byte), or greyscale (one byte; `image` is then grey in RGB)."""
    pixels = np.asarray(image)
    if layout == "L":
        return np.ascontiguousarray(pixels[..., 0])
    return with_padding_byte(pixels, rng) if layout == "RGBX" else pixels


def in_rgb(pixels: np.ndarray, layout: str) -> Image.Image:
    """The RGB image Pillow resizes for the reference: a greyscale one's three equal channels."""
    return Image.fromarray(pixels, "L").convert("RGB") if layout == "L" else Image.fromarray(pixels)


@pytest.mark.parametrize("layout", ["RGB", "RGBX", "L"])
def test_equals_pillow_over_random_sizes_and_geometries(layout: str):
    """Sizes from 1 px to 1500 px each way (so both pass orders, up- and downscaling, aspect
    ratios up to 1500:1, and row counts on and off the horizontal pass's block) at three model
    geometries, one of them padded; pixels as three bytes or as Pillow stores them (RGBX, or
    one byte for greyscale)."""
    rng = np.random.default_rng(11)
    sizes = [(1, 1), (2000, 5), (5, 2000), (300, ROW_BLOCK), (300, ROW_BLOCK + 1)]
    sizes += [tuple(rng.integers(1, 1500, 2)) for _ in range(40)]
    for width, height in sizes:
        shape = (height, width) if layout == "L" else (height, width, 3)
        image = in_rgb(rng.integers(0, 256, shape, dtype=np.uint8), layout)
        given = in_layout(image, layout, rng)
        for geometry in ((224, 224, 224), (336, 336, 336), (100, 120, 160)):
            np.testing.assert_array_equal(
                resize_and_crop_array(given, *geometry),
                pillow_resize_and_crop(image, *geometry),
                err_msg=f"{width}x{height} at {geometry}",
            )


# What ImageOps.exif_transpose does for each EXIF orientation: the reference.
EXIF_TRANSPOSES = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}


@pytest.mark.parametrize("layout", ["RGBX", "L"])
@pytest.mark.parametrize("orientation", range(2, 9))
def test_stored_pixels_resized_upright_equal_pillow_on_the_turned_image(
    orientation: int, layout: str
):
    """Pixels as stored with an EXIF orientation, resized upright without turning them, equal
    Pillow's resize of the image exif_transpose turns: sizes from 1 px to 1200 px each way (both
    pass orders of the upright image, up- and downscaling, odd sizes), three geometries (one of
    them padded, one not square), the hard textures; in colour and in greyscale."""
    rng = np.random.default_rng(orientation)
    sizes = [(1, 1), (2000, 5), (5, 2000), (640, 480), (480, 640), (900, 200), (200, 900)]
    sizes += [tuple(rng.integers(1, 1200, 2)) for _ in range(12)]
    images = [noise(width, height, seed=width + height) for width, height in sizes]
    images += [image for _, image in hard_images(scale=0.25)]
    for image in images:
        if layout == "L":
            image = image.convert("L").convert("RGB")
        turned = image.transpose(EXIF_TRANSPOSES[orientation])
        pixels = in_layout(image, layout, rng)
        for geometry in ((224, 224, 224), (100, 120, 160), (64, 64, 96)):
            np.testing.assert_array_equal(
                resize_and_crop_array(pixels, *geometry, orientation=orientation),
                pillow_resize_and_crop(turned, *geometry),
                err_msg=f"{image.size} at {geometry}",
            )


def test_an_orientation_outside_exifs_eight_leaves_the_image_as_stored():
    pixels = np.asarray(noise(300, 200, seed=4))
    for orientation in (0, 9, 65535):
        np.testing.assert_array_equal(
            resize_and_crop_array(pixels, 224, 224, 224, orientation=orientation),
            resize_and_crop_array(pixels, 224, 224, 224),
        )


def test_takes_views_and_leaves_its_input_alone():
    pixels = np.asarray(noise(700, 500, seed=5))
    frame = np.zeros((520, 740, 3), dtype=np.uint8)
    frame[10:510, 20:720] = pixels
    before = frame.copy()
    view = frame[10:510, 20:720]  # not contiguous
    np.testing.assert_array_equal(
        resize_and_crop_array(view, 224, 224, 224), resize_and_crop_array(pixels, 224, 224, 224)
    )
    np.testing.assert_array_equal(frame, before)


def test_numba_is_loaded_by_the_first_resize_not_by_importing_the_image_code():
    """The supervisor and the runner import images/loading.py (through the service) but never
    resize on the CPU: numba must not come with that import. The first `compiled_resizer` call
    (each API worker's, as it starts) loads it, and later calls give the same function."""
    done = run_python(
        "import sys\n"
        "from clip_runner.images import loading\n"
        "print('numba' in sys.modules)\n"
        "first = loading.compiled_resizer()\n"
        "print('numba' in sys.modules, first is loading.compiled_resizer(), first is not None)\n"
    )
    assert done.stdout.split() == ["False", "True", "True", "True"]


def test_a_numba_that_cannot_compile_the_resize_leaves_pillow_resizing():
    """Compiled at import, as every API worker starts: a numba that fails there (another
    version than the pinned one, nowhere to write its cache) must cost speed, not the service.
    A fresh interpreter whose numba refuses to compile still prepares an image, to Pillow's
    pixels."""
    done = run_python(
        """
import io, logging, numba, numpy as np
from PIL import Image
def refuse(*args, **kwargs):
    raise numba.core.errors.TypingError("no typing for these loops")
numba.njit = refuse
logging.basicConfig()
from clip_runner.images import compiled_resample, loading
image = Image.fromarray(np.random.default_rng(3).integers(0, 256, (300, 400, 3), np.uint8))
blob = io.BytesIO(); image.save(blob, "PNG")
geometry = loading.ImageGeometry(224, 224, 224)
ours = loading.prepare_image(blob.getvalue(), 0, geometry, 10**9)
print(compiled_resample.COMPILED, loading.compiled_resizer(), ours.tobytes().hex())
"""
    )
    compiled, resizer, pixels = done.stdout.split()
    assert (compiled, resizer) == ("False", "None")
    image = Image.fromarray(np.random.default_rng(3).integers(0, 256, (300, 400, 3), np.uint8))
    assert bytes.fromhex(pixels) == pillow_resize_and_crop(image, 224, 224, 224).tobytes()
    assert "numba could not compile the resize (no typing for these loops)" in done.stderr


def raising(error: str) -> str:
    return f"def failing(*args):\n    raise {error}\n"


CACHE_FAILURES = {
    # a read-only filesystem: numba finds no place for its cache
    "nowhere": "caching.CacheImpl._locator_classes = []\n",
    # a full disk under the cache folder: nothing cached yet, and writing the index fails
    "full disk": raising("OSError(28, 'No space left on device')")
    + "caching.IndexDataCacheFile._save_index = failing\n"
    + "caching.IndexDataCacheFile._load_index = lambda self: {}\n",
    # a cache file cut short: reading the index fails
    "cut short": raising("pickle.UnpicklingError('pickle data was truncated')")
    + "caching.IndexDataCacheFile._load_index = failing\n",
}


@pytest.mark.parametrize("failure", sorted(CACHE_FAILURES))
def test_a_cache_that_fails_compiles_the_resize_in_memory(failure):
    """A read-only root filesystem, a full disk, a cache file cut short: the resize had fallen
    back to Pillow (the same pixels for about 4.5 x the CPU), or, for a full disk, failed every
    API worker's start over and over; it is compiled without the cache instead."""
    done = run_python(
        f"""
import logging, pickle
import numpy as np
from numba.core import caching
{CACHE_FAILURES[failure]}logging.basicConfig()
from clip_runner.images import compiled_resample
pixels = np.random.default_rng(3).integers(0, 256, (300, 400, 3), np.uint8)
ours = compiled_resample.resize_and_crop_array(pixels, 224, 224, 224)
print(compiled_resample.COMPILED, ours.tobytes().hex())
"""
    )
    compiled, pixels = done.stdout.split()
    assert compiled == "True", done.stderr
    image = Image.fromarray(np.random.default_rng(3).integers(0, 256, (300, 400, 3), np.uint8))
    assert bytes.fromhex(pixels) == pillow_resize_and_crop(image, 224, 224, 224).tobytes()
    assert "with its on-disk cache" in done.stderr and "NUMBA_CACHE_DIR" in done.stderr
    assert "resized with Pillow" not in done.stderr
