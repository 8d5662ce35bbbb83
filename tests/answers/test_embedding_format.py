"""Embeddings as JSON numbers or as base64 of little-endian float32."""

from __future__ import annotations

import base64

import numpy as np

from clip_runner.answers.embedding_format import decode_base64_embedding, format_embeddings


def test_float_format_is_the_float32_values_as_float64():
    rows = np.random.default_rng(1).normal(size=(3, 5)).astype(np.float32)
    numbers = format_embeddings(rows, "float")
    assert numbers.dtype == np.float64 and numbers.shape == rows.shape
    assert np.array_equal(numbers, rows)  # exactly the same numbers
    assert numbers.tolist() == rows.tolist()


def test_base64_is_little_endian_float32_and_round_trips_exactly():
    rows = np.random.default_rng(0).normal(size=(3, 7)).astype(np.float32)
    encoded = format_embeddings(rows, "base64")
    assert len(encoded) == 3 and all(isinstance(item, str) for item in encoded)
    assert len(base64.b64decode(encoded[0])) == 7 * 4
    assert base64.b64decode(encoded[0])[:4] == rows[0, 0].astype("<f4").tobytes()
    decoded = np.stack([decode_base64_embedding(item) for item in encoded])
    assert np.array_equal(decoded, rows)
