"""A GIF's blocks before its first image: a bounded count, without decoding."""

from __future__ import annotations

import io

from PIL import Image

from clip_runner.images.gif_blocks import SCREEN_END, too_many_blocks
from tests.helpers import encode, photo_like


def with_comment(gif: bytes, sub_blocks: int, size: int = 1, stray: int = 0) -> bytes:
    """`gif` with a comment of `sub_blocks` sub-blocks of `size` bytes (and `stray` stray bytes
    before it), inserted after its global palette."""
    flags = gif[10]
    at = SCREEN_END + (3 << ((flags & 7) + 1) if flags & 0x80 else 0)
    comment = b"\x21\xfe" + (bytes([size]) + b"x" * size) * sub_blocks + b"\x00"
    return gif[:at] + b"\x01" * stray + comment + gif[at:]


def test_a_gif_of_thousands_of_sub_blocks_before_its_image_is_told_in_a_bounded_walk():
    """Pillow reads each in Python: 10 MB of one-byte comment sub-blocks took 1.8 s to open."""
    gif = encode(photo_like(40, 30, seed=1), "GIF")
    padded = with_comment(gif, 5000)
    with Image.open(io.BytesIO(padded)) as opened:
        assert len(opened.info["comment"]) == 5000  # Pillow reads them all
    assert too_many_blocks(padded, 4096) and not too_many_blocks(padded, 6000)
    assert too_many_blocks(with_comment(gif, 1, stray=5000), 4096)  # skipped one by one too
    assert not too_many_blocks(gif, 4)
    assert not too_many_blocks(with_comment(gif, 4000, size=255), 4096)  # 1 MB of metadata


def test_an_animation_counts_only_what_comes_before_its_first_frame():
    frames = [Image.new("P", (30, 20), colour) for colour in range(50)]
    saved = io.BytesIO()
    frames[0].save(saved, "GIF", save_all=True, append_images=frames[1:], loop=0)
    assert not too_many_blocks(saved.getvalue(), 8)
    assert not too_many_blocks(b"GIF89a", 8)  # cut short: Pillow decides
