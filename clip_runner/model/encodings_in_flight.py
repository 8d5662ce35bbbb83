"""Rows being encoded, shared by concurrent callers by key, and handed over chunk by chunk.

Two places encode prompts for callers that may ask for the same ones at once:

- An API worker's requests (answers/invocation.py, keys: model tag and prompt). A request's
  uncached prompts used to be encoded by that request alone and cached at its end, so
  concurrent requests carrying the same new prompts each encoded all of them, and a request
  that ran out of time kept none of its work. Measured (tiny model, 2 cores, 1,000 labels x 80
  templates, which one request alone answered in 15-21 s): four such requests at once all
  ended 504 after 55 s, and so did the four sent again.
- The runner (model/runner.py, keys: token ids), for the API workers' calls: each worker shares
  only among its own requests, so the same new ensemble sent to every worker was encoded once
  per worker (tiny model, 2 API workers, 8 concurrent requests of 1,000 x 80: 160,000 prompts
  encoded in 23-32 s; with the runner's cache beside this, 80,000 in 17-18 s).

A caller encodes only the rows no other caller is encoding, in chunks, each handed to whoever
waits for it as soon as it is back, and waits for the rest. A chunk whose caller leaves (its
client gone, its time up) is dropped, and the callers waiting for it encode those rows
themselves. A chunk whose encoding failed fails its waiters with the same error: they would
have met the same runner, and retrying it after the failed attempts (two attempts of half the
request's time) answered them 504 past their deadline where the failed request answered a
clear 503 (`tests/test_faults.py`, with the runner frozen).
"""

from __future__ import annotations

import asyncio
from asyncio import FIRST_COMPLETED
from collections import deque
from collections.abc import Awaitable, Callable, Hashable, Sequence
from dataclasses import dataclass
from typing import Generic, TypeVar

import numpy as np
from prometheus_client import Counter

from clip_runner.model.embedding_cache import count_by_result

Key = TypeVar("Key", bound=Hashable)


@dataclass(eq=False)
class Chunk(Generic[Key]):
    """Rows a caller encodes together (possibly several passes: the batcher splits them);
    `done` holds their embeddings."""

    keys: list[Key]
    done: asyncio.Future[np.ndarray]


class EncodingsInFlight(Generic[Key]):
    """Which chunk is encoding each key now; one per API worker, and one per runner worker.

    Counts on `lookups` (its cache's hit/miss counter, where given) each caller's keys: `miss`
    for those it encodes, `shared` for those it takes from another caller's chunk. Counted at
    the cache's lookup, the shared ones had read as misses: four cold requests of 800 prompts at
    once on two API workers showed 1,472 runner misses for 800 prompts encoded.
    """

    def __init__(self, lookups: Counter | None = None) -> None:
        # The chunk of each key being encoded, or encoded while a caller that wants the key is
        # still running: a caller that reaches a key after its chunk is back takes its rows
        # rather than encode it again.
        self._chunks: dict[Key, Chunk[Key]] = {}
        self._callers_wanting: dict[Key, int] = {}
        self.lookups = lookups

    def __len__(self) -> int:
        return len(self._chunks)

    async def embeddings(
        self,
        keys: Sequence[Key],
        encode: Callable[[list[Key]], Awaitable[np.ndarray]],
        chunk_size: int,
    ) -> np.ndarray:
        """The embeddings of `keys` (distinct, at least one), in order: those no other caller
        is encoding are encoded here by `encode` (keys -> their rows, in order), `chunk_size`
        at a time; the others are awaited, and taken over where the caller encoding them
        leaves (its error is raised here too).

        A chunk is claimed only as its call starts, so a caller waits only for work under way:
        with every chunk claimed up front, a one-prompt request whose prompt was among the last
        of a cold 1,000-label ensemble waited for nearly all of it (10.8 s beside a 13.7-s
        ensemble, tiny model), where a new prompt took 90 ms. Callers asking for the same new
        keys at once now share them out chunk by chunk, each still encoded once.
        """
        for key in keys:
            self._callers_wanting[key] = self._callers_wanting.get(key, 0) + 1
        try:
            return await self._gather(keys, encode, chunk_size)
        finally:
            self._forget(keys)

    async def _gather(
        self,
        keys: Sequence[Key],
        encode: Callable[[list[Key]], Awaitable[np.ndarray]],
        chunk_size: int,
    ) -> np.ndarray:
        pieces: list[tuple[list[Key], np.ndarray]] = []
        unclaimed = deque(keys)  # not yet seen in any chunk: claimed here when reached
        theirs: dict[Chunk[Key], list[Key]] = {}  # others' chunks holding some of the keys
        while unclaimed or theirs:
            ours: list[Key] = []
            while unclaimed and len(ours) < chunk_size:
                key = unclaimed.popleft()
                if (chunk := self._chunks.get(key)) is not None:
                    theirs.setdefault(chunk, []).append(key)
                else:
                    ours.append(key)
            if ours:
                self._count(miss=len(ours))
                pieces.append((ours, await self._encode(ours, encode)))
                continue
            # wait() leaves the chunks alone if this caller is cancelled meanwhile
            await asyncio.wait([chunk.done for chunk in theirs], return_when=FIRST_COMPLETED)
            for chunk in [chunk for chunk in theirs if chunk.done.done()]:
                wanted = theirs.pop(chunk)
                if chunk.done.cancelled():  # its caller left: these are anyone's again
                    unclaimed.extend(wanted)
                else:  # its error, if it failed, is raised here
                    pieces.append((chunk.keys, chunk.done.result()))
                    self._count(shared=len(wanted))
        return in_order(list(keys), pieces)

    async def _encode(
        self, keys: list[Key], encode: Callable[[list[Key]], Awaitable[np.ndarray]]
    ) -> np.ndarray:
        """Encode `keys` as one claimed chunk, handed to its waiters when it is back. Where the
        runner fails it, its waiters get the same error now rather than meet that runner again
        past their own deadlines; where this caller leaves, it is dropped, and its waiters
        encode those keys themselves."""
        chunk = Chunk(keys, asyncio.get_running_loop().create_future())
        self._chunks.update(dict.fromkeys(keys, chunk))
        try:
            embeddings = await encode(keys)
        except BaseException as error:
            # Failed: its waiters get the error (they hold the chunk); cancelled: they encode
            # the keys themselves. Either way the keys are anyone's again: a failed chunk kept
            # for later callers had given requests started after the runner recovered its
            # error, for as long as requests wanting those keys kept overlapping.
            if isinstance(error, Exception):
                chunk.done.set_exception(error)
                chunk.done.exception()  # retrieved: asyncio would log it where nobody waits
            else:
                chunk.done.cancel()
            for key in keys:
                del self._chunks[key]
            raise
        chunk.done.set_result(embeddings)
        return embeddings

    def _forget(self, keys: Sequence[Key]) -> None:
        """A caller is done with `keys`: the finished chunks of those no caller wants now go."""
        for key in keys:
            wanting = self._callers_wanting[key] - 1
            if wanting:
                self._callers_wanting[key] = wanting
                continue
            del self._callers_wanting[key]
            chunk = self._chunks.get(key)
            if chunk is not None and chunk.done.done():
                del self._chunks[key]

    def _count(self, **counts: int) -> None:
        if self.lookups is not None:
            count_by_result(self.lookups, **counts)


def in_order(keys: list[Key], pieces: Sequence[tuple[list[Key], np.ndarray]]) -> np.ndarray:
    """The rows of `keys`, in order, from pieces of (keys, their rows) that hold them all (and
    maybe more). A caller that encoded all its keys itself has them in order already: its
    chunks' rows are returned as they are, not taken apart row by row and stacked again (a
    few microseconds a prompt, on the runner's event loop)."""
    if [key for piece_keys, _ in pieces for key in piece_keys] == keys:
        return pieces[0][1] if len(pieces) == 1 else np.concatenate([rows for _, rows in pieces])
    row_of = {
        key: row for piece_keys, rows in pieces for key, row in zip(piece_keys, rows, strict=True)
    }
    return np.stack([row_of[key] for key in keys])
