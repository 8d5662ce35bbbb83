"""Requests whose headers have arrived but not yet their whole body, bounded in count and bytes.

A request takes an admission slot only once its body is complete (see traffic.py), so a slow
upload costs no slot, only a connection and the bytes received so far. `WaitingBodies` bounds
both. When one more request would pass `max_count`, or a chunk would pass `max_bytes`, the
request that has waited longest is cut short: its body deadline is moved to now, and it is
answered 408 like any body that did not arrive in time. Cutting the oldest rather than refusing
the newest means a flood of slow uploads cannot lock out ordinary requests, whose bodies arrive
in milliseconds; the flood only shortens its own connections' lives.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass


@dataclass(eq=False)
class Waiter:
    """One request reading its body; `cut_short` ends its wait (the caller answers 408)."""

    cut_short: Callable[[], None]
    size: int = 0
    evicted_because: str | None = None  # set when cut short to make room: which bound was hit


class WaitingBodies:
    """The waiting requests of one API worker, oldest first (one event loop: no locks)."""

    def __init__(self, max_count: int, max_bytes: int) -> None:
        self.max_count = max_count
        self.max_bytes = max_bytes
        self._waiters: dict[Waiter, None] = {}  # insertion-ordered: the oldest first
        self.bytes = 0

    def __len__(self) -> int:
        return len(self._waiters)

    def enter(self, waiter: Waiter) -> None:
        """Start waiting for a body; the oldest waiters make room when the count is at its bound."""
        while len(self._waiters) >= self.max_count:
            reason = f"{self.max_count} requests were waiting for their bodies"
            self._evict(next(iter(self._waiters)), reason + " (CLIP_MAX_WAITING_BODIES)")
        self._waiters[waiter] = None

    def received(self, waiter: Waiter, size: int) -> None:
        """Count `size` more bytes of `waiter`'s body; older waiters make room past `max_bytes`.

        One body never exceeds the request body limit, which is at most `max_bytes`, so evicting
        the others always makes room.
        """
        if waiter not in self._waiters:
            return  # already cut short; its deadline fires on the next loop iteration
        waiter.size += size
        self.bytes += size
        for oldest in list(self._waiters):
            if self.bytes <= self.max_bytes:
                break
            if oldest is not waiter:
                reason = f"the bodies being received passed {self.max_bytes} bytes"
                self._evict(oldest, reason + " (CLIP_MAX_WAITING_BODY_BYTES)")

    def leave(self, waiter: Waiter) -> None:
        """The body arrived, failed or was abandoned: its bytes are no longer held here."""
        if waiter in self._waiters:
            del self._waiters[waiter]
            self.bytes -= waiter.size

    def _evict(self, waiter: Waiter, reason: str) -> None:
        self.leave(waiter)
        waiter.evicted_because = reason
        waiter.cut_short()
