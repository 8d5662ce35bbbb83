"""A JPEG decoded by libjpeg-turbo through simplejpeg: Pillow's pixels, bit for bit, in less CPU.

Pillow and simplejpeg both hand the file to libjpeg-turbo with its default, accurate settings
(the integer IDCT, fancy chroma upsampling), so they give the same pixels; what differs is the
work around the library. The runner's decode into an array here, one thread, the server's
malloc settings (`pillow_pixels.decode_into_array`; scripts/decode_bench.py): the seed's 640x480
photo 0.47-0.49 ms against 0.51-0.75 through Pillow, a 1200x900 photo 4.45-4.49 against
4.92-5.44, a 12-MP one 71-74 against 78-81; batches of 32 seed photos on two threads 3,336
against 2,825 images/s. That is CPU the API workers spend per request on their exact path, and
the runner per forwarded JPEG on a GPU, where the CPU is what limits the server. It lets go of
the GIL while it decodes, twice per image (the header, then the decode; Pillow once per 64 kB
of the file it reads), so beside a thread that never lets go of the GIL it gains nothing
(BENCHMARKS.md, "JPEGs decoded through simplejpeg").

It is used only where it gives exactly what Pillow gives:
- `AGREES`: at import, small JPEGs of each chroma subsampling libjpeg-turbo names (4:4:4,
  4:2:2, 4:2:0, 4:4:0, 4:1:1), a progressive one, one with restart markers, one stored in RGB
  and a greyscale one are decoded both ways; where any pixel differs (another libjpeg-turbo build
  beside another Pillow), simplejpeg is not used and the log says so once. Pillow 13's
  libjpeg-turbo is 3.2.0, simplejpeg 1.9's 3.1.2: they agree on every JPEG the tests hold.
- A JPEG about which libjpeg warns (corrupt or truncated data) is declined (`strict`), and so is
  one whose frame libjpeg reads at another size than Pillow's header gave: the caller then
  decodes it with Pillow, which gives its own pixels or its own error. A broken JPEG gets what
  it got before.

Optional at run time, like numba and pybase64: without it Pillow decodes, to the same pixels.
"""

from __future__ import annotations

import io
import logging

import numpy as np
from PIL import Image

try:
    import simplejpeg
except ImportError:  # an accelerator, not a requirement
    simplejpeg = None

logger = logging.getLogger(__name__)


def decode_into(data: bytes, out: np.ndarray) -> bool:
    """Decodes the JPEG `data` into `out` (C-contiguous uint8, as Pillow stores the pixels:
    (H, W, 4) for RGB, the fourth byte padding; (H, W) for greyscale) and returns True; or
    returns False with `out` (perhaps written in part) to be written by Pillow: simplejpeg
    missing or disagreeing here, the image not of `out`'s size, or an error or warning from
    libjpeg. The caller asks only of JPEGs Pillow opens in the mode `out`'s shape is for:
    simplejpeg would as readily turn a colour JPEG grey."""
    if not AGREES:
        return False
    return _decoded(data, out)


def cpu_decoder_name() -> str:
    """How the start-up log lines name what decodes JPEGs on the CPU."""
    return "simplejpeg (Pillow's pixels)" if AGREES else "pillow"


def _decoded(data: bytes, out: np.ndarray) -> bool:
    colorspace = "GRAY" if out.ndim == 2 else "RGBX"
    try:
        pixels = simplejpeg.decode_jpeg(
            data, colorspace=colorspace, fastdct=False, fastupsample=False, strict=True, buffer=out
        )
    except ValueError:  # how simplejpeg reports every refusal and every libjpeg warning,
        return False  # and a buffer smaller than the image
    # An image smaller than the buffer fills only its first bytes; Pillow then writes them all.
    # Not asked beforehand (`decode_jpeg_header`): that would let go of the GIL and wait for it
    # a third time per image, each wait up to a switch interval beside a busy thread.
    return pixels.shape[:2] == out.shape[:2]  # greyscale comes back as (H, W, 1)


def _probes() -> list[tuple[str, bytes]]:
    """(name, bytes) of small JPEGs of every layout the agreement is checked on; their sizes
    are not whole blocks, so edge blocks and upsampling at the borders are checked too."""
    y, x = np.mgrid[0:29, 0:37]
    rng = np.random.default_rng(0)
    pixels = np.stack([x * 7, y * 9, (x * y) % 256], -1) + rng.integers(0, 40, (29, 37, 3))
    pixels = np.ascontiguousarray(np.clip(pixels, 0, 255).astype(np.uint8))
    image = Image.fromarray(pixels, "RGB")
    probes = []
    for name, options in {
        "4:4:4": {"subsampling": "4:4:4"},
        "4:2:2": {"subsampling": "4:2:2"},
        "4:2:0": {"subsampling": "4:2:0"},
        "progressive": {"progressive": True},
        "restart markers": {"restart_marker_blocks": 1},
        "stored as RGB": {"subsampling": "4:4:4", "keep_rgb": True},
    }.items():
        buffer = io.BytesIO()
        image.save(buffer, "JPEG", quality=90, **options)
        probes.append((name, buffer.getvalue()))
    for subsampling in ("440", "411"):  # Pillow writes neither; 4:2:2 turned losslessly is 4:4:0
        blob = simplejpeg.encode_jpeg(
            pixels, quality=90, colorspace="RGB", colorsubsampling=subsampling
        )
        probes.append((subsampling, blob))
    buffer = io.BytesIO()
    image.convert("L").save(buffer, "JPEG", quality=90)
    probes.append(("greyscale", buffer.getvalue()))
    return probes


def _agrees_with_pillow() -> bool:
    """Whether simplejpeg is here and decodes every probe to Pillow's pixels."""
    if simplejpeg is None:
        return False
    for name, blob in _probes():
        with Image.open(io.BytesIO(blob)) as opened:
            expected = np.asarray(opened)  # (H, W, 3), or (H, W) for the greyscale probe
        colour = expected.ndim == 3
        decoded = np.empty((*expected.shape[:2], 4) if colour else expected.shape, np.uint8)
        decoded_colours = decoded[..., :3] if colour else decoded
        if not _decoded(blob, decoded) or not np.array_equal(decoded_colours, expected):
            logger.warning(
                "simplejpeg %s decodes a %s JPEG to other pixels than Pillow here: JPEGs are "
                "decoded by Pillow alone",
                simplejpeg.__version__,
                name,
            )
            return False
    return True


AGREES = _agrees_with_pillow()
