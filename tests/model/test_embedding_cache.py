"""The text-embedding LRU (the API workers' by model tag and prompt, the runner's by token ids)."""

from __future__ import annotations

import numpy as np
import prometheus_client
import pytest

from clip_runner.metrics import TEXT_CACHE_LOOKUPS
from clip_runner.model.embedding_cache import EmbeddingCache, first_misses, with_cached


def lookups(result: str) -> float:
    """The API workers' text cache lookup counter (what /metrics shows) in this process."""
    sample = "clip_service_text_cache_lookups_total"
    return prometheus_client.REGISTRY.get_sample_value(sample, {"result": result}) or 0.0


def vector(value: float) -> np.ndarray:
    return np.full(4, value, dtype=np.float32)


def test_hits_and_misses_are_counted():
    before = lookups("hit"), lookups("miss")
    cache = EmbeddingCache(10, TEXT_CACHE_LOOKUPS)
    cache.store([("clip:a", "cat"), ("clip:a", "dog")], np.stack([vector(1), vector(2)]))
    found = cache.lookup([("clip:a", "dog"), ("clip:a", "bird")])
    assert found[0][0] == 2 and found[1] is None
    assert cache.lookup([("clip:b", "cat")]) == [None]
    assert (lookups("hit") - before[0], lookups("miss") - before[1]) == (1, 2)


def test_a_cache_without_a_counter_counts_nothing():
    before = lookups("hit"), lookups("miss")
    cache = EmbeddingCache(10)
    cache.store([(1, 2)], np.stack([vector(1)]))
    assert cache.lookup([(1, 2), (3,)])[0][0] == 1
    assert (lookups("hit"), lookups("miss")) == before


def test_least_recently_used_is_evicted():
    cache = EmbeddingCache(capacity=2)
    cache.store(["a", "b"], np.stack([vector(1), vector(2)]))
    cache.lookup(["a"])
    cache.store(["c"], np.stack([vector(3)]))
    assert len(cache) == 2
    assert cache.lookup(["b"]) == [None]
    assert cache.lookup(["a", "c"])[1][0] == 3


def test_zero_capacity_disables_caching():
    cache = EmbeddingCache(capacity=0)
    cache.store(["a"], np.stack([vector(1)]))
    assert len(cache) == 0 and cache.lookup(["a"]) == [None]


def test_cached_and_fresh_rows_are_merged_in_order():
    fresh = np.stack([vector(10), vector(20)])  # the rows of "b" and "c", encoded
    cached = [vector(1), None, None, None]
    merged = with_cached(["a", "b", "c", "b"], cached, ["b", "c"], fresh)
    assert merged[:, 0].tolist() == [1, 10, 20, 10]
    # nothing cached and no key twice: the encoded rows are the answer, as they are
    assert with_cached(["b", "c"], [None, None], ["b", "c"], fresh) is fresh


def test_stored_rows_cannot_be_changed_by_the_callers_answering_with_them():
    encoded = np.stack([vector(1), vector(2)])
    cache = EmbeddingCache(capacity=10)
    cache.store(["a", "b"], encoded)
    encoded[1] *= 2  # the caller's array is its own
    cached = cache.lookup(["b"])[0]
    assert cached[0] == 2
    with pytest.raises(ValueError, match="read-only"):
        cached[0] = 3  # and the cache's rows, shared by every lookup, stay as stored


def test_a_cached_row_does_not_keep_the_batch_it_came_in_alive():
    """A row kept as a view of its batch (a 1,000-label request's array, a merged runner
    call's answer) kept the whole batch in memory: 4,096 entries had held 307 MB."""
    batch = np.ones((1000, 512), dtype=np.float32)
    cache = EmbeddingCache(capacity=4)
    cache.store([f"label {i}" for i in range(1000)], batch)
    assert len(cache) == 4 and cache.lookup(["label 0"]) == [None]
    row = cache.lookup(["label 999"])[0]
    assert row.base is None and row.nbytes == 512 * 4
    assert not np.shares_memory(row, batch)


def test_each_missing_key_is_named_once_with_its_first_place():
    cached = [None, vector(1), None, None, None]
    assert first_misses(["b", "a", "c", "b", "d"], cached) == {"b": 0, "c": 2, "d": 4}


def test_a_prompt_cache_leaves_its_misses_to_be_counted_where_they_are_encoded():
    before = lookups("hit"), lookups("miss")
    cache = EmbeddingCache(10, TEXT_CACHE_LOOKUPS, misses_counted_elsewhere=True)
    cache.store([(1,)], np.stack([vector(1)]))
    cache.lookup([(1,), (2,), (3,)])
    assert (lookups("hit") - before[0], lookups("miss") - before[1]) == (1, 0)
