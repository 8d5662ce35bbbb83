"""Concurrent callers' rows: each encoded once, chunk by chunk, handed over when a caller leaves.
The keys here are prompts; the encoder is a function of the prompt whose calls the tests hold and
release."""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any

import numpy as np
import prometheus_client
import pytest

from clip_runner.model.encodings_in_flight import EncodingsInFlight, in_order


def vector(prompt: str) -> np.ndarray:
    """A prompt's stand-in embedding: distinct for the prompts these tests use."""
    return np.array([len(prompt), sum(map(ord, prompt))], dtype=np.float32)


class HeldEncoder:
    """Records each call's prompts; a call returns once `release()` lets it (or at once when
    not holding), and then fails if `fail_next` says so."""

    def __init__(self, holding: bool = False) -> None:
        self.calls: list[list[str]] = []
        self.holding = holding
        self.fail_next = False
        self._released = asyncio.Semaphore(0)

    def release(self, calls: int = 1) -> None:
        for _ in range(calls):
            self._released.release()

    async def __call__(self, prompts: list[str]) -> np.ndarray:
        self.calls.append(list(prompts))
        if self.holding:
            await self._released.acquire()
        else:
            await asyncio.sleep(0)
        if self.fail_next:
            self.fail_next = False
            raise RuntimeError("the runner call failed")
        return np.stack([vector(prompt) for prompt in prompts])


async def settle() -> None:
    """Let every ready task run until each waits on something outside the loop's queue."""
    for _ in range(20):
        await asyncio.sleep(0)


def run(flow: Coroutine[Any, Any, None]) -> None:
    """A test's flow, failed rather than hung where a request waits for a chunk forever."""
    asyncio.run(asyncio.wait_for(flow, 10))


async def started(
    shared: EncodingsInFlight[str], encoder: HeldEncoder, prompts: str
) -> asyncio.Future[np.ndarray]:
    """A request for `prompts` (one character each, chunks of 4), run until it waits."""
    request = asyncio.ensure_future(shared.embeddings(list(prompts), encoder, 4))
    await settle()
    return request


def assert_embeddings(found: np.ndarray, prompts: list[str]) -> None:
    """`found` holds the prompts' embeddings in their order."""
    np.testing.assert_array_equal(found, np.stack([vector(prompt) for prompt in prompts]))


def test_concurrent_requests_encode_each_prompt_once():
    async def go():
        shared, encoder = EncodingsInFlight(), HeldEncoder()
        requests = [
            [f"p{i}" for i in range(0, 30)],
            [f"p{i}" for i in range(10, 50)],
            [f"p{i}" for i in range(25, 35)],
        ]
        answers = await asyncio.gather(
            *[shared.embeddings(prompts, encoder, 8) for prompts in requests]
        )
        for prompts, found in zip(requests, answers, strict=True):
            assert_embeddings(found, prompts)
        encoded = [prompt for call in encoder.calls for prompt in call]
        assert sorted(encoded) == sorted(f"p{i}" for i in range(50))
        assert max(len(call) for call in encoder.calls) == 8
        assert len(shared) == 0

    run(go())


def test_each_chunk_is_handed_to_its_waiters_as_soon_as_it_is_back():
    async def go():
        shared, encoder = EncodingsInFlight(), HeldEncoder(holding=True)
        prompts = [f"p{i}" for i in range(10)]
        owner = asyncio.ensure_future(shared.embeddings(prompts, encoder, 4))
        await settle()
        waiter = asyncio.ensure_future(shared.embeddings(["p2", "p1"], encoder, 4))
        encoder.release()  # the first chunk
        found = await waiter
        assert_embeddings(found, ["p2", "p1"])  # in the order asked
        assert not owner.done() and encoder.calls == [prompts[:4], prompts[4:8]]
        encoder.release(2)
        assert_embeddings(await owner, prompts)
        assert encoder.calls == [prompts[:4], prompts[4:8], prompts[8:]]

    run(go())


def test_a_request_that_leaves_hands_its_unfinished_chunks_to_its_waiters():
    async def go():
        shared, encoder = EncodingsInFlight(), HeldEncoder(holding=True)
        owner = await started(shared, encoder, "abcdefgh")
        encoder.release()  # a-d are back; e-h are being encoded
        await settle()
        waiter = await started(shared, encoder, "ef")
        assert encoder.calls == [list("abcd"), list("efgh")]
        owner.cancel()
        await settle()
        assert encoder.calls[-1] == list("ef")
        encoder.release(2)
        assert_embeddings(await waiter, list("ef"))
        assert len(shared) == 0
        with pytest.raises(asyncio.CancelledError):
            await owner

    run(go())


def test_a_waiter_that_leaves_does_not_stop_the_chunk_it_waited_for():
    async def go():
        shared, encoder = EncodingsInFlight(), HeldEncoder(holding=True)
        owner = await started(shared, encoder, "abc")
        waiter = await started(shared, encoder, "ab")
        waiter.cancel()
        await settle()
        encoder.release()
        assert_embeddings(await owner, list("abc"))
        assert encoder.calls == [list("abc")]

    run(go())


def test_a_failed_chunk_fails_its_waiters_with_the_same_error():
    async def go():
        shared, encoder = EncodingsInFlight(), HeldEncoder(holding=True)
        owner = await started(shared, encoder, "abcdef")
        waiter = await started(shared, encoder, "bcf")  # f: not under way, so its own
        assert encoder.calls == [list("abcd"), ["f"]]
        encoder.fail_next = True
        encoder.release()
        with pytest.raises(RuntimeError, match="the runner call failed"):
            await owner
        encoder.release()  # the waiter's own f
        with pytest.raises(RuntimeError, match="the runner call failed"):
            await waiter
        assert encoder.calls == [list("abcd"), ["f"]]  # nobody met the failing runner again
        assert len(shared) == 0
        encoder.holding = False
        assert_embeddings(await shared.embeddings(list("bc"), encoder, 4), list("bc"))

    run(go())


def test_a_caller_that_comes_after_a_failure_encodes_afresh():
    """A failed chunk's error is for its waiters; a caller that comes after it (the runner
    back) encodes the keys again, though an earlier caller that wants them is still running
    (the chunk had stayed, and every caller after it got its error while such callers
    overlapped)."""

    async def go():
        shared, encoder = EncodingsInFlight(), HeldEncoder(holding=True)
        failing = await started(shared, encoder, "abcd")
        holder = await started(shared, encoder, "wxyzab")  # wxyz first; a, b not reached yet
        assert encoder.calls == [list("abcd"), list("wxyz")]
        encoder.fail_next = True
        encoder.release()  # abcd fails
        with pytest.raises(RuntimeError, match="the runner call failed"):
            await failing
        later = await started(shared, encoder, "ab")
        assert encoder.calls[-1] == ["a", "b"]  # encoded again, not the old error
        encoder.release(3)
        assert_embeddings(await later, ["a", "b"])
        assert_embeddings(await holder, list("wxyzab"))
        assert len(shared) == 0

    run(go())


def test_a_caller_waits_only_for_chunks_under_way():
    """A one-prompt request whose prompt comes late in a large request's prompts is encoded
    at once, not after the large request's earlier chunks; the large one takes it when it gets
    there, and nothing is encoded twice."""

    async def go():
        shared, encoder = EncodingsInFlight(), HeldEncoder(holding=True)
        large = await started(shared, encoder, "abcdefghijkl")
        small = await started(shared, encoder, "k")
        assert encoder.calls == [list("abcd"), ["k"]]
        encoder.release(2)
        assert_embeddings(await small, ["k"])
        encoder.release(2)
        assert_embeddings(await large, list("abcdefghijkl"))
        assert encoder.calls == [list("abcd"), ["k"], list("efgh"), list("ijl")]
        assert len(shared) == 0

    run(go())


def test_a_chunk_back_before_another_caller_reaches_it_is_not_encoded_again():
    async def go():
        shared, encoder = EncodingsInFlight(), HeldEncoder(holding=True)
        first = await started(shared, encoder, "abcdefgh")
        second = await started(shared, encoder, "efghabcd")  # efgh: its own, first's next
        encoder.release(2)
        await asyncio.gather(first, second)
        assert encoder.calls == [list("abcd"), list("efgh")]
        assert len(shared) == 0

    run(go())


def test_rows_come_in_the_order_asked_however_the_chunks_held_them():
    rows = {key: vector(key) for key in "abcdef"}

    def piece(keys: str) -> tuple[list[str], np.ndarray]:
        return list(keys), np.stack([rows[key] for key in keys])

    alone = piece("abc")
    assert in_order(list("abc"), [alone]) is alone[1]  # one caller's own chunk, as it came
    assert_embeddings(in_order(list("abcd"), [piece("ab"), piece("cd")]), list("abcd"))
    # another caller's chunk holds keys this one did not ask for
    assert_embeddings(in_order(list("eab"), [piece("ab"), piece("def")]), list("eab"))


def test_each_callers_keys_are_counted_as_encoded_or_shared():
    """A key another caller is encoding as this one comes is awaited, not encoded again: it
    counts as shared, not as a miss (the cache's lookup counts only the hits)."""
    lookups = prometheus_client.Counter(
        "lookups", "test", ["result"], registry=prometheus_client.CollectorRegistry()
    )

    async def go():
        shared, encoder = EncodingsInFlight(lookups), HeldEncoder(holding=True)
        first = await started(shared, encoder, "abcdefgh")
        second = await started(shared, encoder, "efghijkl")
        encoder.release(4)
        await asyncio.gather(first, second)

    run(go())
    samples = lookups.collect()[0].samples
    counted = {s.labels["result"]: s.value for s in samples if s.name.endswith("_total")}
    assert counted == {"miss": 12.0, "shared": 4.0}
