"""Pillow's bicubic resize + center crop, reproduced bit for bit: the arithmetic both exact
resizes share (Pillow's fixed-point filter weights, its pass order, the crop's geometry), in
numpy only.

`CLIPImageProcessor` resizes with Pillow. Pillow computes its filter weights in double precision,
rounds them to 22-bit fixed point, and resamples in two passes (horizontal, then vertical), each
rounding to uint8. Both resizes do that same integer arithmetic, but compute only the output
rows and columns inside the crop (Pillow resizes the whole image, then crops: a quarter of a 4:3
photo's work is thrown away, and a 10000x1 strip allocates a 224 x 2.2 M image first).

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
- `resize_and_crop_array` (images/compiled_resample.py; numba-compiled loops): the API workers'
  CPU path, in a module of its own so that only they load numba.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

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


@dataclass(frozen=True)
class Upright:
    """How an image stored with an EXIF orientation becomes upright, as
    `ImageOps.exif_transpose` turns it: `turned`, the stored rows become the upright columns
    (a transposition); then the upright rows and/or columns run in reverse. Moving pixels
    changes none of them, so the API workers' resize reads the stored pixels in that order
    instead of turning a copy of them first (images/compiled_resample.py), and the runner turns
    the decoded pixels on its device (device_decode.py's `upright`)."""

    turned: bool
    rows_reversed: bool
    columns_reversed: bool


# EXIF orientation -> what exif_transpose does: 2 mirror, 3 rotate 180, 4 flip, 5 transpose,
# 6 rotate 270 (the stored image turned a quarter clockwise), 7 transverse, 8 rotate 90.
# Any other value leaves the image as stored, as exif_transpose does.
UPRIGHT = {
    1: Upright(False, False, False),
    2: Upright(False, False, True),
    3: Upright(False, True, True),
    4: Upright(False, True, False),
    5: Upright(True, False, False),
    6: Upright(True, False, True),
    7: Upright(True, True, True),
    8: Upright(True, True, False),
}


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
    padded: bool  # whether the output is larger than the kept part


def crop_plan(
    width: int, height: int, shortest_edge: int, crop_height: int, crop_width: int
) -> CropPlan:
    """transformers' center crop: the kept part starts half the surplus (rounded down) in; where
    the crop is larger, the padding before it is half the shortfall rounded up (an odd pixel of
    padding goes to the left or top, as `center_crop` places it)."""
    new_width, new_height = resized_size(width, height, shortest_edge)
    out_width, out_height = min(crop_width, new_width), min(crop_height, new_height)
    return CropPlan(
        new_width,
        new_height,
        (new_width - out_width) // 2,
        (new_height - out_height) // 2,
        out_width,
        out_height,
        (crop_width - out_width + 1) // 2,
        (crop_height - out_height + 1) // 2,
        (out_width, out_height) != (crop_width, crop_height),
    )
