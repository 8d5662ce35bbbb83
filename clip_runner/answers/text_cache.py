"""A bounded LRU of text embeddings, so repeated class lists are not re-encoded every request."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

import numpy as np

from clip_runner.metrics import TEXT_CACHE_LOOKUPS


class TextEmbeddingCache:
    """Maps (model tag, prompt) -> embedding, evicting the least recently used past `capacity`."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._entries: OrderedDict[tuple[str, str], np.ndarray] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def lookup(self, model_tag: str, prompts: Sequence[str]) -> list[np.ndarray | None]:
        """The cached embedding of each prompt, or None where it is not cached."""
        found = [self._entries.get((model_tag, prompt)) for prompt in prompts]
        for prompt, embedding in zip(prompts, found, strict=True):
            if embedding is not None:
                self._entries.move_to_end((model_tag, prompt))
        hits = sum(embedding is not None for embedding in found)
        # Only counts that moved: each increment is a write to a shared memory map (BentoML's
        # multiprocess metrics), 6% of the API worker's event loop when both were written.
        for result, count in (("hit", hits), ("miss", len(found) - hits)):
            if count:
                TEXT_CACHE_LOOKUPS.labels(result=result).inc(count)
        return found

    def store(self, model_tag: str, prompts: Sequence[str], embeddings: np.ndarray) -> None:
        if self.capacity == 0:
            return
        for prompt, embedding in zip(prompts, embeddings, strict=True):
            self._entries[(model_tag, prompt)] = embedding
            self._entries.move_to_end((model_tag, prompt))
        while len(self._entries) > self.capacity:
            self._entries.popitem(last=False)
