"""Pillow's bicubic resize + center crop on any torch device, bit for bit: the runner's resize of
JPEGs decoded on its device (device_decode.py), for one image or a batch of same-size images.

The shared fixed-point arithmetic (Pillow's weights, the crop plan, the byte planes) is in
resample.py, beside the API workers' compiled CPU version; this module is the runner's only, and
the only one of the two that needs torch. Each pass is one float32 matrix product over the
weights' three byte planes, recombined in float64 (resample.py says why that is exact).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
import torch

from clip_runner.model.device_wait import to_device
from clip_runner.model.resample import (
    BYTE_SHIFTS,
    PRECISION_BITS,
    WEIGHT_CACHE_SIZE,
    byte_planes,
    crop_plan,
    fixed_point_weights,
    vertical_first,
)

_ONE = float(1 << PRECISION_BITS)
_HALF = float(1 << (PRECISION_BITS - 1))


@dataclass(frozen=True)
class _Weights:
    planes: torch.Tensor  # (3, count, in_size) float32 byte planes on the device
    scales: torch.Tensor  # (3,) float64 on the device: 2^16, 2^8, 1
    first: int  # the source span any row reads: [first, last)
    last: int


@functools.lru_cache(maxsize=WEIGHT_CACHE_SIZE)
def _device_weights(in_size: int, out_size: int, start: int, count: int, device: str) -> _Weights:
    """The weights on `device` and the span they read, kept: the same image sizes recur across
    requests, and the span is found here, on the CPU, so resizing never waits on the device."""
    weights = fixed_point_weights(in_size, out_size, start, count)
    used = np.flatnonzero(np.abs(weights).sum(axis=0))
    first, last = (int(used[0]), int(used[-1]) + 1) if len(used) else (0, 0)
    # Queued copies (device_wait.py): a blocking one would wait for (on a GPU: poll through)
    # every pass queued before it, at each new image size.
    planes = to_device(torch.from_numpy(byte_planes(weights)), torch.device(device))
    scales = torch.tensor([float(1 << shift) for shift in BYTE_SHIFTS], dtype=torch.float64)
    return _Weights(planes, to_device(scales, torch.device(device)), first, last)


def _planes_for(planes: torch.Tensor, leading: int) -> torch.Tensor:
    """(3, a, b) planes viewed to broadcast against pixels with `leading` batch dimensions."""
    return planes.view(3, *([1] * leading), *planes.shape[1:])


def _pass_sums(products: torch.Tensor, weights: _Weights) -> torch.Tensor:
    """(3, ...) byte-plane products -> Pillow's rounded pass output, 0..255 as float32."""
    sums = torch.tensordot(weights.scales, products.to(torch.float64), dims=1)
    return _round_to_uint8(sums).to(torch.float32)


def _round_to_uint8(sums: torch.Tensor) -> torch.Tensor:
    """Pillow's `clip8`: add half, shift right by PRECISION_BITS (a floor), clamp to 0..255."""
    return torch.floor((sums + _HALF) / _ONE).clamp_(0, 255)


def resize_and_crop(
    image: torch.Tensor, shortest_edge: int, crop_height: int, crop_width: int
) -> torch.Tensor:
    """uint8 (..., 3, H, W) on any device -> uint8 (..., 3, crop_height, crop_width), equal to
    Pillow's bicubic resize of the shortest side to `shortest_edge` followed by a center crop
    (zero padding where the crop is larger than the resized image). Leading dimensions are a
    batch of same-size images, resized by the same operations (on a GPU: the same launches)."""
    height, width = image.shape[-2:]
    leading = image.dim() - 2
    plan = crop_plan(width, height, shortest_edge, crop_height, crop_width)
    device = str(image.device)
    columns = _device_weights(width, plan.new_width, plan.left, plan.out_width, device)
    rows = _device_weights(height, plan.new_height, plan.top, plan.out_height, device)
    # Only the source rows (columns) that the kept output reads go through the first pass.
    if vertical_first(width, height, plan.new_height):
        pixels = image[..., columns.first : columns.last].to(torch.float32)
        row_planes = _planes_for(rows.planes, leading)
        vertical = _pass_sums(row_planes @ pixels.unsqueeze(0), rows)  # (..., out_h, span)
        column_planes = columns.planes[:, :, columns.first : columns.last].transpose(1, 2)
        cropped = _pass_sums(vertical.unsqueeze(0) @ _planes_for(column_planes, leading), columns)
    else:
        pixels = image[..., rows.first : rows.last, :].to(torch.float32)
        column_planes = _planes_for(columns.planes.transpose(1, 2), leading)
        horizontal = _pass_sums(pixels.unsqueeze(0) @ column_planes, columns)  # (..., span, out_w)
        row_planes = _planes_for(rows.planes[:, :, rows.first : rows.last], leading)
        cropped = _pass_sums(row_planes @ horizontal.unsqueeze(0), rows)
    cropped = cropped.to(torch.uint8)
    if not plan.padded:
        return cropped
    canvas = image.new_zeros((*image.shape[:-2], crop_height, crop_width))
    canvas[
        ...,
        plan.pad_top : plan.pad_top + plan.out_height,
        plan.pad_left : plan.pad_left + plan.out_width,
    ] = cropped
    return canvas
