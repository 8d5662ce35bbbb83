"""The image tower's forward pass replayed from CUDA graphs, one graph per batch size bucket.

Why: on a GPU the image encoder is launch-bound. ViT-B/32 in fp16 took about 5 ms on an H200 at
batch 1 and at batch 32 alike: that time is the CPU issuing a few hundred kernels one by one,
holding the GIL the runner's event loop needs to take the next call. A CUDA graph records the
kernels once and issues them all with one call: on an H200 that doubled the seed load at 64
clients and halved one client's p50 (BENCHMARKS.md, GPU), so it is the default on a GPU
(`CLIP_CUDA_GRAPHS=auto`).

A graph has fixed shapes, so a batch is padded up to the next bucket (1, 2, 4, ... up to the
largest batch) and a batch larger than the largest bucket goes in several replays. The padding
rows hold whatever the buffer held last; every image's row in a ViT is computed on its own, so
they never touch the real rows, and they are dropped from the answer.

On CPU there is nothing to record: each bucket "replays" by running the forward pass eagerly
on its buffer. The staging (buckets, padding, splitting, copying out under the lock) is then
the same code on both devices, and the tests exercise it without a GPU.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

import numpy as np
import torch

from clip_runner.model.device_wait import to_host

# Passes run before recording, on a side stream, as torch's documentation asks: the first
# passes allocate workspaces (cuBLAS, SDPA) that must not be allocated inside the capture.
WARM_UP_PASSES = 3

Forward = Callable[[torch.Tensor], torch.Tensor]


def batch_buckets(max_batch: int) -> tuple[int, ...]:
    """Powers of two below `max_batch`, then `max_batch`: at most half of a replay is padding."""
    if max_batch < 1:
        raise ValueError(f"the largest batch must be at least 1, not {max_batch}")
    buckets, size = [], 1
    while size < max_batch:
        buckets.append(size)
        size *= 2
    return (*buckets, max_batch)


def bucket_for(rows: int, buckets: tuple[int, ...]) -> int:
    """The smallest bucket that holds `rows` (1 <= rows <= the largest bucket)."""
    for bucket in buckets:
        if rows <= bucket:
            return bucket
    raise ValueError(f"{rows} rows do not fit the largest bucket ({buckets[-1]})")


def _recorded(forward: Forward, source: torch.Tensor, pool: object) -> tuple[object, torch.Tensor]:
    """A CUDA graph of `forward(source)` and the output buffer each replay refills."""
    side = torch.cuda.Stream(source.device)
    side.wait_stream(torch.cuda.current_stream(source.device))
    with torch.cuda.stream(side):
        for _ in range(WARM_UP_PASSES):
            forward(source)
    torch.cuda.current_stream(source.device).wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, pool=pool):
        output = forward(source)
    return graph, output


class ReplayedForward:
    """`forward` over uint8 (N, 3, H, W) pixels, run as per-bucket replays (module docstring).

    One replay at a time (a lock): the graphs share one memory pool, so an output buffer is only
    valid until the next replay, and it is copied out before the lock is released.
    """

    def __init__(
        self,
        forward: Forward,
        sample_shape: tuple[int, ...],
        device: torch.device,
        buckets: tuple[int, ...],
        spin_waits: bool = False,
    ) -> None:
        self.buckets = buckets
        self.spin_waits = spin_waits  # how the answers' copy waits for the GPU (device_wait.py)
        self.recorded = device.type == "cuda"
        self._lock = threading.Lock()
        self._inputs: dict[int, torch.Tensor] = {}
        self._outputs: dict[int, torch.Tensor] = {}
        self._replays: dict[int, Callable[[], None]] = {}
        pool = None
        # Largest first: the smaller graphs then fit in the memory the largest one pooled.
        for bucket in sorted(buckets, reverse=True):
            source = torch.zeros((bucket, *sample_shape), dtype=torch.uint8, device=device)
            self._inputs[bucket] = source
            if self.recorded:
                graph, self._outputs[bucket] = _recorded(forward, source, pool)
                pool = graph.pool()
                self._replays[bucket] = graph.replay
            else:
                self._outputs[bucket] = forward(source)
                self._replays[bucket] = self._eager_replay(forward, bucket)

    def _eager_replay(self, forward: Forward, bucket: int) -> Callable[[], None]:
        def replay() -> None:
            self._outputs[bucket].copy_(forward(self._inputs[bucket]))

        return replay

    def __call__(self, pixels: torch.Tensor) -> np.ndarray:
        """uint8 (N, 3, H, W) on the device -> the forward pass's float32 (N, D) rows."""
        largest = self.buckets[-1]
        rows = []
        with self._lock:
            for start in range(0, len(pixels), largest):
                chunk = pixels[start : start + largest]
                bucket = bucket_for(len(chunk), self.buckets)
                self._inputs[bucket][: len(chunk)].copy_(chunk)
                self._replays[bucket]()
                # A copy, also on CPU (where .cpu() would return the buffer itself).
                rows.append(to_host(self._outputs[bucket][: len(chunk)], self.spin_waits))
        if not rows:
            return np.empty((0, self._outputs[largest].shape[-1]), dtype=np.float32)
        return np.concatenate(rows) if len(rows) > 1 else rows[0]
