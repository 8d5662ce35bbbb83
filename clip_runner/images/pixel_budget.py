"""A per-request pixel budget, charged from image headers before any pixel is decoded.

The per-image limit (`CLIP_MAX_IMAGE_PIXELS`) does not bound a request: a 6000x6000 PNG of one
colour is 155 kB in base64, so one 6 MB request can carry 32 of them, 1.15 billion pixels, about
30 s of one core to decode. `CLIP_MAX_REQUEST_PIXELS` bounds the sum. Each image's width and
height are read from its header (Pillow's `Image.open` decodes no pixel) as soon as its bytes
are there, before it is decoded; the image that takes the sum past the budget fails the request
with a 413 naming the budget, and the request's images not yet decoded never are. So the pixels
decoded for any request, accepted or refused, never exceed the budget.
"""

from __future__ import annotations

import io
from collections.abc import Callable
from dataclasses import dataclass

from PIL import Image

from clip_runner.errors import RequestError
from clip_runner.images.formats import ACCEPTED_FORMATS
from clip_runner.images.gif_blocks import GIF_SIGNATURES, too_many_blocks
from clip_runner.images.jpeg_markers import scan_count, too_many_markers
from clip_runner.images.png_chunks import PNG_SIGNATURE, too_many_chunks
from clip_runner.images.tiff_directory import TIFF_PREFIXES, first_directory
from clip_runner.model.pillow_pixels import JPEG_FORMATS


@dataclass(frozen=True)
class ImageHeader:
    """What an image's header tells before any pixel is decoded."""

    pixels: int  # width x height; 0 when Pillow cannot read a header
    # A baseline JPEG: one scan per component, so its decoding time is bounded by its pixels (a
    # progressive JPEG may carry thousands of scans, and other formats have their own costs).
    baseline_jpeg: bool
    # The answer of the caller's own check of the opened header (`image_header`'s `check`).
    passed_check: bool = False
    # A progressive JPEG's scans (`jpeg_markers.scan_count`); 0 for any other image.
    scans: int = 0


# Each scan of a progressive JPEG walks the whole image again, however few bytes it carries:
# one 59-byte scan repeated 5,000 times made a 436-kB, 36-Mpx JPEG that took 11 s of a core to
# decode (0.15 s without the repeats), and one such image in a request held an API worker, or
# with CLIP_DECODE=runner the runner's pass and every request batched with it, for a minute.
# Encoders write 10 or so (libjpeg's default script: 10 in colour, 6 in grey).
MAX_JPEG_SCANS = 100
# Markers (JPEG), chunks (PNG) or directory entries (TIFF) before the image data, read by Pillow
# one by one in Python: past this many the image is refused before Pillow opens it
# (`overlong_header`). Real files have a few dozen.
MAX_HEADER_SEGMENTS = 512
# A GIF's metadata comes in sub-blocks of at most 255 bytes, also read one by one: this many
# holds a megabyte of metadata in full sub-blocks (real GIFs: a handful).
MAX_GIF_BLOCKS = 4096
# Strips or tiles of a TIFF, one Python object each in Pillow: a 40-Mpx 16-bit RGBA image in
# libtiff's default strips of 8 kB has 40,000 (a photo-sized one a few hundred).
MAX_TIFF_PIECES = 65_536
# Numbers in any one TIFF entry, each unpacked by Pillow into a Python number: the largest real
# one is a 16-bit palette's ColorMap (3 x 65,536); 8-MB BitsPerSample or SampleFormat entries
# had taken 0.3-0.4 s to open.
MAX_TIFF_VALUES = 3 * 65_536


def overlong_header(data: bytes) -> str | None:
    """Why the image's header is refused before Pillow reads it, or None: more markers, chunks,
    blocks or directory entries before its image data (or TIFF strips) than real files have,
    each read by Pillow in Python. Walks at most that many (about a millisecond at worst), on
    the event loop."""
    if data.startswith(b"\xff\xd8") and too_many_markers(data, MAX_HEADER_SEGMENTS):
        problem = f"a JPEG with more than {MAX_HEADER_SEGMENTS} markers before its image data"
    elif data.startswith(PNG_SIGNATURE) and too_many_chunks(data, MAX_HEADER_SEGMENTS):
        problem = f"a PNG with more than {MAX_HEADER_SEGMENTS} chunks before its image data"
    elif data.startswith(GIF_SIGNATURES) and too_many_blocks(data, MAX_GIF_BLOCKS):
        problem = f"a GIF with more than {MAX_GIF_BLOCKS} blocks before its first image"
    elif data.startswith(TIFF_PREFIXES):
        directory = first_directory(data, MAX_HEADER_SEGMENTS)
        if directory.entries > MAX_HEADER_SEGMENTS:
            problem = f"a TIFF of more than {MAX_HEADER_SEGMENTS} entries in its first directory"
        elif directory.pieces > MAX_TIFF_PIECES:
            problem = f"a TIFF cut into more than {MAX_TIFF_PIECES} strips or tiles"
        elif directory.values > MAX_TIFF_VALUES:
            problem = f"a TIFF entry of more than {MAX_TIFF_VALUES} values"
        else:
            return None
    else:
        return None
    return problem + " (real files have far fewer)"


# A further question for an opened image's header, asked in the same read: whether the API
# workers forward a JPEG to the runner's device decoder (images/loading.py's `device_check`).
HeaderCheck = Callable[[Image.Image], bool]
# What Pillow raises for a header it cannot read (OSError includes UnidentifiedImageError).
HEADER_ERRORS = (Image.DecompressionBombError, OSError, ValueError, SyntaxError, EOFError)


def image_header(data: bytes, check: HeaderCheck | None = None) -> ImageHeader:
    """The image's pixel count and kind from its header (decoding refuses an unreadable one
    later, naming the image), and `check`'s answer on it: one read of the header for both
    (two had cost an API worker about 30 us an image, some 3% of its CPU per request where JPEGs
    go to the device). A check that raises what a header read can raise counts as not
    passed."""
    try:
        with Image.open(io.BytesIO(data), formats=ACCEPTED_FORMATS) as image:
            width, height = image.size
            progressive = image.format in JPEG_FORMATS and image.info.get("progressive")
            baseline_jpeg = image.format in JPEG_FORMATS and not progressive
            scans = scan_count(data) if progressive else 0
            header = ImageHeader(width * height, baseline_jpeg, scans=scans)
            if check is not None:
                try:
                    header = ImageHeader(header.pixels, baseline_jpeg, check(image), scans)
                except HEADER_ERRORS:
                    pass
    except HEADER_ERRORS:
        return ImageHeader(0, False)
    return header


class PixelBudget:
    """The pixels one request may decode; `charge` each image's header (`image_header`)
    before decoding it."""

    def __init__(self, limit: int, field: str = "images") -> None:
        self.limit = limit
        self.field = field
        self.used = 0

    def charge(self, header: ImageHeader) -> ImageHeader:
        """Count an image's pixels (its header, `image_header`), before it is decoded; a 413
        when the request's images pass the budget."""
        self.used += header.pixels
        if self.used > self.limit:
            raise RequestError(
                413,
                "too_many_pixels",
                f"{self.field}: the request's images have more than {self.limit} pixels in all "
                f"(CLIP_MAX_REQUEST_PIXELS, the budget per request; {self.used} counted so far); "
                "send fewer or smaller images per request",
            )
        return header
