"""Answers as JSON bytes: pydantic's serializer, except for the embedding answers' numbers.

An embedding answer is mostly numbers: eight 512-dimensional text embeddings are 4,096 floats,
86 kB of JSON. Through the `EmbeddingResponse` model they were copied into Python floats
(`tolist`, about 90 us), validated (about 40 us) and written by pydantic (about 220 us): about a
sixth of an API worker's CPU for an uncached 8-prompt `/embed_texts` request. orjson writes the
same bytes straight from the array (about 100 us), since both print each float64 (each float32
value exactly) as its shortest round-trip decimal. `EmbeddingResponse` stays the APIs' declared
type, for their schema and BentoML's Python client; a test holds `embedding_json` to pydantic's
bytes for that model, value for value.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import orjson
import pydantic_core

from clip_runner.answers.embedding_format import EncodingFormat, format_embeddings


def json_body(answer: Any) -> bytes:
    """The answer's JSON: pydantic's serializer, or the answer itself where it is JSON already
    (`embedding_json`)."""
    return answer if isinstance(answer, bytes) else pydantic_core.to_json(answer)


def embedding_json(
    model: str, dimension: int, encoding_format: EncodingFormat, embeddings: np.ndarray
) -> bytes:
    """An `EmbeddingResponse` as JSON, with the same fields in the same order and the same
    bytes as pydantic writes for it."""
    answer = {
        "model": model,
        "dimension": dimension,
        "encoding_format": encoding_format,
        "embeddings": format_embeddings(embeddings, encoding_format),
    }
    return orjson.dumps(answer, option=orjson.OPT_SERIALIZE_NUMPY)
