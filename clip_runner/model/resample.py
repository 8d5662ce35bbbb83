"""Pillow's bicubic resize + center crop, reproduced bit for bit: the shared fixed-point
arithmetic, and the API workers' version in compiled loops (the runner's, in torch, is in
device_resample.py: this module stays free of torch, which the API workers never load).

`CLIPImageProcessor` resizes with Pillow. Pillow computes its filter weights in double precision,
rounds them to 22-bit fixed point, and resamples in two passes (horizontal, then vertical), each
rounding to uint8. Both versions here do that same integer arithmetic, but compute only the
output rows and columns inside the crop (Pillow resizes the whole image, then crops: a quarter
of a 4:3 photo's work is thrown away, and a 10000x1 strip allocates a 224 x 2.2 M image first).

- `resize_and_crop` (device_resample.py; torch, any device): the runner's resize of JPEGs
  decoded on its device (device_decode.py), for one image or a batch of same-size images. Each
  pass is one float32 matrix product: float32 holds integers below 2^24 exactly, whatever the
  order of summation, but a 22-bit weight times an 8-bit pixel needs 30 bits. So each weight is
  split into its three bytes (the top one signed), the product runs on the three byte planes at
  once, and the three sums are recombined in float64 (exact below 2^53). A row of byte x pixel
  products stays below 2^24 up to a downscale of `DEVICE_MAX_DOWNSCALE` (checked when the
  weights are made); larger images are decoded by the API workers (images/loading.py).
  float32, not float64, because most GPUs SageMaker users pick (A10G, L4, T4) run float64 at
  1/32-1/64 of float32.
- `resize_and_crop_array` (numpy in, numba-compiled loops): the API workers' CPU path
  (images/loading.py). Pillow's loops are scalar; these run each pass as sums of whole rows that
  the compiler vectorises, about 4.5 x faster than Pillow on the seed's 640x480 photos. numba is an
  accelerator, not a requirement: without it (`COMPILED` is False) images/loading.py resizes with
  Pillow itself, to the same pixels.
"""

from __future__ import annotations

import functools
import logging
import math
from dataclasses import dataclass

import numpy as np

try:
    import numba
except ImportError:  # see the module docstring: images/loading.py then resizes with Pillow
    numba = None

# Pillow's fixed point for 8-bit images: 32 bits - 8 for the value - 2 for overshoot.
PRECISION_BITS = 22
_ONE = float(1 << PRECISION_BITS)
BICUBIC_SUPPORT = 2.0
WEIGHT_CACHE_SIZE = 64


def bicubic_filter(x: np.ndarray) -> np.ndarray:
    """Keys' cubic with a = -0.5, evaluated in the same operation order as Pillow's C."""
    a = -0.5
    x = np.abs(x)
    near = ((a + 2.0) * x - (a + 3.0)) * x * x + 1
    far = (((x - 5) * x + 8) * x - 4) * a
    return np.where(x < 1.0, near, np.where(x < 2.0, far, 0.0))


def fixed_point_weights(in_size: int, out_size: int, start: int, count: int) -> np.ndarray:
    """Rows `start .. start+count` of the (out_size, in_size) resampling matrix Pillow uses to
    resize `in_size` pixels to `out_size`, as its 22-bit fixed-point integers (float32-exact)."""
    scale = in_size / out_size
    filterscale = max(scale, 1.0)
    support = BICUBIC_SUPPORT * filterscale
    inverse = 1.0 / filterscale
    weights = np.zeros((count, in_size), dtype=np.float32)
    for row, xx in enumerate(range(start, start + count)):
        center = (xx + 0.5) * scale
        first = max(math.trunc(center - support + 0.5), 0)
        last = min(math.trunc(center + support + 0.5), in_size)
        taps = bicubic_filter((np.arange(first, last, dtype=np.float64) - center + 0.5) * inverse)
        total = np.cumsum(taps)[-1] if len(taps) else 0.0  # left to right, as Pillow sums
        if total != 0.0:
            taps = taps / total
        scaled = taps * _ONE
        weights[row, first:last] = np.trunc(np.where(taps < 0, scaled - 0.5, scaled + 0.5))
    return weights


# The byte planes of a weight, high (signed) to low: weight = high * 2^16 + middle * 2^8 + low.
BYTE_SHIFTS = (16, 8, 0)
_FLOAT32_EXACT = 1 << 24
# Largest shortest-side downscale the device resize takes (a 10,752-px side for 224): about
# 4 x 48 + 2 taps per output pixel, each plane's row sum below 255 * 255 * 194 < 2^24.
DEVICE_MAX_DOWNSCALE = 48


def byte_planes(weights: np.ndarray) -> np.ndarray:
    """(count, in) fixed-point weights -> (3, count, in) float32 byte planes (`BYTE_SHIFTS`).

    Raises ValueError where a plane's row could sum past 2^24 with 8-bit pixels (a downscale
    beyond `DEVICE_MAX_DOWNSCALE`): float32 would then round."""
    integers = weights.astype(np.int64)
    high, middle, low = integers >> 16, (integers >> 8) & 255, integers & 255  # >>: floor
    planes = np.stack([high, middle, low])
    largest_sum = int(np.abs(planes).sum(axis=2).max(initial=0)) * 255
    if largest_sum >= _FLOAT32_EXACT:
        raise ValueError(
            f"resizing {weights.shape[1]} pixels to this size needs more taps than float32 sums "
            "exactly: decode such an image on the CPU"
        )
    return planes.astype(np.float32)


def resized_size(width: int, height: int, shortest_edge: int) -> tuple[int, int]:
    """The shortest side becomes `shortest_edge`, the other keeps the aspect ratio (truncated),
    as transformers computes it."""
    if width <= height:
        return shortest_edge, int(shortest_edge * height / width)
    return int(shortest_edge * width / height), shortest_edge


def vertical_first(width: int, height: int, new_height: int) -> bool:
    """Pillow's pass order: horizontal first, except when shrinking an image more than twice as
    tall as it is wide (found by comparing both orders with Pillow 13 over 200+ sizes; the
    tests hold it to Pillow on tall, wide and square images)."""
    return new_height < height and height > 2 * width


@dataclass(frozen=True)
class CropPlan:
    """Where the crop lies in the resized image, and where the kept part lands in the output
    (centred, zero padding around it when the crop is larger than the resized image)."""

    new_width: int
    new_height: int
    left: int  # the kept part of the resized image: (left, top, out_width, out_height)
    top: int
    out_width: int
    out_height: int
    pad_left: int  # where the kept part lands in the (crop_height, crop_width) output
    pad_top: int

    @property
    def padded(self) -> bool:
        return self.pad_left > 0 or self.pad_top > 0


def crop_plan(
    width: int, height: int, shortest_edge: int, crop_height: int, crop_width: int
) -> CropPlan:
    new_width, new_height = resized_size(width, height, shortest_edge)
    out_width, out_height = min(crop_width, new_width), min(crop_height, new_height)
    return CropPlan(
        new_width,
        new_height,
        (new_width - out_width) // 2,
        (new_height - out_height) // 2,
        out_width,
        out_height,
        (crop_width - out_width) // 2,
        (crop_height - out_height) // 2,
    )


# ---------------------------------------------------------------- the compiled CPU version

COMPILED = numba is not None
# Rows the horizontal pass turns on their side at a time: span x ROW_BLOCK x 3 bytes (94 kB for
# a 640x480 photo). Timed against 16, 32, 48 and 96 on photos from 224x224 to 4000x3000: 64 was
# fastest or within 10% everywhere (BENCHMARKS.md).
ROW_BLOCK = 64
# The compiled passes take RGBX pixels (R, G, B, padding), Pillow's own layout for RGB.
PIXEL_BYTES = 4


@dataclass(frozen=True)
class _Band:
    """One axis's weights in band form: output i reads source [first[i], first[i] + taps)."""

    first: np.ndarray  # (count,) int64, relative to `start`
    weights: np.ndarray  # (count, taps) int32, Pillow's fixed-point weights
    start: int  # the source span any output reads: [start, stop)
    stop: int


@functools.lru_cache(maxsize=WEIGHT_CACHE_SIZE)
def _band(in_size: int, out_size: int, start: int, count: int) -> _Band:
    """Pillow's weights for outputs `start .. start+count`, each row cut to one common width
    (windows are moved inside the image where needed; the extra taps are zero)."""
    dense = fixed_point_weights(in_size, out_size, start, count)
    nonzero = dense != 0
    first = np.where(nonzero.any(axis=1), nonzero.argmax(axis=1), 0)
    last = in_size - np.where(nonzero.any(axis=1), nonzero[:, ::-1].argmax(axis=1), in_size)
    taps = max(int((last - first).max(initial=0)), 1)
    first = np.minimum(first, in_size - taps)
    weights = np.take_along_axis(dense, first[:, None] + np.arange(taps), axis=1)
    span_start = int(first.min())
    return _Band(
        (first - span_start).astype(np.int64),
        weights.astype(np.int32),
        span_start,
        int(first.max()) + taps,
    )


def _vertical_pass(source: np.ndarray, first: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """(rows, n) uint8 -> (len(first), n) uint8: each output row a weighted sum of source rows,
    rounded as Pillow's `clip8`."""
    rows_out, taps, width = first.shape[0], weights.shape[1], source.shape[1]
    out = np.empty((rows_out, width), np.uint8)
    sums = np.empty(width, np.int32)
    for row in range(rows_out):
        sums[:] = 1 << (PRECISION_BITS - 1)
        for tap in range(taps):
            weight = weights[row, tap]
            line = source[first[row] + tap]
            for index in range(width):
                sums[index] += np.int32(line[index]) * weight
        for index in range(width):
            out[row, index] = min(max(sums[index] >> PRECISION_BITS, 0), 255)
    return out


def _horizontal_pass(source: np.ndarray, first: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """(rows, span * 4) uint8 RGBX -> (rows, len(first) * 3) RGB: each output column a
    weighted sum of source columns (the fourth byte of each pixel is skipped).

    Summing along a row would run over strided pixels, which does not vectorise. So a block of
    `ROW_BLOCK` rows is turned on its side first (column-major, still uint8: the block stays in
    cache), each output column is then a sum of whole block rows like the vertical pass, its
    rounded bytes land in a column-major block too, and that block is turned back into rows.
    Writing each rounded value straight to its output row instead cost more than the sums.
    The pixel size is a constant, not a parameter: with a variable stride the compiled
    transposition took twice as long."""
    rows, span, columns_out = source.shape[0], source.shape[1] // PIXEL_BYTES, first.shape[0]
    taps = weights.shape[1]
    out = np.empty((rows, columns_out * 3), np.uint8)
    block = np.empty((span, ROW_BLOCK * 3), np.uint8)
    sums = np.empty(ROW_BLOCK * 3, np.int32)
    done = np.empty((columns_out, ROW_BLOCK * 3), np.uint8)
    for block_start in range(0, rows, ROW_BLOCK):
        height = min(ROW_BLOCK, rows - block_start)
        width = height * 3
        for row in range(height):
            line = source[block_start + row]
            for column in range(span):
                for channel in range(3):
                    block[column, row * 3 + channel] = line[column * PIXEL_BYTES + channel]
        for column in range(columns_out):
            sums[:width] = 1 << (PRECISION_BITS - 1)
            for tap in range(taps):
                weight = weights[column, tap]
                values = block[first[column] + tap]
                for index in range(width):
                    sums[index] += np.int32(values[index]) * weight
            rounded = done[column]
            for index in range(width):
                rounded[index] = min(max(sums[index] >> PRECISION_BITS, 0), 255)
        for row in range(height):
            line = out[block_start + row]
            for column in range(columns_out):
                for channel in range(3):
                    line[column * 3 + channel] = done[column, row * 3 + channel]
    return out


if COMPILED:  # compiled once, cached on disk; nogil: the API workers' image threads run at once
    _SIGNATURE = numba.types.Array(numba.uint8, 2, "C")(
        numba.types.Array(numba.uint8, 2, "A", readonly=True),  # np.asarray(image) is read-only
        numba.types.Array(numba.int64, 1, "C"),
        numba.types.Array(numba.int32, 2, "C"),
    )
    try:
        _vertical_pass = numba.njit(_SIGNATURE, nogil=True, cache=True)(_vertical_pass)
        _horizontal_pass = numba.njit(_SIGNATURE, nogil=True, cache=True)(_horizontal_pass)
    except (numba.core.errors.NumbaError, RuntimeError) as exc:
        # Compiled at import, in every API worker: a numba other than the pinned one (a GPU
        # image's own) that cannot type these loops, or nowhere writable for its cache (a
        # RuntimeError), must cost speed, not the service. Pillow then resizes, same pixels.
        logging.getLogger(__name__).warning(
            "numba could not compile the resize (%s): images are resized with Pillow", exc
        )
        COMPILED = False


def resize_and_crop_array(
    pixels: np.ndarray, shortest_edge: int, crop_height: int, crop_width: int
) -> np.ndarray:
    """uint8 (H, W, 4) RGBX or (H, W, 3) RGB -> uint8 (crop_height, crop_width, 3), equal to
    Pillow's bicubic resize of the shortest side followed by a center crop (zero padding where
    the crop is larger), for images of any aspect ratio. Needs numba (`COMPILED`).

    RGBX (the fourth byte ignored) is the compiled passes' layout: it is how Pillow keeps RGB
    pixels, so images/loading.py copies them out as they are, cheaper than repacking them into
    three bytes. RGB input is padded to it first (a copy)."""
    if pixels.shape[2] == 3:
        pixels = np.concatenate([pixels, np.zeros_like(pixels[..., :1])], axis=2)
    height, width, _ = pixels.shape
    plan = crop_plan(width, height, shortest_edge, crop_height, crop_width)
    columns = _band(width, plan.new_width, plan.left, plan.out_width)
    rows = _band(height, plan.new_height, plan.top, plan.out_height)
    flat = np.ascontiguousarray(pixels).reshape(height, width * PIXEL_BYTES)
    # Only the source rows and columns that the crop reads.
    region = flat[rows.start : rows.stop, PIXEL_BYTES * columns.start : PIXEL_BYTES * columns.stop]
    if vertical_first(width, height, plan.new_height):
        vertical = _vertical_pass(region, rows.first, rows.weights)
        cropped = _horizontal_pass(vertical, columns.first, columns.weights)
    else:
        horizontal = _horizontal_pass(region, columns.first, columns.weights)
        cropped = _vertical_pass(horizontal, rows.first, rows.weights)
    cropped = cropped.reshape(plan.out_height, plan.out_width, 3)
    if not plan.padded:
        return cropped
    canvas = np.zeros((crop_height, crop_width, 3), dtype=np.uint8)
    canvas[
        plan.pad_top : plan.pad_top + plan.out_height,
        plan.pad_left : plan.pad_left + plan.out_width,
    ] = cropped
    return canvas
