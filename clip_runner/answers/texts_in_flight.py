"""Prompts being encoded, shared by an API worker's concurrent requests and kept chunk by chunk.

A request's uncached prompts used to be encoded by that request alone and cached at its end. So
concurrent requests carrying the same new prompts each encoded all of them, and a request that
ran out of time kept none of its work. Measured before (tiny model, 2 cores, 1,000 labels x 80
templates, which one request alone has answered in 15-21 s): four such requests at once all ended
504 after 55 s, and so did the four sent again, since nothing had been cached: a client retrying
a cold ensemble never got an answer.

Now a request encodes only the prompts no other request of the worker is encoding, in chunks
each handed to the cache and to the requests waiting for it as soon as it is back, and waits for
the rest. A chunk whose request leaves (its client gone, its time up) is dropped, and the
requests waiting for it encode those prompts themselves. A chunk whose runner call failed fails
its waiters with the same error: they would have met the same runner, and retrying it after the
failed attempts (two attempts of half the request's time) answered them 504 past their deadline
where the failed request answered a clear 503 (`tests/test_faults.py`, with the runner frozen).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass

import numpy as np

# Prompts -> their embeddings, in order (and cached by the caller).
EncodeChunk = Callable[[list[str]], Awaitable[np.ndarray]]


@dataclass(eq=False)
class Chunk:
    """Prompts a request encodes together (several runner calls: the batcher splits them into
    passes); `done` holds their embeddings."""

    prompts: list[str]
    done: asyncio.Future[np.ndarray]


class TextsInFlight:
    """One per API worker: which chunk is encoding each prompt now, by (model tag, prompt)."""

    def __init__(self) -> None:
        self._chunks: dict[tuple[str, str], Chunk] = {}

    def __len__(self) -> int:
        return len(self._chunks)

    async def embeddings(
        self, tag: str, prompts: Sequence[str], encode: EncodeChunk, chunk_size: int
    ) -> dict[str, np.ndarray]:
        """The embedding of each of `prompts` (distinct, uncached): those no other request is
        encoding are encoded here, `chunk_size` at a time; the others are awaited, and taken
        over where the request encoding them leaves (its runner error is raised here too)."""
        found: dict[str, np.ndarray] = {}
        waiting = list(prompts)
        while waiting:
            theirs = {chunk for p in waiting if (chunk := self._chunks.get((tag, p)))}
            ours = [p for p in waiting if (tag, p) not in self._chunks]
            await self._encode(tag, ours, encode, chunk_size, found)
            if theirs:
                # wait() leaves the chunks alone if this request is cancelled meanwhile
                await asyncio.wait([chunk.done for chunk in theirs])
                for chunk in theirs:
                    if not chunk.done.cancelled():
                        found.update(zip(chunk.prompts, chunk.done.result(), strict=True))
            waiting = [p for p in waiting if p not in found]
        return found

    async def _encode(
        self,
        tag: str,
        prompts: list[str],
        encode: EncodeChunk,
        chunk_size: int,
        found: dict[str, np.ndarray],
    ) -> None:
        """Encode `prompts` chunk by chunk into `found`, every chunk claimed before the first
        call so that concurrent requests wait for it rather than encode it again."""
        loop = asyncio.get_running_loop()
        chunks = [
            Chunk(prompts[start : start + chunk_size], loop.create_future())
            for start in range(0, len(prompts), chunk_size)
        ]
        for chunk in chunks:
            self._chunks.update(((tag, prompt), chunk) for prompt in chunk.prompts)
        failure: Exception | None = None
        try:
            for chunk in chunks:
                embeddings = await encode(chunk.prompts)
                found.update(zip(chunk.prompts, embeddings, strict=True))
                chunk.done.set_result(embeddings)
                self._release(tag, chunk)
        except Exception as error:
            failure = error
            raise
        finally:
            self._end_unfinished(tag, chunks, failure)

    def _end_unfinished(self, tag: str, chunks: list[Chunk], error: Exception | None) -> None:
        """Release the chunks not encoded: failed with the runner's `error` (unavailable,
        overloaded), so their waiters get the same answer now rather than meet that runner
        again past their own deadlines; dropped where the request left (`error` None), so
        their waiters encode them themselves."""
        for chunk in chunks:
            if chunk.done.done():
                continue
            if error is None:
                chunk.done.cancel()
            else:
                chunk.done.set_exception(error)
                chunk.done.exception()  # retrieved: asyncio would log it where nobody waits
            self._release(tag, chunk)

    def _release(self, tag: str, chunk: Chunk) -> None:
        for prompt in chunk.prompts:
            del self._chunks[(tag, prompt)]
