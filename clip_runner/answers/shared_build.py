"""A value built once, in a task of its own, that every caller shares.

The API workers build their invocation context (the runner's model facts, its tokenizer, the
runner calls) on first use, and the readiness probe is that first use: it waits at most 1.5 s
(1.0 for a ping's own probe). Built inside the caller's task, a probe that gave up cancelled the
build, and the next probe began it again from nothing, so a build that needed longer than the
probe's wait (a throttled CPU, a large tokenizer) would never finish and `/ping` would answer
503 for good. Here the build goes on when a caller stops waiting, and the next caller waits for
the same build; only a build that failed is started again.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Generic, TypeVar

T = TypeVar("T")


class SharedBuild(Generic[T]):
    """`build()` run at most once at a time, its value kept once it succeeds."""

    def __init__(self, build: Callable[[], Awaitable[T]]) -> None:
        self._build = build
        self._task: asyncio.Task[T] | None = None
        self._value: T | None = None

    async def get(self) -> T:
        """The value; the build started (or started again, after a failure) where none runs."""
        if self._value is not None:
            return self._value
        if self._task is None or _failed(self._task):
            self._task = asyncio.ensure_future(self._build())
        # A caller that stops waiting (a probe's timeout, a client gone) leaves the build be.
        self._value = await asyncio.shield(self._task)
        return self._value


def _failed(task: asyncio.Task) -> bool:
    return task.done() and (task.cancelled() or task.exception() is not None)
