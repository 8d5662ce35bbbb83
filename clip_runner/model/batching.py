"""Greedy cross-request batching: the next forward pass takes everything queued, at once.

BentoML 1.4's batcher (CorkDispatcher) holds a batch back while its estimate says waiting for
more requests pays off, and it learns that wait from how long requests queued. After a burst of
load the learned wait is seconds long, and it does not decay while traffic stays light: every
lone request then sat in the queue for it (seed request at 1 client: p50 175 ms before a burst
of 32 clients, 540-720 ms in the minutes after; BENCHMARKS.md). Here nothing waits on a timer:
while one batch runs, requests queue; when it ends, all of them (up to the batch limit) go into
the next one. Batches grow with load and shrink to a single request when traffic is light.

With `passes` > 1 that many batches run at once (on CPU, each on its own share of the cores;
pass_layout.py says why), and a worker that finds requests queued takes its fair share of them:
the rows queued divided among the workers free at that moment, so one pass does not take
everything while the other idles. A batch that is alone (no pass running, nothing left queued
behind it) runs on all the threads instead, and no other pass starts until it ends: a lone
request is as fast as with one pass, and the cores are never oversubscribed. All batchers of a
runner share one `PassSlots`, and one executor with a thread per pass.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass, field
from typing import Generic, TypeVar

import numpy as np

Rows = TypeVar("Rows", np.ndarray, list)
# One batched call: (rows, torch threads for it) -> output rows, in order.
RunBatch = Callable[[Rows, int], Awaitable[np.ndarray]]


class QueueWaitExceeded(Exception):
    """A request waited longer than the batcher's bound before its batch started."""


@dataclass
class _Job(Generic[Rows]):
    rows: Rows
    enqueued: float
    future: asyncio.Future = field(repr=False)


def concatenate(parts: Sequence[Rows]) -> Rows:
    """One batch from many requests' rows: arrays stacked along axis 0, lists joined."""
    if isinstance(parts[0], np.ndarray):
        return np.concatenate(parts, axis=0)
    return [row for part in parts for row in part]


def split_rows(output: np.ndarray, sizes: Sequence[int]) -> list[np.ndarray]:
    """The batch's output rows handed back to each request, in order."""
    return np.split(output, np.cumsum(sizes)[:-1].tolist(), axis=0)


def _fail(batch: Sequence[_Job], exc: BaseException) -> None:
    """Every caller of `batch` still waiting gets `exc`."""
    for job in batch:
        if not job.future.done():
            job.future.set_exception(exc)


def _being_cancelled() -> bool:
    """Whether the running task was asked to stop, as opposed to a CancelledError raised on its
    own by code it awaited."""
    task = asyncio.current_task()
    return task is not None and task.cancelling() > 0


def take_batch(queue: deque[_Job], max_rows: int) -> list[_Job]:
    """Pop jobs from the front while they fit in `max_rows` (the first job always goes whole)."""
    batch: list[_Job] = []
    rows = 0
    while queue:
        size = len(queue[0].rows)
        if batch and rows + size > max_rows:
            break
        batch.append(queue.popleft())
        rows += size
    return batch


class PassSlots:
    """The forward passes in progress across a runner's batchers, and their thread counts.

    A pass is "wide" (every thread) when it starts alone with nothing queued behind it, and
    then runs alone; otherwise "narrow" (its share of the threads), beside the others.
    """

    def __init__(self, passes: int, wide_threads: int, narrow_threads: int) -> None:
        self.passes = passes
        self.wide_threads = wide_threads
        self.narrow_threads = narrow_threads
        self.running = 0
        self.wide_running = False
        self._wakes: list[asyncio.Event] = []

    def register(self, wake: asyncio.Event) -> None:
        """A batcher's wake-up event, set when a wide pass ends (it held every other pass)."""
        self._wakes.append(wake)

    def start(self, alone_after: bool) -> int:
        """Count a pass in; its torch threads. `alone_after`: nothing is queued behind it.

        A pass only goes wide (and alone) when that gives it more threads than a narrow one."""
        wide = self.running == 0 and alone_after and self.wide_threads > self.narrow_threads
        self.running += 1
        self.wide_running = wide
        return self.wide_threads if wide else self.narrow_threads

    def end(self) -> None:
        """Count a pass out. A wide pass ran alone, so the one ending is the wide one if any."""
        self.running -= 1
        if self.wide_running:
            self.wide_running = False
            for wake in self._wakes:
                wake.set()


def in_executor(infer: Callable[[Rows, int], np.ndarray], executor: Executor) -> RunBatch:
    """A blocking `infer(rows, threads)` (a forward pass) run on `executor`'s threads."""

    async def run(rows: Rows, threads: int) -> np.ndarray:
        return await asyncio.get_running_loop().run_in_executor(executor, infer, rows, threads)

    return run


class GreedyBatcher(Generic[Rows]):
    """Merges concurrent `submit` calls into batched calls of `run`.

    The runner's `run` is a forward pass on an inference thread (`in_executor`); an API
    worker's is a call to the runner (runner_calls.py), so many requests share one call.
    """

    def __init__(
        self,
        run: RunBatch,
        max_rows: int,
        max_queue_wait_s: float,
        slots: PassSlots | None = None,
    ) -> None:
        """`run(rows, threads)` runs one batch on `threads` torch threads; `slots` is shared by
        every batcher of the runner (default: one batch at a time, one thread)."""
        self.run = run
        self.max_rows = max_rows
        self.max_queue_wait_s = max_queue_wait_s
        self.slots = slots or PassSlots(passes=1, wide_threads=1, narrow_threads=1)
        self._free_workers = self.slots.passes
        self._queue: deque[_Job] = deque()
        self._wake = asyncio.Event()
        self.slots.register(self._wake)
        self._workers: list[asyncio.Task] = []

    async def submit(self, rows: Rows) -> np.ndarray:
        """Queue one request's rows; returns its output rows once they have run.

        Rows beyond `max_rows` go as parts of at most that many, so no pass (and no runner
        call) is larger than the batch limit however many rows one request brings: `/classify`
        with 1,000 labels and 100 templates is 100,000 prompts, and as one pass of ViT-B/32
        about 16 GB per activation. At most one part per pass slot is queued or running at a
        time: other requests' jobs take their turns between the parts, and a part's wait in
        the queue means what any job's does (the queue-wait bound sheds load, not a large
        request's own later parts). If the caller leaves, or a part fails, the rest are
        dropped."""
        if len(rows) == 0:
            raise ValueError("nothing to encode")
        if len(rows) <= self.max_rows:
            return await self._queued(rows)
        parts = [rows[i : i + self.max_rows] for i in range(0, len(rows), self.max_rows)]
        turns = asyncio.Semaphore(self.slots.passes)

        async def in_turn(part: Rows) -> np.ndarray:
            async with turns:
                return await self._queued(part)

        running = [asyncio.ensure_future(in_turn(part)) for part in parts]
        try:
            return np.concatenate(await asyncio.gather(*running), axis=0)
        except BaseException:
            for part in running:
                part.cancel()
            raise

    async def _queued(self, rows: Rows) -> np.ndarray:
        if not self._workers:
            self._free_workers = self.slots.passes
            self._workers = [asyncio.create_task(self._work()) for _ in range(self.slots.passes)]
        elif any(worker.done() for worker in self._workers):
            # Only the ended ones: a worker ends free (its `finally`), so the count stands, and
            # new workers beside running ones would run more passes than there are slots.
            self._workers = [
                asyncio.create_task(self._work()) if worker.done() else worker
                for worker in self._workers
            ]
        job = _Job(rows, time.monotonic(), asyncio.get_running_loop().create_future())
        self._queue.append(job)
        self._wake.set()
        return await job.future

    def _drop_stale(self, behind_failure: Exception | None = None) -> None:
        """Callers that left are dropped; callers queued past the bound get QueueWaitExceeded,
        or `behind_failure`: the error of the batch that held them (they waited because it
        failed slowly: a merged call to a runner that did not answer took both its attempts'
        time, and the callers queued behind it had been told the model was overloaded)."""
        now = time.monotonic()
        kept: deque[_Job] = deque()
        for job in self._queue:
            if job.future.done():
                continue
            waited = now - job.enqueued
            if waited > self.max_queue_wait_s:
                job.future.set_exception(
                    behind_failure
                    or QueueWaitExceeded(
                        f"queued {waited:.1f} s, over the {self.max_queue_wait_s:g} s bound"
                    )
                )
                continue
            kept.append(job)
        self._queue = kept

    def _fair_share(self) -> int:
        """Rows for the next batch: the queued rows split among the free workers, capped."""
        queued = sum(len(job.rows) for job in self._queue)
        return max(1, min(self.max_rows, math.ceil(queued / self._free_workers)))

    async def _work(self) -> None:
        while True:
            await self._wake.wait()
            while True:
                self._drop_stale()
                batch = (
                    take_batch(self._queue, self._fair_share())
                    if not self.slots.wide_running
                    else []
                )
                if not batch:
                    # Queue empty, or a wide pass runs alone: its end sets the wake again. No
                    # await since that was seen, so no wake-up is lost.
                    self._wake.clear()
                    break
                sizes = [len(job.rows) for job in batch]
                self._free_workers -= 1
                threads = self.slots.start(alone_after=not self._queue)
                try:
                    output = await self.run(concatenate([job.rows for job in batch]), threads)
                    if len(output) != sum(sizes):  # rows would go to the wrong callers
                        raise RuntimeError(f"{len(output)} rows answered for {sum(sizes)} sent")
                except Exception as exc:  # this batch's callers get the error; the worker lives
                    _fail(batch, exc)
                    self._drop_stale(behind_failure=exc)
                    continue
                except BaseException as exc:  # its callers must not wait for good
                    _fail(batch, RuntimeError("the batch's pass was interrupted"))
                    if isinstance(exc, asyncio.CancelledError) and not _being_cancelled():
                        continue  # a library's own CancelledError: the worker serves on
                    raise  # this worker stopped (the loop's end), or the process ends
                finally:
                    self._free_workers += 1
                    self.slots.end()
                for job, part in zip(batch, split_rows(output, sizes), strict=True):
                    if not job.future.done():
                        job.future.set_result(part)
