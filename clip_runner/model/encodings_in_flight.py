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
from collections.abc import Awaitable, Callable, Hashable, Sequence
from dataclasses import dataclass
from typing import Generic, TypeVar

import numpy as np

Key = TypeVar("Key", bound=Hashable)


@dataclass(eq=False)
class Chunk(Generic[Key]):
    """Rows a caller encodes together (possibly several passes: the batcher splits them);
    `done` holds their embeddings."""

    keys: list[Key]
    done: asyncio.Future[np.ndarray]


class EncodingsInFlight(Generic[Key]):
    """Which chunk is encoding each key now; one per API worker, and one per runner worker."""

    def __init__(self) -> None:
        self._chunks: dict[Key, Chunk[Key]] = {}

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
        leaves (its error is raised here too)."""
        pieces: list[tuple[list[Key], np.ndarray]] = []
        found: set[Key] = set()
        waiting = list(keys)
        while waiting:
            theirs = {chunk for key in waiting if (chunk := self._chunks.get(key))}
            ours = [key for key in waiting if key not in self._chunks]
            await self._encode(ours, encode, chunk_size, pieces)
            if theirs:
                # wait() leaves the chunks alone if this caller is cancelled meanwhile
                await asyncio.wait([chunk.done for chunk in theirs])
                pieces.extend(
                    (chunk.keys, chunk.done.result())
                    for chunk in theirs
                    if not chunk.done.cancelled()
                )
                found.update(key for piece_keys, _ in pieces for key in piece_keys)
                waiting = [key for key in waiting if key not in found]
            else:
                waiting = []
        return in_order(list(keys), pieces)

    async def _encode(
        self,
        keys: list[Key],
        encode: Callable[[list[Key]], Awaitable[np.ndarray]],
        chunk_size: int,
        pieces: list[tuple[list[Key], np.ndarray]],
    ) -> None:
        """Encode `keys` chunk by chunk onto `pieces`, every chunk claimed before the first
        call so that concurrent callers wait for it rather than encode it again."""
        loop = asyncio.get_running_loop()
        chunks = [
            Chunk(keys[start : start + chunk_size], loop.create_future())
            for start in range(0, len(keys), chunk_size)
        ]
        for chunk in chunks:
            self._chunks.update(dict.fromkeys(chunk.keys, chunk))
        failure: Exception | None = None
        try:
            for chunk in chunks:
                embeddings = await encode(chunk.keys)
                pieces.append((chunk.keys, embeddings))
                chunk.done.set_result(embeddings)
                self._release(chunk)
        except Exception as error:
            failure = error
            raise
        finally:
            self._end_unfinished(chunks, failure)

    def _end_unfinished(self, chunks: list[Chunk[Key]], error: Exception | None) -> None:
        """Release the chunks not encoded: failed with the runner's `error` (unavailable,
        overloaded), so their waiters get the same answer now rather than meet that runner
        again past their own deadlines; dropped where the caller left (`error` None), so
        their waiters encode them themselves."""
        for chunk in chunks:
            if chunk.done.done():
                continue
            if error is None:
                chunk.done.cancel()
            else:
                chunk.done.set_exception(error)
                chunk.done.exception()  # retrieved: asyncio would log it where nobody waits
            self._release(chunk)

    def _release(self, chunk: Chunk[Key]) -> None:
        for key in chunk.keys:
            del self._chunks[key]


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
