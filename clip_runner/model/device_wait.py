"""Waiting for the GPU without holding a CPU core: the runner's answers brought to the host,
and its inputs sent to the GPU without waiting at all.

A host thread that waits for a CUDA device (a `.cpu()` copy after a forward pass, a stream's
`synchronize`) spins by default: with fewer CUDA contexts than CPU cores, which is any one-GPU
machine, CUDA's automatic scheduling polls the device from that thread for as long as the GPU
works. The runner's inference thread waits for every forward pass, so each runner process kept
about one core busy doing nothing whenever a pass was in progress: on the first H200 run the
runners' CPU followed the passes in progress (2.15 cores for 1.83 passes in progress at 64
clients with CUDA graphs; BENCHMARKS.md, GPU), on a machine where the API workers and the
runner's JPEG decode need those cores. PyTorch has no setting for the device's scheduling
flags (pytorch/pytorch#28224), but an event created with `cudaEventBlockingSync`
(`torch.cuda.Event(blocking=True)`) lets the waiting thread sleep in the driver until the GPU
reaches the event, and torch lets go of the GIL while it waits. The answers' copy to the host
is queued before that event, so one wait covers the pass and the copy. `spin=True`
(CLIP_CUDA_WAIT=spin) keeps CUDA's polling: the lowest wake-up latency, one core per waiting
thread.

The copies the other way, to the GPU, are queued without waiting (`to_device`): torch's
blocking copy is a `cudaMemcpyAsync` followed by a `cudaStreamSynchronize`, which polls until
everything queued on the stream before it has run, another pass's forward pass included, only
for the copy's source to be free again. The waits that remain are the answers' copies back.

On CPU there is nothing to wait for: the same calls copy and return (the tests run them so).
"""

from __future__ import annotations

import numpy as np
import torch


def wait_for_queued_work(device: torch.device, spin: bool = False) -> None:
    """Returns once the work queued so far on `device`'s current stream has run; at once on
    CPU. The thread sleeps while it waits unless `spin`.

    It waits for an event recorded now, not for the stream itself: work that other threads
    queue on the stream meanwhile (another pass, a batch's JPEG copies and resize) is not waited
    for, as `stream.synchronize()` would."""
    if device.type != "cuda":
        return
    reached = torch.cuda.Event(blocking=not spin)
    reached.record(torch.cuda.current_stream(device))
    reached.synchronize()  # GIL released inside


def to_host(rows: torch.Tensor, spin: bool = False) -> np.ndarray:
    """A host copy of `rows` (any device) as numpy, once the work that computes them has run;
    never a view of `rows`' memory, which a later pass may overwrite (cuda_graphs.py).

    From a GPU the copy is queued behind that work into pinned memory (torch pins the output
    of a non-blocking copy to the CPU), and one wait covers both. A blocking copy would instead
    synchronise the whole stream and poll, also for what other threads queued after it.

    The answer is then copied out of the pinned block into memory of its own: torch's caching
    host allocator rounds each block up to a power of two and never gives it back to the
    system, and a view of it kept anywhere (the runner's prompt cache keeps rows of every text
    pass) would hold the whole block, page-locked, for as long as the row lives: up to a pass's
    256 KiB per cached prompt. The copy is a pass's answer: 6 us for 128 rows of 512 floats
    here, 0.3 us for one."""
    if rows.device.type != "cuda":
        return rows.to("cpu", copy=True).numpy()
    try:
        host = rows.to("cpu", non_blocking=True)
    except RuntimeError:  # no pinned memory to be had: wait, then a pageable copy
        wait_for_queued_work(rows.device, spin)
        return rows.to("cpu", copy=True).numpy()
    wait_for_queued_work(rows.device, spin)
    return host.numpy().copy()  # the pinned block goes back to torch's pool at once


def to_device(host: torch.Tensor, device: torch.device) -> torch.Tensor:
    """`host` on `device`, the copy queued on the current stream without waiting for it.

    Safe for every host tensor, so the caller may free or reuse `host` at once: from pageable
    memory CUDA returns only once the bytes are in a staging buffer of its own (its "API
    synchronization behavior"; the driver may still wait for the stream first); from pinned
    memory, which the GPU reads while the copy runs, it returns at once, and torch's caching
    host allocator records the copy on the stream and hands the block out again only after it
    has run. Work queued later on the same stream (the resize, the forward pass) runs after
    the copy. On CPU `host` itself, as `.to` gives it."""
    return host.to(device, non_blocking=True)
