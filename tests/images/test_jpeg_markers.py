"""A JPEG's marker walk: its first scan, its end, and the scans of its first image only."""

from __future__ import annotations

from clip_runner.images.jpeg_markers import first_scan_at, scan_count, too_many_markers
from tests.helpers import encode, photo_like

PROGRESSIVE = encode(photo_like(64, 48, seed=5), "JPEG", progressive=True)
# An APP1 segment whose bytes read as markers (an EXIF thumbnail holds a whole JPEG).
THUMBNAIL_LIKE = b"\xff\xe1" + (2 + 20).to_bytes(2, "big") + b"\xff\xda" * 5 + b"\xff\xd9" * 5


def test_the_first_scan_is_found_past_segments_whose_bytes_read_as_markers():
    assert PROGRESSIVE[first_scan_at(PROGRESSIVE) : first_scan_at(PROGRESSIVE) + 2] == b"\xff\xda"
    with_thumbnail = PROGRESSIVE[:2] + THUMBNAIL_LIKE + PROGRESSIVE[2:]
    assert first_scan_at(with_thumbnail) == first_scan_at(PROGRESSIVE) + len(THUMBNAIL_LIKE)
    assert first_scan_at(b"\xff\xd8") == -1 and scan_count(b"not a jpeg") == 0


def test_scans_are_counted_in_the_first_image_only():
    """A motion photo's video or an MPO's preview after the image's end, and a thumbnail
    before its first scan, had been counted as scans: a 1.5-MB photo with 7 MiB appended was
    refused as a 131-scan JPEG."""
    real = scan_count(PROGRESSIVE)
    assert 6 <= real <= 12
    assert scan_count(PROGRESSIVE + b"\xff\xda" * 200 + b"\xff\xd9") == real
    assert scan_count(PROGRESSIVE[:2] + THUMBNAIL_LIKE + PROGRESSIVE[2:]) == real
    assert scan_count(encode(photo_like(64, 48, seed=5), "JPEG")) == 1  # baseline: interleaved


def test_a_jpeg_of_thousands_of_markers_before_its_scan_is_told_in_a_bounded_walk():
    """Pillow reads each in Python: 4 MB of empty markers took about a second to open."""
    empty_comments = PROGRESSIVE[:2] + b"\xff\xfe\x00\x02" * 600 + PROGRESSIVE[2:]
    fill_bytes = PROGRESSIVE[:2] + b"\xff" * 600 + PROGRESSIVE[2:]
    assert too_many_markers(empty_comments, 512) and too_many_markers(fill_bytes, 512)
    assert not too_many_markers(PROGRESSIVE, 512)
    assert not too_many_markers(PROGRESSIVE[:2] + THUMBNAIL_LIKE + PROGRESSIVE[2:], 512)
    assert not too_many_markers(empty_comments, 1000)  # the limit is what counts
