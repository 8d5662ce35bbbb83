"""The pixels an API worker decodes at once, across all its requests.

A request's pixels are bounded (`CLIP_MAX_REQUEST_PIXELS`, pixel_budget.py), but a worker runs
many requests, and each image it decodes in a thread holds its full-size pixels until it is
resized: 6 to 26 bytes a pixel at the peak (a JPEG the least, a 16-bit PNG the most; measured on
40-Mpx images), so a 40-Mpx image holds 0.25 to 1 GB. With one decode per thread of asyncio's
default pool (cores + 4, up to 32) nothing bounded their sum: eight requests of five 40-Mpx PNGs
took each of two API workers on 2 cores from 0.2-0.5 GB to 2.2 GB, and a 16-core machine's pool
of 20 threads could reach 20 GB a worker. Each decode here first takes its image's pixels (from
its header) out of a fixed budget and gives them back when its thread is done, so a worker's
decoding memory stays within the budget times the bytes a pixel costs.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

T = TypeVar("T")


class DecodeBudget:
    """A first-come, first-served budget of pixels for decodes run in threads.

    An image larger than the whole budget takes all of it (it decodes alone) rather than never.
    Pixels are returned when the thread's work ends, not when its caller stops waiting: a
    request cancelled mid-decode (its client gone, another of its images refused) leaves a
    thread decoding, and its memory counts until that thread is done. Waiting is in order of
    arrival, so a large image is not passed over forever by a stream of small ones.
    """

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.free = capacity
        self._waiting: deque[tuple[int, asyncio.Future[None]]] = deque()
        # Threads as asyncio's default pool has them (cores + 4, at most 32): the budget, not
        # the pool, bounds the memory.
        self._threads = ThreadPoolExecutor(thread_name_prefix="clip-decode")

    async def run(self, pixels: int, work: Callable[[], T]) -> T:
        """`work()` in a thread once `pixels` (at most the whole budget) are free."""
        weight = min(max(pixels, 0), self.capacity)
        await self._take(weight)
        loop = asyncio.get_running_loop()
        try:
            done = self._threads.submit(work)
        except BaseException:
            self._give_back(weight)
            raise
        done.add_done_callback(lambda _: _call_on(loop, self._give_back, weight))
        return await asyncio.wrap_future(done)

    @property
    def waiting(self) -> int:
        """Decodes waiting for pixels."""
        return len(self._waiting)

    async def _take(self, weight: int) -> None:
        if not self._waiting and weight <= self.free:
            self.free -= weight
            return
        turn: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        entry = (weight, turn)
        self._waiting.append(entry)
        try:
            await turn
        except asyncio.CancelledError:
            if turn.cancelled():  # still in line: leave it, and let those behind move up
                with contextlib.suppress(ValueError):  # `_hand_out` may have passed it over
                    self._waiting.remove(entry)
                self._hand_out()
            else:  # granted just as it was cancelled
                self._give_back(weight)
            raise

    def _give_back(self, weight: int) -> None:
        self.free += weight
        self._hand_out()

    def _hand_out(self) -> None:
        """Grant the waiting decodes in order while their pixels are free. A turn cancelled
        but whose task has not run yet (a request's decodes are cancelled in one go) is passed
        over, whatever its size: granting it had lost its pixels for good, and starved every
        image that needs the whole budget, and all behind it."""
        while self._waiting:
            weight, turn = self._waiting[0]
            if not turn.done() and weight > self.free:
                return
            self._waiting.popleft()
            if not turn.done():
                self.free -= weight
                turn.set_result(None)


def _call_on(loop: asyncio.AbstractEventLoop, callback: Callable[[int], None], arg: int) -> None:
    """`callback(arg)` on `loop`'s thread, from a pool thread's done callback (or from the loop
    itself, where a queued work item is cancelled); nothing once the loop is closed (the worker
    is stopping)."""
    try:
        loop.call_soon_threadsafe(callback, arg)
    except RuntimeError:
        pass
