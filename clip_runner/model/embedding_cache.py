"""A bounded LRU of text embeddings, so repeated prompts (and labels) are not encoded again.

Each API worker keeps one by (model tag, prompt), so a repeated class list costs no runner call,
and one of `/classify`'s labels ensembled over their templates (answers/invocation.py,
`plan_labels`), so a repeated ensemble costs a lookup per label. Each runner worker keeps one
too, by token ids: an API worker's cache holds only what its own requests encoded, and the same
new prompts reaching several API workers were encoded once per worker, each a little behind the
other, too late to share the other's passes in flight (model/encodings_in_flight.py).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Hashable, Sequence
from typing import Generic, TypeVar

import numpy as np
from prometheus_client import Counter

Key = TypeVar("Key", bound=Hashable)


class EmbeddingCache(Generic[Key]):
    """Maps key -> embedding, evicting the least recently used past `capacity`; counts its
    hits and misses on `lookups` (a Counter labelled by result) where given.

    With `misses_counted_elsewhere` it counts hits only: a prompt cache's misses are counted
    where they are encoded or shared (`EncodingsInFlight`), since a miss another caller is
    encoding at that moment is awaited, not encoded again.
    """

    def __init__(
        self, capacity: int, lookups: Counter | None = None, misses_counted_elsewhere: bool = False
    ) -> None:
        self.capacity = capacity
        self.lookups = lookups
        self.misses_counted_elsewhere = misses_counted_elsewhere
        self._entries: OrderedDict[Key, np.ndarray] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def lookup(self, keys: Sequence[Key]) -> list[np.ndarray | None]:
        """The cached embedding of each key, or None where it is not cached."""
        found = [self._entries.get(key) for key in keys]
        for key, embedding in zip(keys, found, strict=True):
            if embedding is not None:
                self._entries.move_to_end(key)
        if self.lookups is not None:
            hits = sum(embedding is not None for embedding in found)
            misses = 0 if self.misses_counted_elsewhere else len(found) - hits
            count_by_result(self.lookups, hit=hits, miss=misses)
        return found

    def store(self, keys: Sequence[Key], embeddings: np.ndarray) -> None:
        """Keep `keys`' rows (keys the caller found missing: added at the recent end), each a
        read-only copy of its own, which lookups share.

        A row kept as a view of `embeddings` kept all of it alive for as long as the row stayed
        cached (a 1,000-label request's array, a merged runner call's answer): 4,096 cached rows
        of 512 floats had held 307 MB of an API worker, for 8 MB of rows. Only the last
        `capacity` keys could stay, so only theirs are copied."""
        if self.capacity == 0:
            return
        pairs = list(zip(keys, embeddings, strict=True))[-self.capacity :]
        for key, row in pairs:
            kept = row.copy()
            kept.flags.writeable = False
            self._entries[key] = kept
            self._entries.move_to_end(key)
        while len(self._entries) > self.capacity:
            self._entries.popitem(last=False)


def count_by_result(lookups: Counter, **counts: int) -> None:
    """Add each count to `lookups` under its result label, skipping zeros: each increment is
    a write to a shared memory map (BentoML's multiprocess metrics), 6% of the API worker's
    event loop when both a hit and a miss were written per lookup."""
    for result, count in counts.items():
        if count:
            lookups.labels(result=result).inc(count)


def first_misses(keys: Sequence[Key], cached: Sequence[np.ndarray | None]) -> dict[Key, int]:
    """Each key that `cached` (a lookup's answer) has no row for, once, with the index of its
    first appearance, in order: what the caller has to encode."""
    missing: dict[Key, int] = {}
    for index, (key, row) in enumerate(zip(keys, cached, strict=True)):
        if row is None:
            missing.setdefault(key, index)
    return missing


def with_cached(
    keys: Sequence[Key],
    cached: Sequence[np.ndarray | None],
    missing: Sequence[Key],
    fresh: np.ndarray,
) -> np.ndarray:
    """The rows of `keys`, in order: `cached`'s where it has one, else `fresh`'s row for the
    key, `fresh` holding the rows of `missing` (the keys not cached, each once, in order of
    first appearance). With nothing cached and no key twice, that is `fresh` itself."""
    if len(missing) == len(keys):
        return fresh
    row_of = {key: index for index, key in enumerate(missing)}
    pairs = zip(keys, cached, strict=True)
    return np.stack([row if row is not None else fresh[row_of[key]] for key, row in pairs])
