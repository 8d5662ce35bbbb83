"""A GIF's blocks before its first image, counted without decoding.

Pillow reads an extension's data one sub-block at a time, and skips a stray byte between blocks
one at a time, in Python: 10 MB of one-byte comment sub-blocks took 1.8 s of a core to open
(0.05 s in full 255-byte sub-blocks).
"""

from __future__ import annotations

GIF_SIGNATURES = (b"GIF87a", b"GIF89a")
EXTENSION, IMAGE, TRAILER = 0x21, 0x2C, 0x3B
HAS_GLOBAL_PALETTE = 0x80
SCREEN_END = 13  # after the signature and the logical screen descriptor


def too_many_blocks(data: bytes, limit: int) -> bool:
    """Whether Pillow would read more than `limit` sub-blocks and stray bytes before the GIF's
    first image. Walks at most that many."""
    flags = data[10] if len(data) > 10 else 0
    position = SCREEN_END + (3 << ((flags & 7) + 1) if flags & HAS_GLOBAL_PALETTE else 0)
    steps = 0
    while position < len(data) and data[position] not in (IMAGE, TRAILER):
        if data[position] == EXTENSION:
            position += 2  # the introducer and the extension's label
            while position < len(data) and data[position]:
                steps += 1
                if steps > limit:
                    return True
                position += 1 + data[position]
        position += 1  # a block's terminator, or a stray byte
        steps += 1
        if steps > limit:
            return True
    return False
