"""A JPEG decoded by Pillow straight into a numpy array: no copy of its pixels afterwards.

Pillow decodes into memory of its own, and reading the pixels out (`tobytes`, `np.asarray`)
copies every one of them once more, holding the GIL, in 64-kB pieces joined at the end. The
runner's decode of the seed's 640x480 photo took 1.06 ms with that copy against 0.73 without,
of a 12-MP photo 162 against 79 ms (`scripts/decode_bench.py`, one thread, the server's malloc
settings). Both the API workers (their exact CPU path) and the runner (forwarded JPEGs on a
GPU) paid it.

Pillow can decode into memory it did not allocate: an image may be backed by a buffer
(`Image.core.map_buffer`, what `Image.frombuffer` and `ImageFile.load`'s memory-mapping of raw
files use), and `load` decodes into whatever memory the image already has. So the array is made
first, mapped as the image's memory, and libjpeg's rows land in it. The pixels are Pillow's own
decode, bit for bit; only where they are stored changes. That memory layout (RGB as four bytes
per pixel, the fourth padding; greyscale as one) and `map_buffer`'s arguments are Pillow's
internals: `DIRECT` says whether they are as this module expects, checked once on a small JPEG
of each against Pillow's own copy; where they are not, callers copy as before.

Where simplejpeg is installed and agrees with this Pillow (simplejpeg_pixels.py), it writes the
array instead: the same libjpeg-turbo pixels for less CPU. Pillow still opens every image (its
header: format, mode, size, EXIF) and decodes whatever simplejpeg declines.
"""

from __future__ import annotations

import io
import logging

import numpy as np
from PIL import Image

from clip_runner.model import simplejpeg_pixels

logger = logging.getLogger(__name__)


# Pillow opens a JPEG that carries further images in a Multi-Picture (MPF) segment as "MPO":
# many cameras store a large preview that way after the photo. Its first image is a plain JPEG
# at the start of the file, decoded by the same code.
JPEG_FORMATS = ("JPEG", "MPO")


EXIF_ORIENTATION = 0x0112


def exif_orientation(opened: Image.Image) -> int:
    """The image's EXIF orientation tag (1, upright, where it has none), as
    `ImageOps.exif_transpose` reads it: both the API workers' resize and the runner's device
    path turn the decoded pixels by it (resample.py's `UPRIGHT`)."""
    return opened.getexif().get(EXIF_ORIENTATION, 1)


# Pillow's mode -> the shape of one pixel as Pillow stores it (`decode_into_array`'s arrays).
PIXEL_SHAPES: dict[str, tuple[int, ...]] = {"RGB": (4,), "L": ()}


def pixel_shape(image: Image.Image) -> tuple[int, ...]:
    """The shape of an RGB or greyscale image's pixels as Pillow stores them (what
    `decode_into_array` writes, and images/loading.py's `stored_pixels` copies out): (H, W, 4)
    for RGB, (H, W) for greyscale."""
    width, height = image.size
    return (height, width, *PIXEL_SHAPES[image.mode])


def pixel_array(opened: Image.Image) -> np.ndarray:
    """An uninitialised uint8 array to decode `opened` into (`pixel_shape`)."""
    return np.empty(pixel_shape(opened), np.uint8)


def decodes_into_array(opened: Image.Image) -> bool:
    """Whether `decode_into_array` applies: a JPEG (or an MPO's first image) in RGB or
    greyscale whose pixels are not decoded yet, in one tile covering the whole image and
    starting at the file's first byte (what Pillow's JPEG plugin makes of every JPEG it reads,
    and simplejpeg decodes)."""
    tiles = opened.tile
    return (
        DIRECT
        and opened.format in JPEG_FORMATS
        and opened.mode in PIXEL_SHAPES
        and len(tiles) == 1
        and tuple(tiles[0][1]) == (0, 0, *opened.size)  # its extents
        and tiles[0][2] == 0  # its offset: not another image of an MPO
    )


def decode_into_array(
    opened: Image.Image, data: bytes, out: np.ndarray | None = None
) -> np.ndarray:
    """The image's pixels as Pillow stores them: uint8 (H, W, 4) for RGB (the fourth byte
    padding), (H, W) for greyscale (`pixel_array`), decoded into `out` (a C-contiguous array of
    that shape: the runner passes pinned memory on a GPU, device_decode.py) or a new array.
    `data` is the bytes `opened` was opened from, which simplejpeg decodes where it can. Raises
    what `load` raises on a broken JPEG. Only for images `decodes_into_array` accepts."""
    if not opened.tile:  # decoded already (a check that loaded it): the array would stay empty
        raise ValueError("the image's pixels are already decoded")
    pixels = pixel_array(opened) if out is None else out
    shape = pixel_shape(opened)
    if pixels.shape != shape or pixels.dtype != np.uint8:
        raise ValueError(f"out is {pixels.dtype} {pixels.shape}, not uint8 {shape}")
    if not pixels.flags.c_contiguous:
        raise ValueError("out is not C-contiguous: Pillow writes its rows back to back")
    if simplejpeg_pixels.decode_into(data, pixels):
        return pixels
    return _pillow_into_array(opened, pixels)


def _pillow_into_array(opened: Image.Image, pixels: np.ndarray) -> np.ndarray:
    """Pillow's decode of `opened` into `pixels` (checked by the caller)."""
    # The mapped image keeps a reference to the array (and the buffer exported) while it lives.
    opened.im = Image.core.map_buffer(pixels, opened.size, "raw", 0, (opened.mode, 0, 1))
    opened.load()
    return pixels


def _direct_decoding_works() -> bool:
    """Whether this Pillow decodes a colour and a greyscale JPEG into arrays to the pixels its
    own copy gives."""
    gradient = np.add.outer(np.arange(24), np.arange(40)).astype(np.uint8)
    colour = Image.fromarray(np.stack([gradient, gradient[::-1], 255 - gradient], -1), "RGB")
    for source in (colour, colour.convert("L")):
        blob = io.BytesIO()
        source.save(blob, "JPEG")
        try:
            with Image.open(io.BytesIO(blob.getvalue())) as copied:
                expected = np.asarray(copied)
            with Image.open(io.BytesIO(blob.getvalue())) as opened:
                decoded = _pillow_into_array(opened, pixel_array(opened))
        except (AttributeError, TypeError, ValueError, OSError) as exc:
            logger.warning("Pillow cannot decode into an array here (%s): pixels are copied", exc)
            return False
        if not np.array_equal(decoded[..., :3] if decoded.ndim == 3 else decoded, expected):
            logger.warning("Pillow decodes into an array to other pixels here: pixels are copied")
            return False
    return True


DIRECT = _direct_decoding_works()
