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
