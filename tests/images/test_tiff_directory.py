"""A TIFF's first directory read without Pillow: its entries and strips, as Pillow counts them."""

from __future__ import annotations

import io
import struct

import pytest
from PIL import Image

from clip_runner.images.tiff_directory import (
    STRIP_OFFSETS,
    TIFF_PREFIXES,
    TILE_OFFSETS,
    first_directory,
)
from tests.helpers import encode, photo_like


def strip_tiff(
    rows: int,
    order: str = "<",
    big: bool = False,
    pieces_tag: int = STRIP_OFFSETS,
    extra: tuple[tuple[int, int, int, int], ...] = (),
) -> bytes:
    """A valid 1 x `rows` grey TIFF of one-row strips (all the same byte), in either byte order,
    classic or BigTIFF: Pillow builds one tile per strip. Every value is a whole word (LONG, or
    LONG8 in a BigTIFF), so it fills its entry's value field in either byte order. `extra`:
    more entries (tag, type, count, value), placed before the image's own of the same tag."""
    word, count_format, kind = ("Q", "Q", 16) if big else ("I", "H", 4)
    entry = order + ("HHQ" if big else "HHI") + word
    fields = [(256, 1), (257, rows), (258, 8), (259, 1), (262, 1), (277, 1), (278, 1)]
    header = (b"II" if order == "<" else b"MM") + struct.pack(order + "H", 43 if big else 42)
    header += struct.pack(order + "HH", 8, 0) if big else b""
    word_size = struct.calcsize(order + word)
    directory_at = len(header) + word_size
    pixel_at = directory_at + struct.calcsize(order + count_format)
    pixel_at += (9 + len(extra)) * struct.calcsize(entry) + word_size
    offsets_at = pixel_at + 1
    arrays = [(pieces_tag, offsets_at), (pieces_tag + 6, offsets_at + rows * word_size)]
    entries = [(tag, kind, 1, value) for tag, value in fields]
    entries += [(tag, kind, rows, at) for tag, at in arrays]
    entries = sorted([*extra, *entries], key=lambda field: field[0])  # stable: extra first
    directory = struct.pack(order + count_format, len(entries))
    directory += b"".join(struct.pack(entry, *field) for field in entries)
    directory += struct.pack(order + word, 0)  # no next directory
    offsets = struct.pack(f"{order}{rows}{word}", *[pixel_at] * rows)
    counts = struct.pack(f"{order}{rows}{word}", *[1] * rows)
    return header + struct.pack(order + word, directory_at) + directory + b"\x80" + offsets + counts


# Pillow 13 reads a big-endian BigTIFF as a classic one (it looks for 43 in the third byte), and
# so does `first_directory`; that one is not built here.
@pytest.mark.parametrize(
    ("order", "big"), [("<", False), (">", False), ("<", True)], ids=["II", "MM", "II-BigTIFF"]
)
def test_the_strip_count_is_the_tile_count_pillow_builds(order, big):
    data = strip_tiff(300, order, big)
    assert data.startswith(TIFF_PREFIXES)
    with Image.open(io.BytesIO(data)) as opened:
        assert len(opened.tile) == 300 and opened.getpixel((0, 299)) == 0x80
    assert first_directory(data, 512) == first_directory(data, 9)
    assert first_directory(data, 512).entries == 9 and first_directory(data, 512).pieces == 300


def test_an_entry_pillow_skips_does_not_hide_the_strips_after_it():
    """Pillow skips a StripOffsets of no values and takes the next: the first one alone had let a
    12-byte decoy carry a million strips past the check."""
    decoy = strip_tiff(300, extra=((STRIP_OFFSETS, 4, 0, 0),))
    with Image.open(io.BytesIO(decoy)) as opened:
        assert len(opened.tile) == 300  # the real one counts for Pillow
    assert first_directory(decoy, 512).pieces == 300


def test_the_largest_entry_of_numbers_is_told_and_bytes_are_not_numbers():
    many = strip_tiff(5, extra=((258, 3, 200_000, 8), (700, 7, 900_000, 8)))
    assert first_directory(many, 512).values == 200_000  # SHORTs; the UNDEFINED bytes aside


def test_tiles_count_like_strips():
    assert first_directory(strip_tiff(70, pieces_tag=TILE_OFFSETS), 512).pieces == 70


def test_a_directory_of_more_entries_than_allowed_is_not_walked():
    """Pillow reads each entry in Python; so would this walk."""
    directory = first_directory(strip_tiff(5), 8)
    assert directory.entries == 9 and directory.pieces == 0


def test_a_real_tiff_and_cut_files():
    saved = encode(photo_like(64, 48, seed=3), "TIFF")
    assert first_directory(saved, 512).pieces >= 1
    assert first_directory(saved[:6], 512).entries == 0  # cut before its directory
    assert first_directory(b"II*\x00\xff\xff\xff\x7f", 512).entries == 0  # pointing past the end
