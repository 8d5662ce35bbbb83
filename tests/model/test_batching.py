"""The greedy batcher: merging, splitting, order, errors and the queue-wait bound."""

from __future__ import annotations

import asyncio
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from clip_runner.model.batching import (
    GreedyBatcher,
    PassSlots,
    QueueWaitExceeded,
    concatenate,
    in_executor,
    split_rows,
    take_batch,
)


class Recorder:
    """An `infer` that records its batch sizes and can be held until released."""

    def __init__(self) -> None:
        self.batches: list[int] = []
        self.threads: list[int] = []
        self.gate = threading.Event()
        self.gate.set()

    def __call__(self, rows: np.ndarray | list, threads: int = 1) -> np.ndarray:
        self.gate.wait(10)
        self.batches.append(len(rows))
        self.threads.append(threads)
        if isinstance(rows, list):
            return np.array([[float(len(text))] for text in rows])
        return np.asarray(rows, dtype=np.float64) * 2


async def held_first_pass(
    infer: Recorder, executor: ThreadPoolExecutor, max_queue_wait_s: float
) -> tuple[GreedyBatcher, asyncio.Future]:
    """A batcher whose first pass (one row) has started and is held at `infer`'s gate."""
    infer.gate.clear()
    batcher = GreedyBatcher(
        in_executor(infer, executor), max_rows=8, max_queue_wait_s=max_queue_wait_s
    )
    running = asyncio.ensure_future(batcher.submit(np.ones((1, 1))))
    await asyncio.sleep(0.01)
    return batcher, running


@pytest.fixture
def executor():
    with ThreadPoolExecutor(max_workers=1) as pool:
        yield pool


def test_take_batch_fills_up_to_the_limit_and_keeps_order():
    queue = deque(type("J", (), {"rows": [0] * n})() for n in (3, 2, 4, 1))
    first = take_batch(queue, 6)
    assert [len(job.rows) for job in first] == [3, 2]
    assert [len(job.rows) for job in take_batch(queue, 6)] == [4, 1]
    assert take_batch(queue, 6) == []


def test_an_oversized_first_request_goes_whole():
    queue = deque(type("J", (), {"rows": [0] * n})() for n in (9, 1))
    assert [len(job.rows) for job in take_batch(queue, 4)] == [9]


def test_concatenate_and_split_are_inverse():
    parts = [np.arange(6).reshape(3, 2), np.arange(6, 8).reshape(1, 2)]
    merged = concatenate(parts)
    assert merged.shape == (4, 2)
    back = split_rows(merged, [3, 1])
    assert all(np.array_equal(a, b) for a, b in zip(parts, back, strict=True))
    assert concatenate([["a", "b"], ["c"]]) == ["a", "b", "c"]


def test_concurrent_requests_share_forward_passes_and_get_their_own_rows(executor):
    infer = Recorder()
    infer.gate.clear()  # hold the first pass so the rest queue behind it

    async def scenario():
        batcher = GreedyBatcher(in_executor(infer, executor), max_rows=8, max_queue_wait_s=10)
        calls = [batcher.submit(np.full((1, 2), i)) for i in range(12)]
        tasks = [asyncio.ensure_future(call) for call in calls]
        await asyncio.sleep(0.05)
        infer.gate.set()
        return await asyncio.gather(*tasks)

    results = asyncio.run(scenario())
    for i, result in enumerate(results):
        assert np.array_equal(result, np.full((1, 2), 2 * i))
    # All twelve arrived before the first pass began: batches of at most 8, in arrival order.
    assert infer.batches == [8, 4]


def test_a_lone_request_runs_at_once_even_after_a_burst(executor):
    """No learned wait: after a burst, a single request is its own batch, dispatched at once."""
    infer = Recorder()

    async def scenario():
        batcher = GreedyBatcher(in_executor(infer, executor), max_rows=32, max_queue_wait_s=10)
        await asyncio.gather(*(batcher.submit(np.ones((1, 1))) for _ in range(40)))
        infer.batches.clear()
        await batcher.submit(np.ones((1, 1)))

    asyncio.run(scenario())
    assert infer.batches == [1]


def test_text_batches_are_joined_lists(executor):
    infer = Recorder()

    async def scenario():
        batcher = GreedyBatcher(in_executor(infer, executor), max_rows=8, max_queue_wait_s=10)
        return await asyncio.gather(batcher.submit(["a", "bb"]), batcher.submit(["ccc"]))

    first, second = asyncio.run(scenario())
    assert first.tolist() == [[1.0], [2.0]]
    assert second.tolist() == [[3.0]]


def _raises(rows: np.ndarray) -> np.ndarray:
    raise RuntimeError("broken batch")


def _one_row_short(rows: np.ndarray) -> np.ndarray:
    # Rows are handed back by position: one missing would give a caller another's row.
    return rows[1:]


@pytest.mark.parametrize(
    ("first_pass", "error"),
    [(_raises, "broken batch"), (_one_row_short, "1 rows answered for 2 sent")],
)
def test_a_failed_pass_fails_its_batch_and_the_batcher_keeps_serving(executor, first_pass, error):
    calls = []

    def infer(rows: np.ndarray, threads: int) -> np.ndarray:
        calls.append(len(rows))
        return first_pass(rows) if len(calls) == 1 else rows

    async def scenario():
        batcher = GreedyBatcher(in_executor(infer, executor), max_rows=8, max_queue_wait_s=10)
        with pytest.raises(RuntimeError, match=error):
            await batcher.submit(np.ones((2, 1)))
        return await batcher.submit(np.zeros((1, 1)))

    assert asyncio.run(scenario()).tolist() == [[0.0]]


class PassMeter:
    """An async `run` counting passes at once; its first pass raises CancelledError."""

    def __init__(self) -> None:
        self.calls = self.running = self.most_at_once = 0

    async def __call__(self, rows: np.ndarray, threads: int) -> np.ndarray:
        self.calls += 1
        self.running += 1
        self.most_at_once = max(self.most_at_once, self.running)
        try:
            await asyncio.sleep(0.01)
            if self.calls == 1:
                raise asyncio.CancelledError  # as a library may raise on its own
            return rows * 2
        finally:
            self.running -= 1


def test_a_pass_interrupted_by_a_library_fails_its_callers_and_the_queue_is_served_on():
    """A CancelledError out of a pass, where nothing cancelled the batcher: its callers get an
    error instead of waiting for good, and the one worker serves the requests queued behind."""
    run = PassMeter()

    async def scenario():
        batcher = GreedyBatcher(run, max_rows=1, max_queue_wait_s=10, slots=PassSlots(1, 1, 1))
        submitted = [asyncio.ensure_future(batcher.submit(np.full((1, 1), i))) for i in range(3)]
        return await asyncio.wait_for(asyncio.gather(*submitted, return_exceptions=True), 5)

    first, *rest = asyncio.run(scenario())
    assert isinstance(first, RuntimeError) and "interrupted" in str(first)
    assert [float(result[0, 0]) for result in rest] == [2.0, 4.0]


def test_a_stopped_worker_fails_its_callers_and_only_it_is_replaced():
    """A worker cancelled from outside (the loop's end) fails its pass's callers and ends; the
    next request replaces the ended worker alone, so no more passes run at once than there are
    slots (every worker had been started anew, beside one still in its pass)."""
    run = PassMeter()
    run.calls = 1  # no CancelledError of its own
    held = asyncio.Event()
    in_pass: list[asyncio.Task] = []

    async def first_pass_held(rows: np.ndarray, threads: int) -> np.ndarray:
        run.running += 1  # a held pass counts too
        run.most_at_once = max(run.most_at_once, run.running)
        try:
            if not in_pass:
                in_pass.append(asyncio.current_task())  # the worker running this pass
                await held.wait()
            await asyncio.sleep(0.01)
            return rows * 2
        finally:
            run.running -= 1

    async def scenario():
        batcher = GreedyBatcher(
            first_pass_held, max_rows=1, max_queue_wait_s=10, slots=PassSlots(2, 2, 1)
        )
        first = asyncio.ensure_future(batcher.submit(np.full((1, 1), 100)))
        await until(lambda: bool(in_pass))
        (idle,) = [w for w in batcher._workers if w is not in_pass[0]]
        idle.cancel()  # one worker ends while the other is in its pass
        await asyncio.sleep(0.01)
        flood = [asyncio.ensure_future(batcher.submit(np.full((1, 1), i))) for i in range(12)]
        await asyncio.sleep(0.05)
        held.set()
        answers = await asyncio.wait_for(asyncio.gather(first, *flood), 5)
        # Then the worker in a pass is stopped: its callers hear of it.
        held.clear()
        in_pass.clear()
        stopped = asyncio.ensure_future(batcher.submit(np.ones((1, 1))))
        await until(lambda: bool(in_pass))
        in_pass[0].cancel()
        with pytest.raises(RuntimeError, match="interrupted"):
            await asyncio.wait_for(stopped, 5)
        return [float(answer[0, 0]) for answer in answers]

    assert asyncio.run(scenario()) == [200.0] + [2.0 * i for i in range(12)]
    assert run.most_at_once == 2


def test_requests_queued_past_the_bound_are_refused(executor):
    infer = Recorder()

    async def scenario():
        batcher, running = await held_first_pass(infer, executor, max_queue_wait_s=0.05)
        queued = asyncio.ensure_future(batcher.submit(np.ones((1, 1))))
        await asyncio.sleep(0.2)  # the queued one now waited past the bound
        infer.gate.set()
        await running
        with pytest.raises(QueueWaitExceeded, match="over the 0.05 s bound"):
            await queued

    asyncio.run(scenario())
    assert infer.batches == [1]


def test_requests_queued_past_the_bound_behind_a_failed_batch_get_its_error():
    """An API worker's merged runner call that the runner never answered fails after both
    attempts; the requests queued behind it meanwhile had been told QueueWaitExceeded (503
    `overloaded`: "the model's queue is full") while the runner was down. They get the call's
    error; one that had not waited past the bound still runs."""

    async def unanswered_call(rows: np.ndarray, threads: int) -> np.ndarray:
        await asyncio.sleep(1.0)  # the attempts' time
        if len(rows) == 1 and rows[0, 0] == 1:
            raise ConnectionError("runner gone")
        return rows * 2

    async def scenario():
        batcher = GreedyBatcher(unanswered_call, max_rows=8, max_queue_wait_s=0.4)
        first = asyncio.ensure_future(batcher.submit(np.ones((1, 1))))
        await asyncio.sleep(0.05)
        behind = asyncio.ensure_future(batcher.submit(np.full((1, 1), 2.0)))  # waits 0.95 s
        await asyncio.sleep(0.8)
        fresh = asyncio.ensure_future(batcher.submit(np.full((1, 1), 3.0)))  # waits 0.15 s
        return await asyncio.gather(first, behind, fresh, return_exceptions=True)

    first, behind, fresh = asyncio.run(scenario())
    assert isinstance(first, ConnectionError) and behind is first
    np.testing.assert_array_equal(fresh, [[6.0]])


def test_a_caller_that_left_is_not_encoded(executor):
    infer = Recorder()

    async def scenario():
        batcher, running = await held_first_pass(infer, executor, max_queue_wait_s=10)
        gone = asyncio.ensure_future(batcher.submit(np.ones((3, 1))))
        stays = asyncio.ensure_future(batcher.submit(np.ones((1, 1))))
        await asyncio.sleep(0.01)
        gone.cancel()
        infer.gate.set()
        await asyncio.gather(running, stays)

    asyncio.run(scenario())
    assert infer.batches == [1, 1]


def test_a_request_over_the_limit_runs_in_passes_of_at_most_the_limit_and_keeps_order(executor):
    infer = Recorder()

    async def scenario():
        batcher = GreedyBatcher(in_executor(infer, executor), max_rows=8, max_queue_wait_s=10)
        return await batcher.submit(np.arange(20.0).reshape(20, 1))

    assert asyncio.run(scenario()).ravel().tolist() == [2.0 * i for i in range(20)]
    assert infer.batches == [8, 8, 4]


def test_other_requests_take_turns_between_the_parts_of_a_large_one(executor):
    """One pass slot: the large request has one part queued at a time, so a small request
    that came after it runs after its first part, not after all of them, and waits no
    longer than any job does behind one batch."""
    infer = Recorder()

    async def scenario():
        batcher, running = await held_first_pass(infer, executor, max_queue_wait_s=10)
        large = asyncio.ensure_future(batcher.submit(np.ones((20, 1))))
        await asyncio.sleep(0.01)
        small = asyncio.ensure_future(batcher.submit(np.ones((1, 1))))
        await asyncio.sleep(0.01)
        infer.gate.set()
        await asyncio.gather(running, large, small)

    asyncio.run(scenario())
    assert infer.batches == [1, 8, 1, 8, 4]


def test_the_queued_parts_of_a_split_request_are_dropped_when_its_caller_leaves(executor):
    infer = Recorder()

    async def scenario():
        batcher, running = await held_first_pass(infer, executor, max_queue_wait_s=10)
        gone = asyncio.ensure_future(batcher.submit(np.ones((20, 1))))
        await asyncio.sleep(0.01)
        gone.cancel()
        infer.gate.set()
        await running
        return await batcher.submit(np.ones((2, 1)))

    assert asyncio.run(scenario()).tolist() == [[2.0], [2.0]]
    assert infer.batches == [1, 2]


def test_when_a_part_fails_the_parts_still_queued_are_dropped(executor):
    calls = []

    def infer(rows: np.ndarray, threads: int) -> np.ndarray:
        calls.append(len(rows))
        raise RuntimeError("broken batch")

    async def scenario():
        batcher = GreedyBatcher(in_executor(infer, executor), max_rows=8, max_queue_wait_s=10)
        with pytest.raises(RuntimeError, match="broken batch"):
            await batcher.submit(np.ones((40, 1)))
        await asyncio.sleep(0.05)  # nothing more runs

    asyncio.run(scenario())
    # The worker may take the next part before the failure reaches the caller; of the five
    # parts, the ones still queued then are dropped.
    assert calls in ([8], [8, 8])


def test_empty_requests_are_refused(executor):
    async def scenario():
        batcher = GreedyBatcher(in_executor(Recorder(), executor), max_rows=8, max_queue_wait_s=10)
        await batcher.submit(np.zeros((0, 1)))

    with pytest.raises(ValueError, match="nothing to encode"):
        asyncio.run(scenario())


def test_requests_that_cannot_be_stacked_fail_alone_and_the_batcher_keeps_serving(executor):
    infer = Recorder()

    async def scenario():
        batcher, running = await held_first_pass(infer, executor, max_queue_wait_s=10)
        mismatched = [
            asyncio.ensure_future(batcher.submit(np.ones((1, width)))) for width in (1, 2)
        ]
        await asyncio.sleep(0.01)
        infer.gate.set()
        await running
        for call in mismatched:
            with pytest.raises(ValueError):
                await call
        return await batcher.submit(np.ones((1, 3)))

    assert asyncio.run(scenario()).tolist() == [[2.0, 2.0, 2.0]]


class ConcurrencyMeter(Recorder):
    """A Recorder that also counts how many passes run at the same moment."""

    def __init__(self) -> None:
        super().__init__()
        self.running = 0
        self.most_at_once = 0
        self.lock = threading.Lock()

    def __call__(self, rows: np.ndarray | list, threads: int = 1) -> np.ndarray:
        with self.lock:
            self.running += 1
            self.most_at_once = max(self.most_at_once, self.running)
        try:
            return super().__call__(rows, threads)
        finally:
            with self.lock:
                self.running -= 1


async def until(condition: Callable[[], bool], within_s: float = 10) -> None:
    """Waits for `condition` (a pass's thread reaching the gate), not a fixed time that a busy
    machine may overrun; after `within_s` the test's own assertions say what did not happen."""
    deadline = time.monotonic() + within_s
    while not condition() and time.monotonic() < deadline:
        await asyncio.sleep(0.005)


def test_two_passes_run_at_once_and_split_the_queue_fairly():
    infer = ConcurrencyMeter()
    infer.gate.clear()  # both passes start, then are held together

    async def scenario():
        batcher = GreedyBatcher(
            in_executor(infer, pool), max_rows=8, max_queue_wait_s=10, slots=PassSlots(2, 2, 1)
        )
        tasks = [asyncio.ensure_future(batcher.submit(np.full((1, 1), i))) for i in range(10)]
        await until(lambda: infer.running == 2)  # both passes are held at the gate
        infer.gate.set()
        return await asyncio.gather(*tasks)

    with ThreadPoolExecutor(max_workers=2) as pool:
        results = asyncio.run(scenario())
    assert [float(result[0, 0]) for result in results] == [2.0 * i for i in range(10)]
    assert infer.most_at_once == 2
    # Ten queued, two free workers: five each, not eight for one and two for the other, each
    # pass on its share of the threads.
    assert sorted(infer.batches) == [5, 5] and infer.threads == [1, 1]


def test_a_lone_batch_runs_on_every_thread_and_alone():
    """Nothing running and nothing queued behind it: all threads, and no second pass beside it
    (that would oversubscribe the cores); the request arriving meanwhile waits its turn."""
    infer = ConcurrencyMeter()

    async def scenario():
        batcher = GreedyBatcher(
            in_executor(infer, pool), max_rows=8, max_queue_wait_s=10, slots=PassSlots(2, 2, 1)
        )
        infer.gate.clear()
        first = asyncio.ensure_future(batcher.submit(np.ones((1, 1))))
        await until(lambda: infer.running == 1)  # the first pass is running, held at the gate
        second = asyncio.ensure_future(batcher.submit(np.ones((2, 1))))
        await asyncio.sleep(0.05)
        running_while_held = infer.running
        infer.gate.set()
        await asyncio.gather(first, second)
        return running_while_held

    with ThreadPoolExecutor(max_workers=2) as pool:
        assert asyncio.run(scenario()) == 1
    assert infer.batches == [1, 2] and infer.threads == [2, 2]  # each alone in its turn
