"""The text-embedding LRU."""

from __future__ import annotations

import numpy as np
import prometheus_client

from clip_runner.answers.text_cache import TextEmbeddingCache


def lookups(result: str) -> float:
    """The text cache's lookup counter (what /metrics shows) in this process."""
    sample = "clip_service_text_cache_lookups_total"
    return prometheus_client.REGISTRY.get_sample_value(sample, {"result": result}) or 0.0


def vector(value: float) -> np.ndarray:
    return np.full(4, value, dtype=np.float32)


def test_hits_misses_and_model_separation():
    before = lookups("hit"), lookups("miss")
    cache = TextEmbeddingCache(capacity=10)
    cache.store("clip:a", ["cat", "dog"], np.stack([vector(1), vector(2)]))
    found = cache.lookup("clip:a", ["dog", "bird"])
    assert found[0][0] == 2 and found[1] is None
    assert cache.lookup("clip:b", ["cat"]) == [None]
    assert (lookups("hit") - before[0], lookups("miss") - before[1]) == (1, 2)


def test_least_recently_used_is_evicted():
    cache = TextEmbeddingCache(capacity=2)
    cache.store("m", ["a", "b"], np.stack([vector(1), vector(2)]))
    cache.lookup("m", ["a"])
    cache.store("m", ["c"], np.stack([vector(3)]))
    assert len(cache) == 2
    assert cache.lookup("m", ["b"]) == [None]
    assert cache.lookup("m", ["a", "c"])[1][0] == 3


def test_zero_capacity_disables_caching():
    cache = TextEmbeddingCache(capacity=0)
    cache.store("m", ["a"], np.stack([vector(1)]))
    assert len(cache) == 0 and cache.lookup("m", ["a"]) == [None]
