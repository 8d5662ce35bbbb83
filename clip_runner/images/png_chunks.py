"""A PNG's chunks before its image data, counted without decoding."""

from __future__ import annotations

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
IMAGE_DATA = (b"IDAT", b"fdAT")


def too_many_chunks(data: bytes, limit: int) -> bool:
    """Whether a PNG holds more than `limit` chunks before its image data.

    Pillow reads them one by one in Python: 4 MB of empty private chunks took 0.8 s to open,
    and several such images in a request starved an API worker's event loop of the GIL. Real
    files have a dozen or so (palette, transparency, colour profile, text)."""
    position, chunks = len(PNG_SIGNATURE), 0
    while position + 8 <= len(data):
        if data[position + 4 : position + 8] in IMAGE_DATA:
            return False
        chunks += 1
        if chunks > limit:
            return True
        position += 12 + int.from_bytes(data[position : position + 4], "big")
    return False
