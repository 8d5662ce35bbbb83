"""WaitingBodies: the bounds on requests still receiving their bodies, and who makes room."""

from __future__ import annotations

from clip_runner.web.waiting_bodies import Waiter, WaitingBodies


def waiters(count: int, cut: list[int]) -> list[Waiter]:
    return [Waiter(cut_short=lambda i=i: cut.append(i)) for i in range(count)]


def test_past_the_count_the_oldest_is_cut_short_and_the_newest_waits():
    cut: list[int] = []
    waiting = WaitingBodies(max_count=3, max_bytes=1000)
    first, second, third, fourth, fifth = waiters(5, cut)
    for waiter in (first, second, third):
        waiting.enter(waiter)
    assert cut == [] and len(waiting) == 3
    waiting.enter(fourth)
    waiting.enter(fifth)
    assert cut == [0, 1] and len(waiting) == 3
    assert "CLIP_MAX_WAITING_BODIES" in (first.evicted_because or "")
    assert third.evicted_because is None and fifth.evicted_because is None


def test_past_the_bytes_older_bodies_make_room_but_never_the_one_receiving():
    cut: list[int] = []
    waiting = WaitingBodies(max_count=10, max_bytes=100)
    first, second, third = waiters(3, cut)
    for waiter in (first, second, third):
        waiting.enter(waiter)
    waiting.received(first, 40)
    waiting.received(second, 40)
    waiting.received(third, 20)
    assert cut == [] and waiting.bytes == 100
    waiting.received(third, 50)  # 150 held: the oldest goes, 110 is still too many: the next
    assert cut == [0, 1] and waiting.bytes == 70
    assert "CLIP_MAX_WAITING_BODY_BYTES" in (second.evicted_because or "")
    waiting.received(first, 1000)  # a waiter already cut short counts nothing more
    assert waiting.bytes == 70


def test_leaving_gives_back_the_count_and_the_bytes_once():
    cut: list[int] = []
    waiting = WaitingBodies(max_count=2, max_bytes=100)
    first, second = waiters(2, cut)
    waiting.enter(first)
    waiting.enter(second)
    waiting.received(first, 30)
    waiting.leave(first)
    waiting.leave(first)
    assert len(waiting) == 1 and waiting.bytes == 0
    waiting.enter(first)
    assert cut == []  # there was room again
