"""The API workers' context built once, surviving the readiness probe's timeouts."""

from __future__ import annotations

import asyncio

import pytest

from clip_runner.answers.shared_build import SharedBuild


def test_a_build_longer_than_the_probes_wait_finishes_across_probes():
    """Each probe waits 50 ms for a 200-ms build: cancelling the build with the probe (as
    before) began it anew every time and it never finished; here it goes on, is built once,
    and a later probe finds it done."""
    started = 0

    async def build() -> str:
        nonlocal started
        started += 1
        await asyncio.sleep(0.2)
        return "context"

    async def probes() -> int:
        shared = SharedBuild(build)
        for probe in range(40):
            try:
                assert await asyncio.wait_for(shared.get(), 0.05) == "context"
                return probe
            except TimeoutError:
                continue
        raise AssertionError("never built")

    assert asyncio.run(probes()) >= 3  # it took several probes' waits
    assert started == 1


def test_callers_share_one_build_and_a_failed_one_is_started_again():
    attempts = 0

    async def build() -> int:
        nonlocal attempts
        attempts += 1
        await asyncio.sleep(0.01)
        if attempts == 1:
            raise ConnectionError("runner not answering yet")
        return attempts

    async def scenario() -> list:
        shared = SharedBuild(build)
        first = await asyncio.gather(shared.get(), shared.get(), return_exceptions=True)
        assert all(isinstance(outcome, ConnectionError) for outcome in first)  # one build, failed
        again = await asyncio.gather(shared.get(), shared.get())
        return [*again, await shared.get()]

    assert asyncio.run(scenario()) == [2, 2, 2]
    assert attempts == 2


def test_a_caller_that_leaves_cancels_nothing_for_the_others():
    async def build() -> str:
        await asyncio.sleep(0.05)
        return "context"

    async def scenario() -> str:
        shared = SharedBuild(build)
        leaving = asyncio.ensure_future(shared.get())
        staying = asyncio.ensure_future(shared.get())
        await asyncio.sleep(0.01)
        leaving.cancel()
        with pytest.raises(asyncio.CancelledError):
            await leaving
        return await staying

    assert asyncio.run(scenario()) == "context"
