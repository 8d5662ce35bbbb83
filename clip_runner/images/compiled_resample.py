"""The API workers' exact resize + center crop: Pillow's fixed-point arithmetic
(model/resample.py) in loops compiled by numba, about 4.5 x faster than Pillow on the seed's
640x480 photos. Pillow's loops are scalar; these run each pass as sums of whole rows that the
compiler vectorises.

numba is an accelerator, not a requirement: without it, or where it cannot compile these loops
(`COMPILED` is False), images/loading.py resizes with Pillow itself, to the same pixels.

Nothing imports this module at its own import: images/loading.py does on first use
(`compiled_resizer`), which each API worker makes as it starts. Importing numba and loading the
compiled loops costs a process about 0.45 s and 110 MB, and the supervisor and the runner,
which import the service and so images/loading.py, never resize on the CPU.
"""

from __future__ import annotations

import functools
import logging
import pickle
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from clip_runner.model.resample import (
    PRECISION_BITS,
    UPRIGHT,
    WEIGHT_CACHE_SIZE,
    crop_plan,
    fixed_point_weights,
    vertical_first,
)

try:
    import numba
except ImportError:  # see the module docstring: images/loading.py then resizes with Pillow
    numba = None

COMPILED = numba is not None
# Rows the horizontal pass turns on their side at a time: span x ROW_BLOCK x 3 bytes (94 kB for
# a 640x480 photo). Timed against 16, 32, 48 and 96 on photos from 224x224 to 4000x3000: 64 was
# fastest or within 10% everywhere (BENCHMARKS.md).
ROW_BLOCK = 64


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


def _reversed(band: _Band, in_size: int) -> _Band:
    """The same weights read from the other end of the axis: output i of a mirrored axis sums
    the source pixels `in_size - 1 - x` of the band's `x`, with its taps in reverse order."""
    taps = band.weights.shape[1]
    return _Band(
        (band.stop - band.start - taps) - band.first,
        np.ascontiguousarray(band.weights[:, ::-1]),
        in_size - band.stop,
        in_size - band.start,
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


def _horizontal_pass_for(pixel_bytes: int, channels: int) -> Callable[..., np.ndarray]:
    """The horizontal pass over pixels of `pixel_bytes` bytes whose first `channels` are read:
    (4, 3) for RGBX, (1, 1) for greyscale. Both are constants of the function it returns, which
    numba compiles as such: with a variable stride the compiled transposition took twice as
    long."""

    def horizontal_pass(source: np.ndarray, first: np.ndarray, weights: np.ndarray) -> np.ndarray:
        """(rows, span * pixel_bytes) uint8 -> (rows, len(first) * channels): each output
        column a weighted sum of source columns (RGBX's fourth byte is skipped).

        Summing along a row would run over strided pixels, which does not vectorise. So a block
        of `ROW_BLOCK` rows is turned on its side first (column-major, still uint8: the block
        stays in cache), each output column is then a sum of whole block rows like the vertical
        pass, its rounded bytes land in a column-major block too, and that block is turned back
        into rows. Writing each rounded value straight to its output row instead cost more than
        the sums."""
        rows, span, columns_out = source.shape[0], source.shape[1] // pixel_bytes, first.shape[0]
        taps = weights.shape[1]
        out = np.empty((rows, columns_out * channels), np.uint8)
        block = np.empty((span, ROW_BLOCK * channels), np.uint8)
        sums = np.empty(ROW_BLOCK * channels, np.int32)
        done = np.empty((columns_out, ROW_BLOCK * channels), np.uint8)
        for block_start in range(0, rows, ROW_BLOCK):
            height = min(ROW_BLOCK, rows - block_start)
            width = height * channels
            for row in range(height):
                line = source[block_start + row]
                for column in range(span):
                    for channel in range(channels):
                        block[column, row * channels + channel] = line[
                            column * pixel_bytes + channel
                        ]
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
                    for channel in range(channels):
                        line[column * channels + channel] = done[column, row * channels + channel]
        return out

    return horizontal_pass


# Pixel layouts the compiled passes read: (bytes per pixel, channels).
RGBX, GREY = (4, 3), (1, 1)
_horizontal_passes = {layout: _horizontal_pass_for(*layout) for layout in (RGBX, GREY)}


def _compiled_passes(signature: Any, cache: bool) -> tuple[Any, dict[tuple[int, int], Any]]:
    """The vertical pass and each layout's horizontal pass, compiled for `signature`."""

    def compile_one(function: Any) -> Any:
        return numba.njit(signature, nogil=True, cache=cache)(function)

    return compile_one(_vertical_pass), {
        layout: compile_one(horizontal_pass)
        for layout, horizontal_pass in _horizontal_passes.items()
    }


if COMPILED:  # compiled once, cached on disk; nogil: the API workers' image threads run at once
    _SIGNATURE = numba.types.Array(numba.uint8, 2, "C")(
        numba.types.Array(numba.uint8, 2, "A", readonly=True),  # np.asarray(image) is read-only
        numba.types.Array(numba.int64, 1, "C"),
        numba.types.Array(numba.int32, 2, "C"),
    )
    try:
        try:
            _vertical_pass, _horizontal_passes = _compiled_passes(_SIGNATURE, cache=True)
        except (RuntimeError, OSError, pickle.UnpicklingError, EOFError) as exc:
            # Nowhere writable for numba's cache (a read-only root filesystem, a uid without a
            # home: a RuntimeError), a full disk under it (OSError), a cache file cut short (an
            # unpickling error): compile in memory, at each API worker's start. Pillow had
            # resized instead, the same pixels for about 4.5 x the CPU; a full disk had stopped
            # every API worker's start, over and over. A cause that is not the cache fails again
            # below.
            logging.getLogger(__name__).warning(
                "numba could not compile the resize with its on-disk cache (%s): compiling it "
                "without one, at each start (where the cache is the cause, point "
                "NUMBA_CACHE_DIR at a writable folder with room)",
                exc,
            )
            _vertical_pass, _horizontal_passes = _compiled_passes(_SIGNATURE, cache=False)
    except (numba.core.errors.NumbaError, RuntimeError, OSError) as exc:
        # Compiled at import, as every API worker starts: a numba other than the pinned one (a GPU
        # image's own) that cannot type these loops must cost speed, not the service. Pillow
        # then resizes, same pixels.
        logging.getLogger(__name__).warning(
            "numba could not compile the resize (%s): images are resized with Pillow", exc
        )
        COMPILED = False


def resize_and_crop_array(
    pixels: np.ndarray,
    shortest_edge: int,
    crop_height: int,
    crop_width: int,
    orientation: int = 1,
) -> np.ndarray:
    """uint8 (H, W, 4) RGBX, (H, W, 3) RGB or (H, W) greyscale -> uint8 (crop_height,
    crop_width, 3), equal to Pillow's bicubic resize of the shortest side (of the image in RGB)
    followed by a center crop (zero padding where the crop is larger), for images of any aspect
    ratio. Needs numba (`COMPILED`).

    RGBX (the fourth byte ignored) and greyscale are the compiled passes' layouts: they are how
    Pillow keeps RGB and greyscale pixels, so images/loading.py decodes into them as they are.
    RGB input is padded to RGBX first (a copy). A greyscale image is resized in its one channel,
    which the result repeats three times: Pillow's RGB of it has three equal channels, each
    resized alike, so the pixels are the same for a third of the work.

    `orientation`: the pixels are as stored in a file with this EXIF orientation, and the result
    is that of the upright image (`ImageOps.exif_transpose`'s). Nothing is turned: the weights
    are read in the stored order (`UPRIGHT`), the passes run along the stored axes in Pillow's
    order for the upright image, and only the small result is turned: a 12-MP phone photo
    costs what an upright one does (decode, resize and crop 65.6 ms, against 146.5 turned by
    Pillow and copied first; BENCHMARKS.md). Integer sums do not depend on the order of their
    terms, so the pixels are the same."""
    if pixels.ndim == 3 and pixels.shape[2] == 3:
        pixels = np.concatenate([pixels, np.zeros_like(pixels[..., :1])], axis=2)
    layout = GREY if pixels.ndim == 2 else RGBX
    pixel_bytes, channels = layout
    horizontal_pass = _horizontal_passes[layout]
    upright = UPRIGHT.get(orientation, UPRIGHT[1])
    stored_height, stored_width = pixels.shape[:2]
    width, height = stored_width, stored_height
    if upright.turned:
        width, height = height, width
    plan = crop_plan(width, height, shortest_edge, crop_height, crop_width)
    columns = _band(width, plan.new_width, plan.left, plan.out_width)
    rows = _band(height, plan.new_height, plan.top, plan.out_height)
    if upright.columns_reversed:
        columns = _reversed(columns, width)
    if upright.rows_reversed:
        rows = _reversed(rows, height)
    if upright.turned:  # the upright columns are stored rows
        rows, columns = columns, rows
    flat = np.ascontiguousarray(pixels).reshape(stored_height, stored_width * pixel_bytes)
    # Only the source rows and columns that the crop reads.
    region = flat[rows.start : rows.stop, pixel_bytes * columns.start : pixel_bytes * columns.stop]
    # Pillow's pass order for the upright image, whose vertical pass is, turned, a horizontal one.
    if vertical_first(width, height, plan.new_height) != upright.turned:
        vertical = _vertical_pass(region, rows.first, rows.weights)
        cropped = horizontal_pass(vertical, columns.first, columns.weights)
    else:
        horizontal = horizontal_pass(region, columns.first, columns.weights)
        cropped = _vertical_pass(horizontal, rows.first, rows.weights)
    if upright.turned:
        cropped = cropped.reshape(plan.out_width, plan.out_height, channels).transpose(1, 0, 2)
    cropped = cropped.reshape(plan.out_height, plan.out_width, channels)
    if channels == 1:  # greyscale: Pillow's RGB of it has three equal channels
        cropped = np.repeat(cropped, 3, axis=2)
    cropped = np.ascontiguousarray(cropped)  # a turned one is a view
    if not plan.padded:
        return cropped
    canvas = np.zeros((crop_height, crop_width, 3), dtype=np.uint8)
    canvas[
        plan.pad_top : plan.pad_top + plan.out_height,
        plan.pad_left : plan.pad_left + plan.out_width,
    ] = cropped
    return canvas
