"""The worker's budget of pixels decoded at once: its bound, its order, cancellations, the
memory it saves in a real decode, and its setting on the real server."""

from __future__ import annotations

import asyncio
import dataclasses
import textwrap
import threading
import time

import pytest

from clip_runner.images.decode_budget import DecodeBudget
from clip_runner.images.fetch import FetchLimits
from clip_runner.images.loading import ImageLimits
from tests.helpers import GUARD_SETTINGS, python_output


class Recorder:
    """Work items that note the pixels in their threads at once, and may be held until let go."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.running = 0
        self.most = 0
        self.order: list[str] = []
        self.release = threading.Event()
        self.release.set()

    def work(self, name: str, pixels: int, seconds: float = 0.02):
        def run() -> str:
            with self.lock:
                self.running += pixels
                self.most = max(self.most, self.running)
                self.order.append(name)
            time.sleep(seconds)
            self.release.wait(10)
            with self.lock:
                self.running -= pixels
            return name

        return run


def held() -> Recorder:
    """A recorder whose work items wait until `release` is set."""
    recorder = Recorder()
    recorder.release.clear()
    return recorder


def started(budget: DecodeBudget, recorder: Recorder, name: str, pixels: int) -> asyncio.Future:
    """A decode of `pixels` under `budget`, recorded as `name`, run as a task of its own."""
    return asyncio.ensure_future(budget.run(pixels, recorder.work(name, pixels)))


async def settle(budget: DecodeBudget, free: int) -> None:
    """Until the budget's pixels are back to `free` (a thread's end reaches the loop by a call)."""
    for _ in range(500):
        if budget.free == free:
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"budget at {budget.free}, not {free}")


def test_the_pixels_decoding_at_once_never_pass_the_budget():
    recorder = Recorder()
    budget = DecodeBudget(100)
    sizes = [40, 30, 60, 10, 90, 20, 50, 70, 40, 30]

    async def main():
        names = [f"image{i}" for i in range(len(sizes))]
        runs = [
            budget.run(size, recorder.work(n, size)) for n, size in zip(names, sizes, strict=True)
        ]
        assert await asyncio.gather(*runs) == names  # each caller gets its own work's result
        await settle(budget, 100)

    asyncio.run(main())
    assert 60 < recorder.most <= 100  # several at once, never past the budget


def test_an_image_larger_than_the_budget_decodes_alone():
    recorder = Recorder()
    budget = DecodeBudget(100)

    async def main():
        runs = [
            budget.run(10, recorder.work("small", 10)),
            budget.run(500, recorder.work("huge", 500)),
        ]
        runs.append(budget.run(10, recorder.work("after", 10)))
        assert await asyncio.gather(*runs) == ["small", "huge", "after"]
        await settle(budget, 100)

    asyncio.run(main())
    assert recorder.most == 500  # it ran, alone: neither small one beside it


def test_decodes_wait_in_order_of_arrival():
    """A large image waiting for the budget is not passed over by smaller ones that would fit."""
    recorder = Recorder()
    budget = DecodeBudget(100)

    async def main():
        first = asyncio.ensure_future(budget.run(60, recorder.work("first", 60, 0.2)))
        await asyncio.sleep(0.05)  # running: 40 free
        large = started(budget, recorder, "large", 80)
        await asyncio.sleep(0.01)
        small = started(budget, recorder, "small", 10)
        await asyncio.gather(first, large, small)

    asyncio.run(main())
    assert recorder.order == ["first", "large", "small"]


def test_a_decode_cancelled_while_waiting_leaves_the_line():
    recorder, budget = held(), DecodeBudget(100)

    async def main():
        holder = started(budget, recorder, "holder", 100)
        await asyncio.sleep(0.05)
        waiter = started(budget, recorder, "cancelled", 50)
        behind = started(budget, recorder, "behind", 30)
        await asyncio.sleep(0.05)
        assert budget.waiting == 2
        waiter.cancel()
        await asyncio.sleep(0.01)
        assert budget.waiting == 1
        recorder.release.set()
        assert await behind == "behind" and await holder == "holder"
        await settle(budget, 100)

    asyncio.run(main())
    assert "cancelled" not in recorder.order


def test_decodes_cancelled_together_while_waiting_give_back_every_pixel():
    """A request's decodes are cancelled in one go (an image refused, the client gone): each
    waiting turn is cancelled before any of their tasks runs. Granting such a turn had lost its
    pixels for good, and an image needing the whole budget then waited forever."""
    recorder, budget = held(), DecodeBudget(40)

    async def main():
        holder = started(budget, recorder, "holder", 30)
        await asyncio.sleep(0.05)
        waiting = [started(budget, recorder, "x", 20), started(budget, recorder, "y", 5)]
        await asyncio.sleep(0.05)
        for task in waiting:
            task.cancel()
        recorder.release.set()  # the holder's thread ends as the cancels are being run
        await holder
        results = await asyncio.gather(*waiting, return_exceptions=True)
        assert all(isinstance(result, asyncio.CancelledError) for result in results), results
        await settle(budget, 40)
        assert await asyncio.wait_for(budget.run(40, recorder.work("whole", 40)), 5) == "whole"

    asyncio.run(main())


def test_a_decode_cancelled_while_running_holds_its_pixels_until_its_thread_ends():
    """Its caller stops waiting (a client gone), but its thread still decodes: the memory is
    still in use, so its pixels are too."""
    recorder, budget = held(), DecodeBudget(100)

    async def main():
        running = started(budget, recorder, "running", 70)
        await asyncio.sleep(0.05)
        running.cancel()
        await asyncio.sleep(0.05)
        assert running.cancelled() and budget.free == 30
        next_one = started(budget, recorder, "next", 50)
        await asyncio.sleep(0.05)
        assert not next_one.done() and recorder.order == ["running"]
        recorder.release.set()
        assert await next_one == "next"
        await settle(budget, 100)

    asyncio.run(main())
    assert recorder.most == 70


def test_a_decode_that_fails_gives_its_pixels_back():
    budget = DecodeBudget(100)

    def broken() -> None:
        raise ValueError("not an image")

    async def main():
        with pytest.raises(ValueError, match="not an image"):
            await budget.run(100, broken)
        await settle(budget, 100)

    asyncio.run(main())


def test_copies_of_the_limits_share_one_budget():
    """The service's context copies the worker's limits (`dataclasses.replace`): both must draw
    on the same pixels, and two workers' limits on their own."""
    limits = ImageLimits(FetchLimits(1_000, 1), 1_000, decode_budget=DecodeBudget(5))
    copy = dataclasses.replace(limits, forward_jpegs=True)
    assert copy.decode_budget is limits.decode_budget
    assert ImageLimits(FetchLimits(1_000, 1), 1_000).decode_budget is not limits.decode_budget


# Twelve 10-Mpx PNGs in six concurrent requests through `load_images`, in a fresh interpreter;
# prints how far its resident memory rose above where it was before them, in MB, sampled every
# 2 ms (its peak since start would include numba's compilation, some hundreds of MB).
MEMORY_PROBE = textwrap.dedent(
    """
    import asyncio, os, threading, time
    from PIL import Image
    from clip_runner.images.decode_budget import DecodeBudget
    from clip_runner.images.fetch import FetchLimits
    from clip_runner.images.loading import ImageGeometry, ImageLimits, load_images
    from tests.helpers import as_base64
    sources = [as_base64(Image.new("RGB", (4000, 2500), (20, 90, 200)))] * 12
    limits = ImageLimits(FetchLimits(50_000_000, 5), 50_000_000, decode_budget=DecodeBudget({cap}))
    geometry = ImageGeometry(224, 224, 224)
    def resident():
        with open("/proc/self/statm") as statm:
            return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    highest, running = [0], [True]
    def sample():
        while running[0]:
            highest[0] = max(highest[0], resident())
            time.sleep(0.002)
    async def main():
        await load_images(sources[:1], None, geometry, limits)  # warm: numba, pools
        before = resident()
        sampler = threading.Thread(target=sample)
        sampler.start()
        requests = [load_images(sources[i::6], None, geometry, limits) for i in range(6)]
        answers = await asyncio.gather(*requests)
        running[0] = False
        sampler.join()
        assert sum(len(images) for images in answers) == 12
        print((highest[0] - before) // 2**20)
    asyncio.run(main())
    """
)


def test_the_budget_bounds_a_workers_decoding_memory():
    """Six requests of two 10-Mpx PNGs each: with a budget of one such image the peak grows by
    about one decode (8.5 bytes a pixel, some 90 MB), where unbounded it grew by several."""
    unbounded = int(python_output(MEMORY_PROBE.format(cap=10**12)))
    bounded = int(python_output(MEMORY_PROBE.format(cap=10_000_000)))
    assert unbounded > 250, unbounded  # several decodes at once: the probe can tell
    assert bounded < 160 and bounded < unbounded / 2, (bounded, unbounded)


def test_the_server_says_its_budget(guarded):
    """The setting reaches the budget each API worker decodes under, and its log says so."""
    cap = int(GUARD_SETTINGS["CLIP_MAX_DECODING_PIXELS"])
    said = f"API worker: at most {cap:,} pixels decoded at once"
    assert guarded.wait_for_log(said).count(said) == 1  # one API worker
