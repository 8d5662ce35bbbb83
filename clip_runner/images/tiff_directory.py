"""A TIFF's first image directory, read without Pillow: how many entries it holds and how many
strips or tiles its image is cut into.

Pillow reads every entry of the directory, and builds one tile per strip, in Python: a 9-MB
TIFF of a million one-row strips took 2.6 s of a core and 300 MB to open. The image's pixels do
not bound either count (a 1 x 1,000,000 image is one megapixel).
"""

from __future__ import annotations

from dataclasses import dataclass

# What Pillow accepts as a TIFF (the byte order first; 43 in the third byte is a BigTIFF).
TIFF_PREFIXES = (
    b"MM\x00\x2a",
    b"II\x2a\x00",
    b"MM\x2a\x00",
    b"II\x00\x2a",
    b"MM\x00\x2b",
    b"II\x2b\x00",
)
BIG_TIFF = 43
STRIP_OFFSETS, TILE_OFFSETS = 273, 324


# Entry types whose values Pillow unpacks one by one into Python numbers (SHORT, LONG,
# RATIONAL, their signed kinds, FLOAT, DOUBLE, LONG8...); bytes and text stay one object.
BYTE_LIKE_TYPES = frozenset((1, 2, 6, 7))


@dataclass(frozen=True)
class FirstDirectory:
    """What the first directory holds (zeros where the file ends before it, or where it holds
    more entries than were read)."""

    entries: int
    pieces: int  # strips or tiles: the largest count of any StripOffsets or TileOffsets entry
    values: int  # the most numbers any one entry holds


def first_directory(data: bytes, max_entries: int) -> FirstDirectory:
    """The entry count of the first directory and, where it holds at most `max_entries` (each
    is read here in Python, as Pillow does), its strip or tile count and its largest entry. The
    largest count of every StripOffsets or TileOffsets entry counts: Pillow skips one it cannot
    use (no values, an unknown type) and takes the next of the same tag, so the first alone
    was a decoy's to set."""
    endian = "little" if data.startswith(b"II") else "big"
    big = data[2:3] == bytes([BIG_TIFF])
    word, count_size, entry_size = (8, 8, 20) if big else (4, 2, 12)

    def number(start: int, size: int) -> int:
        return int.from_bytes(data[start : start + size], endian)

    directory = number(8 if big else 4, word)
    if directory + count_size > len(data):
        return FirstDirectory(0, 0, 0)
    entries = number(directory, count_size)
    if entries > max_entries:
        return FirstDirectory(entries, 0, 0)
    pieces = values = 0
    first = directory + count_size
    for at in range(first, first + entries * entry_size, entry_size):
        tag, kind, count = number(at, 2), number(at + 2, 2), number(at + 4, word)
        if tag in (STRIP_OFFSETS, TILE_OFFSETS):
            pieces = max(pieces, count)
        if kind not in BYTE_LIKE_TYPES:
            values = max(values, count)
    return FirstDirectory(entries, pieces, values)
