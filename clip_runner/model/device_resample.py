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
    """One direction's fixed-point weights on the device as float32 byte planes, restricted to
    the source span the kept output reads, laid out for either side of a matrix product."""

    on_the_right: torch.Tensor  # (span, 3 * count): rows of pixels @ this
    on_the_left: torch.Tensor  # (3 * count, span): this @ columns of pixels
    count: int  # output pixels
    first: int  # the source span any output pixel reads: [first, last)
    last: int


@functools.lru_cache(maxsize=WEIGHT_CACHE_SIZE)
def _device_weights(in_size: int, out_size: int, start: int, count: int, device: str) -> _Weights:
    """The weights on `device` and the span they read, kept: the same image sizes recur across
    requests, and the span is found here, on the CPU, so resizing never waits on the device."""
    weights = fixed_point_weights(in_size, out_size, start, count)
    used = np.flatnonzero(np.abs(weights).sum(axis=0))
    first, last = (int(used[0]), int(used[-1]) + 1) if len(used) else (0, 0)
    planes = byte_planes(weights)[:, :, first:last]  # (3, count, span)
    on_the_left = np.ascontiguousarray(planes.reshape(3 * count, last - first))
    on_the_right = np.ascontiguousarray(planes.transpose(2, 0, 1).reshape(last - first, 3 * count))
    # Queued copies (device_wait.py): a blocking one would wait for (on a GPU: poll through)
    # every pass queued before it, at each new image size.
    return _Weights(
        to_device(torch.from_numpy(on_the_right), torch.device(device)),
        to_device(torch.from_numpy(on_the_left), torch.device(device)),
        count,
        first,
        last,
    )


def _rounded(products: torch.Tensor, planes_dim: int) -> torch.Tensor:
    """Byte-plane products (the three planes along `planes_dim`) -> Pillow's rounded pass
    output, 0..255 as float32: the planes recombined in float64 (exact below 2^53), then
    Pillow's `clip8` (add half, shift right by PRECISION_BITS: a floor; clamp to 0..255)."""
    planes = products.unbind(planes_dim)
    sums = torch.zeros_like(planes[0], dtype=torch.float64)
    for plane, shift in zip(planes, BYTE_SHIFTS, strict=True):
        sums.add_(plane, alpha=float(1 << shift))
    return sums.add_(_HALF).div_(_ONE).floor_().clamp_(0, 255).to(torch.float32)


def _across_columns(pixels: torch.Tensor, weights: _Weights) -> torch.Tensor:
    """(..., span) -> (..., count): each row resampled, all rows in one 2-D matrix product (a
    broadcast product would first copy the pixels once per byte plane)."""
    products = pixels.reshape(-1, pixels.shape[-1]) @ weights.on_the_right
    rows = _rounded(products.view(-1, 3, weights.count), 1)
    return rows.view(*pixels.shape[:-1], weights.count)


def _across_rows(pixels: torch.Tensor, weights: _Weights) -> torch.Tensor:
    """(..., span, n) -> (..., count, n): each column resampled."""
    products = weights.on_the_left @ pixels  # (..., 3 * count, n)
    return _rounded(products.unflatten(-2, (3, weights.count)), -3)


def resize_and_crop(
    image: torch.Tensor, shortest_edge: int, crop_height: int, crop_width: int
) -> torch.Tensor:
    """uint8 (..., 3, H, W) on any device -> uint8 (..., 3, crop_height, crop_width), equal to
    Pillow's bicubic resize of the shortest side to `shortest_edge` followed by a center crop
    (zero padding where the crop is larger than the resized image). Leading dimensions are a
    batch of same-size images, resized by the same operations (on a GPU: the same launches)."""
    height, width = image.shape[-2:]
    plan = crop_plan(width, height, shortest_edge, crop_height, crop_width)
    device = str(image.device)
    columns = _device_weights(width, plan.new_width, plan.left, plan.out_width, device)
    rows = _device_weights(height, plan.new_height, plan.top, plan.out_height, device)
    # Only the source rows and columns that the kept output reads.
    pixels = image[..., rows.first : rows.last, columns.first : columns.last].to(torch.float32)
    if vertical_first(width, height, plan.new_height):
        cropped = _across_columns(_across_rows(pixels, rows), columns)
    else:
        cropped = _across_rows(_across_columns(pixels, columns), rows)
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
