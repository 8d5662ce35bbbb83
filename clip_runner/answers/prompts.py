"""Prompt templates, CLIP's prompt ensembling and label ranking, as pure functions.

`/classify` takes plain labels and one or more templates. Several templates per label are
CLIP's prompt ensembling (Radford et al. 2021, section 3.1.4): each label's prompt embeddings are
averaged (as unit vectors) and re-normalised, and the images are scored against that one vector
per label. With the single default template this is exactly `/invocations`' math.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from clip_runner.answers.zero_shot import top_k_indices

# `{name}` is the original container's placeholder; `{}` is what CLIP's and Hugging Face's
# template lists use ("a photo of a {}.").
PLACEHOLDERS = ("{name}", "{}")


def check_template(template: str) -> str:
    """A template must say where the label goes."""
    if not any(placeholder in template for placeholder in PLACEHOLDERS):
        raise ValueError("template must contain the placeholder {name} or {}")
    return template


def fill_template(template: str, label: str) -> str:
    """The label in the template's `{name}` slot, else its `{}` slots; other braces stay literal."""
    if "{name}" in template:
        return template.replace("{name}", label)
    return template.replace("{}", label)


def filled_length(template: str, label: str) -> int:
    """`len(fill_template(template, label))`, without making the prompt: a template that
    repeats its slot multiplies the label's length."""
    slot = "{name}" if "{name}" in template else "{}"
    return len(template) + template.count(slot) * (len(label) - len(slot))


def ensemble_prompts(labels: Sequence[str], templates: Sequence[str]) -> list[str]:
    """Label-major: each template of label 0, then of label 1, ... (`ensemble_embeddings` order)."""
    return [fill_template(template, label) for label in labels for template in templates]


def ensemble_embeddings(prompt_embeddings: np.ndarray, n_templates: int) -> np.ndarray:
    """(labels * templates, D) unit vectors, label-major -> (labels, D): mean, re-normalised."""
    embeddings = np.asarray(prompt_embeddings, dtype=np.float32)
    per_label = embeddings.reshape(-1, n_templates, embeddings.shape[-1]).mean(axis=1)
    norms = np.linalg.norm(per_label, axis=1, keepdims=True)
    return (per_label / np.maximum(norms, 1e-12)).astype(np.float32)


def ranked_labels(
    probabilities: np.ndarray, labels: Sequence[str], top_k: int | None
) -> list[dict[str, float | str]]:
    """`[{"label", "score"}]` by descending score (ties keep request order), at most top_k."""
    order = top_k_indices(np.asarray(probabilities), top_k or len(labels))
    return [{"label": labels[i], "score": float(probabilities[i])} for i in order]
