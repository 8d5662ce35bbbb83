"""Pillow's bicubic resize + center crop, reproduced bit for bit in torch, on any device.

The exact CPU path resizes with Pillow (`images.resize_and_crop`), as `CLIPImageProcessor` does.
To resize on the model's device instead (decode_on_device.py), the same arithmetic runs in torch:
Pillow computes its filter weights in double precision, rounds them to 22-bit fixed point, and
resamples in two passes (horizontal, then vertical), each rounding to uint8. Here each pass is
one float64 matrix product with those integer weights: every product and partial sum is an
integer below 2^53, so float64 holds them exactly and the result does not depend on the order
of summation. Only the output rows and columns inside the crop are computed, so no resized
intermediate is ever larger than the crop (Pillow's own crop of a 10000x1 strip allocates
a 224 x 2.2 M image first).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import numpy as np
import torch

# Pillow's fixed point for 8-bit images: 32 bits - 8 for the value - 2 for overshoot.
PRECISION_BITS = 22
_ONE = float(1 << PRECISION_BITS)
_HALF = float(1 << (PRECISION_BITS - 1))
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


@dataclass(frozen=True)
class _Weights:
    matrix: torch.Tensor  # (count, in_size) float64 on the device
    first: int  # the source span any row reads: [first, last)
    last: int


@functools.lru_cache(maxsize=WEIGHT_CACHE_SIZE)
def _device_weights(in_size: int, out_size: int, start: int, count: int, device: str) -> _Weights:
    """The weights on `device` and the span they read, kept: the same image sizes recur across
    requests, and the span is found here, on the CPU, so resizing never waits on the device."""
    weights = fixed_point_weights(in_size, out_size, start, count)
    used = np.flatnonzero(np.abs(weights).sum(axis=0))
    first, last = (int(used[0]), int(used[-1]) + 1) if len(used) else (0, 0)
    matrix = torch.from_numpy(weights).to(device=device, dtype=torch.float64)
    return _Weights(matrix, first, last)


def _round_to_uint8(sums: torch.Tensor) -> torch.Tensor:
    """Pillow's `clip8`: add half, shift right by PRECISION_BITS (a floor), clamp to 0..255."""
    return torch.floor((sums + _HALF) / _ONE).clamp_(0, 255)


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


def resize_and_crop(
    image: torch.Tensor, shortest_edge: int, crop_height: int, crop_width: int
) -> torch.Tensor:
    """uint8 (3, H, W) on any device -> uint8 (3, crop_height, crop_width), equal to Pillow's
    bicubic resize of the shortest side to `shortest_edge` followed by a center crop (zero
    padding where the crop is larger than the resized image)."""
    _, height, width = image.shape
    new_width, new_height = resized_size(width, height, shortest_edge)
    out_width, out_height = min(crop_width, new_width), min(crop_height, new_height)
    left, top = (new_width - out_width) // 2, (new_height - out_height) // 2
    device = str(image.device)
    columns = _device_weights(width, new_width, left, out_width, device)  # (out_w, W)
    rows = _device_weights(height, new_height, top, out_height, device)  # (out_h, H)
    # Only the source rows (columns) that the kept output reads go through the first pass.
    if vertical_first(width, height, new_height):
        pixels = image[:, :, columns.first : columns.last].to(torch.float64)
        vertical = _round_to_uint8(rows.matrix @ pixels)  # (3, out_h, span)
        cropped = _round_to_uint8(vertical @ columns.matrix[:, columns.first : columns.last].T)
    else:
        pixels = image[:, rows.first : rows.last, :].to(torch.float64)
        horizontal = _round_to_uint8(pixels @ columns.matrix.T)  # (3, span, out_w)
        cropped = _round_to_uint8(rows.matrix[:, rows.first : rows.last] @ horizontal)
    cropped = cropped.to(torch.uint8)
    if (out_height, out_width) == (crop_height, crop_width):
        return cropped
    canvas = torch.zeros((3, crop_height, crop_width), dtype=torch.uint8, device=image.device)
    pad_top, pad_left = (crop_height - out_height) // 2, (crop_width - out_width) // 2
    canvas[:, pad_top : pad_top + out_height, pad_left : pad_left + out_width] = cropped
    return canvas
