"""Zero-shot scoring and the original container's answer rules, as pure functions on arrays.

Semantics kept from the original (../shared/SEED.md): softmax over all prompts of
`logit_scale * cosine`, top-k = min(k, N) by descending probability, `confidence` = top-1
probability, and `classification` = 1 when any top-k class within `TIE_MARGIN` of the top-1
probability carries a truthy flag.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from clip_runner.config import TIE_MARGIN

# Probabilities are float32: a difference meant to be exactly 0.02 lands within this of it.
TIE_TOLERANCE = 1e-6


def build_prompts(names: Sequence[str], template: str) -> list[str]:
    """Each class name placed into the template's `{name}` slot (other braces stay literal)."""
    return [template.replace("{name}", name) for name in names]


def zero_shot_probabilities(
    image_embeddings: np.ndarray, text_embeddings: np.ndarray, logit_scale: float
) -> np.ndarray:
    """Per image, softmax over all prompts of `logit_scale * cosine` (float32, rows sum to 1).

    Inputs are L2-normalised embeddings of shape (images, dim) and (prompts, dim).
    """
    image_embeddings = np.asarray(image_embeddings, dtype=np.float32)
    text_embeddings = np.asarray(text_embeddings, dtype=np.float32)
    logits = np.float32(logit_scale) * (image_embeddings @ text_embeddings.T)
    logits = logits - logits.max(axis=1, keepdims=True)
    weights = np.exp(logits)
    return (weights / weights.sum(axis=1, keepdims=True)).astype(np.float32)


def top_k_indices(probabilities: np.ndarray, k: int) -> np.ndarray:
    """Indices of the k most probable prompts, descending; ties keep the request's order."""
    k = max(1, min(k, probabilities.shape[0]))
    return np.argsort(-probabilities, kind="stable")[:k]


def classification_flag(
    top_probabilities: Sequence[float], top_flags: Sequence[bool], margin: float = TIE_MARGIN
) -> int:
    """1 if a top-k class within `margin` (inclusive) of the top-1 probability is flagged."""
    best = top_probabilities[0]
    return int(
        any(
            flag and best - probability <= margin + TIE_TOLERANCE
            for probability, flag in zip(top_probabilities, top_flags, strict=True)
        )
    )


def predict(
    probabilities: np.ndarray, names: Sequence[str], flags: Sequence[bool], k: int
) -> dict[str, Any]:
    """One image's answer in the original's exact shape."""
    indices = top_k_indices(probabilities, k)
    top_probabilities = [float(probabilities[i]) for i in indices]
    return {
        "classification": classification_flag(top_probabilities, [flags[i] for i in indices]),
        "confidence": top_probabilities[0],
        "prompts": [
            [int(i) for i in indices],
            [names[i] for i in indices],
            top_probabilities,
        ],
    }
