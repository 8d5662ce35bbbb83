"""A JPEG's marker segments, walked without decoding: where its first scan starts, whether the
file ends after it, and how many scans it has.

The walk goes marker to marker by their lengths up to the first scan, past any thumbnail in
the EXIF data. Inside a scan's coded data a 0xFF byte is always followed by 0x00 or a restart
marker, so after the first scan's start an FF D9 can only be the image's end and an FF DA only
the start of another scan (or a byte in a table segment between scans: rare, and it only ever
adds to the count).
"""

from __future__ import annotations

START_OF_SCAN, END_OF_IMAGE = 0xDA, b"\xff\xd9"
SCAN_MARKER = b"\xff\xda"
# Markers without a length field (TEM, RST0-7): nothing follows them but the next marker.
STANDALONE_MARKERS = frozenset((0x01, *range(0xD0, 0xD8)))
TOO_MANY_MARKERS = -2


def first_scan_at(data: bytes, max_steps: int | None = None) -> int:
    """The offset of the first start-of-scan marker; -1 where the walk finds none, and
    TOO_MANY_MARKERS where it passes `max_steps` markers and fill bytes before it."""
    position = 2  # after the start-of-image marker
    steps = 0
    while position + 4 <= len(data) and data[position] == 0xFF:
        steps += 1
        if max_steps is not None and steps > max_steps:
            return TOO_MANY_MARKERS
        marker = data[position + 1]
        if marker == 0xFF:  # fill byte
            position += 1
        elif marker in STANDALONE_MARKERS:
            position += 2
        elif marker == START_OF_SCAN:
            return position
        else:
            position += 2 + int.from_bytes(data[position + 2 : position + 4], "big")
    return -1


def ends_after_its_scan(data: bytes) -> bool:
    """Whether an end-of-image marker follows the JPEG's first scan: the file is complete.

    Pillow refuses a truncated JPEG (even one missing only its last two bytes), so the API path
    answers a 422; what nvJPEG does with one is unmeasured (it may decode what is there). Data
    after that end (some phones append their own) is allowed, as Pillow allows it."""
    scan = first_scan_at(data)
    # From the end: a complete file ends with the marker, so this reads two bytes.
    return scan >= 0 and data.rfind(END_OF_IMAGE, scan + 2) != -1


def scan_count(data: bytes) -> int:
    """The scans of the file's first image: from its first scan to its end. Not those of an
    EXIF thumbnail before it or of what phones append after it (a motion photo's video, an
    MPO's preview), whose bytes had been counted as scans of their own."""
    scan = first_scan_at(data)
    if scan < 0:
        return 0
    end = data.find(END_OF_IMAGE, scan + 2)
    return data.count(SCAN_MARKER, scan, end if end >= 0 else len(data))


def too_many_markers(data: bytes, limit: int) -> bool:
    """Whether a JPEG holds more than `limit` markers and fill bytes before its first scan.

    Pillow reads them one by one in Python, and keeps every APPn segment: 4 MB of empty comment
    or APP5 markers, or of fill bytes, took 0.8-1.2 s to open and up to +128 MiB, and eight such
    images in one request starved an API worker's event loop (its `/ping`) for 18 s. Real files
    have a few dozen (an ICC profile split into APP2 segments, XMP, a thumbnail)."""
    return first_scan_at(data, limit) == TOO_MANY_MARKERS
