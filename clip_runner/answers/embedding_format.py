"""How embeddings travel in JSON: numbers, or base64 of little-endian float32 (4 bytes a value).

A 512-dimensional embedding is ~10 KB as JSON numbers and 2.7 KB as base64, and base64 decodes
exactly: `np.frombuffer(base64.b64decode(s), dtype="<f4")`.
"""

from __future__ import annotations

import base64
from typing import Literal

import numpy as np

EncodingFormat = Literal["float", "base64"]


def format_embeddings(
    embeddings: np.ndarray, encoding_format: EncodingFormat
) -> np.ndarray | list[str]:
    """One entry per row: for JSON numbers the float32 values as float64 (exactly the same
    numbers: what a JSON writer prints), or a base64 string of the row's float32 bytes."""
    rows = np.asarray(embeddings, dtype="<f4")
    if encoding_format == "base64":
        return [base64.b64encode(row.tobytes()).decode("ascii") for row in rows]
    return rows.astype(np.float64)


def decode_base64_embedding(text: str) -> np.ndarray:
    """The inverse of the base64 format, for clients and tests."""
    return np.frombuffer(base64.b64decode(text), dtype="<f4")
