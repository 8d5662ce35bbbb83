"""Answers as JSON bytes: embedding answers written by orjson, byte for byte pydantic's."""

from __future__ import annotations

import numpy as np
import pydantic_core
import pytest

from clip_runner.web.answer_json import embedding_json, json_body
from clip_runner.web.schemas import ClassifyResponse, EmbeddingResponse


def pydantics_bytes(embeddings: np.ndarray, encoding_format: str) -> bytes:
    """What the API answered before: the model built from Python floats, then pydantic."""
    rows = np.asarray(embeddings, dtype=np.float32)
    if encoding_format == "base64":
        from clip_runner.answers.embedding_format import format_embeddings

        listed = format_embeddings(rows, "base64")
    else:
        listed = rows.tolist()
    answer = EmbeddingResponse(
        model="clip:abc123",
        dimension=rows.shape[1],
        encoding_format=encoding_format,
        embeddings=listed,
    )
    return pydantic_core.to_json(answer)


def hard_values() -> np.ndarray:
    """Floats whose decimal forms differ most between writers: zeros of both signs, the
    extremes and subnormals of float32, exponents of one and two digits, exact halves, and
    unit-vector values of every magnitude."""
    rng = np.random.default_rng(0)
    edge = [
        0.0,
        -0.0,
        1.0,
        -1.0,
        0.5,
        0.1,
        1e-5,
        -1.5e-5,
        1e-7,
        1e-10,
        1e-30,
        3.4028235e38,
        1.1754944e-38,
        1e-45,
        1.4e-44,
        123456.79,
        0.30000001,
        2.0**-20,
        1 / 3,
    ]
    unit = rng.normal(size=(64, 512))
    unit /= np.linalg.norm(unit, axis=1, keepdims=True)
    scales = 10.0 ** rng.integers(-12, 3, size=unit.shape)
    edge_row = np.resize(np.array(edge), 512)
    return np.vstack([unit, unit * scales, edge_row]).astype(np.float32)


@pytest.mark.parametrize("encoding_format", ["float", "base64"])
def test_embedding_json_is_pydantics_bytes(encoding_format):
    rows = hard_values()
    ours = embedding_json("clip:abc123", rows.shape[1], encoding_format, rows)
    assert ours == pydantics_bytes(rows, encoding_format)


def test_embedding_json_of_one_row_and_of_none():
    row = hard_values()[:1]
    assert embedding_json("clip:abc123", 512, "float", row) == pydantics_bytes(row, "float")
    empty = np.empty((0, 4), dtype=np.float32)
    assert embedding_json("clip:abc123", 4, "float", empty) == pydantics_bytes(empty, "float")


def test_json_body_passes_json_through_and_writes_the_rest():
    already = b'{"model":"clip:x"}'
    assert json_body(already) is already
    answer = ClassifyResponse(model="clip:x", results=[[{"label": "cat", "score": 0.5}]])
    assert json_body(answer) == pydantic_core.to_json(answer)
    assert json_body([{"a": 1}]) == b'[{"a":1}]'
