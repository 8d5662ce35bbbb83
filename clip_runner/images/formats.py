"""The image formats the service decodes: the ones people send, and no others.

Pillow opens some forty formats by their first bytes, each through a parser of its own, and one
(EPS) by running Ghostscript on the file where it is installed: PostScript from strangers. An
image server facing the internet needs seven of them, so `Image.open` is told which
(`formats=ACCEPTED_FORMATS`); anything else is refused as not an image before any other
parser reads it.
"""

from __future__ import annotations

# Pillow's names for `Image.open`. A camera's JPEG with a preview image after it (MPO) opens
# through JPEG's, as an MPO image.
ACCEPTED_FORMATS = ("JPEG", "PNG", "WEBP", "AVIF", "GIF", "BMP", "TIFF")
# The same, as an error message names them.
ACCEPTED_FORMATS_TEXT = "JPEG, PNG, WebP, AVIF, GIF, BMP or TIFF"


# HEIC brands (ISO/IEC 23008-12) in an `ftyp` box: iPhones store photos as HEIC by default, so
# such an upload is common; it had been refused as merely "not in a recognised image format".
# Not the generic `mif1`, which some AVIF files carry as their major brand.
HEIF_BRANDS = (b"heic", b"heix", b"heim", b"heis", b"hevc", b"hevx", b"hevm", b"hevs")


def refused_format_hint(data: bytes) -> str | None:
    """What to tell a caller whose bytes are a known image format not decoded here, or None."""
    if data[4:8] == b"ftyp" and data[8:12] in HEIF_BRANDS:
        return "a HEIC/HEIF image (iPhones' default), which is not decoded here: send it as JPEG"
    return None


def image_signature(head: bytes) -> str | None:
    """The accepted format whose signature `head` (a body's first bytes) starts with, as
    ACCEPTED_FORMATS names it; None for any other bytes. No JSON text starts with one (JSON
    starts with whitespace, `{`, `[`, `"`, a digit, `-`, `t`, `f` or `n`), so a body that
    does is an image sent as JSON. AVIF's brand sits after its box's size, whose first bytes
    are zero (the box is small): `{"aaftypavif": 1}` is JSON, not an AVIF."""
    if head.startswith(b"\xff\xd8\xff"):
        return "JPEG"
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return "PNG"
    if head.startswith((b"GIF87a", b"GIF89a")):
        return "GIF"
    if head.startswith(b"RIFF") and head[8:12] == b"WEBP":
        return "WEBP"
    if head.startswith(b"\x00\x00") and head[4:12] in (b"ftypavif", b"ftypavis"):
        return "AVIF"
    if head.startswith((b"II*\x00", b"MM\x00*")):
        return "TIFF"
    if head.startswith(b"BM"):
        return "BMP"
    return None
