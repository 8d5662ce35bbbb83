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

from PIL import Image

from clip_runner.errors import RequestError


def image_pixels(data: bytes) -> int:
    """Width x height from the image's header; 0 when Pillow cannot read a header (decoding then
    refuses the image with a 422 naming it)."""
    try:
        with Image.open(io.BytesIO(data)) as image:
            width, height = image.size
    except (Image.DecompressionBombError, OSError, ValueError, SyntaxError, EOFError):
        return 0  # OSError includes UnidentifiedImageError; the others are malformed headers
    return width * height


class PixelBudget:
    """The pixels one request may decode; `charge` each image's bytes before decoding it."""

    def __init__(self, limit: int, field: str = "images") -> None:
        self.limit = limit
        self.field = field
        self.used = 0

    def charge(self, data: bytes) -> int:
        """Count the image's pixels and return them; a 413 when the request's images pass the
        budget."""
        pixels = image_pixels(data)
        self.used += pixels
        if self.used > self.limit:
            raise RequestError(
                413,
                "too_many_pixels",
                f"{self.field}: the request's images have more than {self.limit} pixels in all "
                f"(CLIP_MAX_REQUEST_PIXELS, the budget per request; {self.used} counted so far); "
                "send fewer or smaller images per request",
            )
        return pixels
