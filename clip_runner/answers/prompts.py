"""Prompt templates, CLIP's prompt ensembling and label ranking, as pure functions.

`/classify` takes plain labels and one or more templates. Several templates per label are
CLIP's prompt ensembling (Radford et al. 2021, section 3.1.4): each label's prompt embeddings are
averaged (as unit vectors) and re-normalised, and the images are scored against that one vector
per label. With the single default template this is exactly `/invocations`' math.
"""

from __future__ import annotations

import functools
import string
from collections.abc import Sequence

import numpy as np

from clip_runner.answers.zero_shot import top_k_indices

# `{name}` is the original container's placeholder; `{}` is what CLIP's and Hugging Face's
# template lists use ("a photo of a {}.").
PLACEHOLDERS = ("{name}", "{}")
TEMPLATE_RULE = (
    "a template must hold the label's slot {} (or {0}; literal braces doubled: {{ }}) or the "
    "original's {name}, not both; no other fields, format specs, conversions or lookups"
)


def _parsed(template: str) -> list[tuple[str, str | None, str | None, str | None]] | None:
    """`string.Formatter().parse`, None for unbalanced braces."""
    try:
        return list(string.Formatter().parse(template))
    except ValueError:
        return None


def _fields(pieces: list[tuple[str, str | None, str | None, str | None]]) -> set[str]:
    return {field for _, field, _, _ in pieces if field is not None}


def check_template(template: str) -> str:
    """`template` if `fill_template` can fill it plainly, else ValueError(TEMPLATE_RULE).

    `{}` templates (CLIP's lists, transformers' pipeline) are filled as `template.format(label)`
    fills them: slots `{}` or `{0}`, literal braces `{{ }}` (a slot repeated gets the label each
    time). A `{name}` template, the original's, has `{name}` replaced. Anything `str.format`
    would evaluate on caller text (`{0.x}`, `{0[0]}`, `{:>10}`, `{0!r}`), could not fill (`{x}`,
    `{1}`, unbalanced braces) or fills without the label is refused, as is a template mixing
    `{}` and `{name}` (which one gets the label could not be told).
    """
    pieces = _parsed(template)
    if pieces is None or any(
        field is not None
        and (spec or conversion not in (None, "s") or (conversion and field == "name"))
        for _, field, spec, conversion in pieces
    ):
        raise ValueError(TEMPLATE_RULE)
    fields = _fields(pieces)
    if fields not in ({"name"}, {""}, {"0"}):  # none, others, {} beside {0} or {name}
        raise ValueError(TEMPLATE_RULE)
    # Every `{name}` in the text must be a slot, and a slot written `{name}`: `{name:}` parses
    # as one but is not replaced (every label had got one prompt), and a literal `{{name}}`
    # beside `{}` slots could not be told from the original's slot.
    name_slots = sum(field == "name" for _, field, _, _ in pieces)
    if template.count(PLACEHOLDERS[0]) != name_slots:
        raise ValueError(TEMPLATE_RULE)
    return template


def automatic_slots(template: str) -> int:
    """How many automatically numbered slots (`{}`, `{!s}`) `template` holds: `str.format`
    with one argument fills the first and raises IndexError at the second."""
    return sum(field == "" for _, field, _, _ in _parsed(template) or [])


@functools.lru_cache(maxsize=4096)
def _literals(template: str) -> tuple[str, ...]:
    """The text around a template's label slots: the prompt is the label joined between them.

    A template holding `{name}` is the original's, whose `{name}` is replaced, whatever else it
    holds (`/invocations`' `template` is only checked for holding `{name}`); a `{}` template's
    slots are its `{}`/`{0}` fields, its literal braces undoubled (what `str.format` makes).
    Cached: a request fills each template once per label, for up to 1,000 labels.
    """
    pieces = _parsed(template)
    if (
        PLACEHOLDERS[0] in template
        or pieces is None
        or not _fields(pieces)
        or not _fields(pieces) <= {"", "0"}
    ):
        return tuple(template.split(PLACEHOLDERS[0]))
    literals, current = [], ""
    for literal, field, _, _ in pieces:
        current += literal
        if field is not None:
            literals.append(current)
            current = ""
    return (*literals, current)


def fill_template(template: str, label: str) -> str:
    """The prompt for `label`: a checked template with the label in each of its slots."""
    return label.join(_literals(template))


def filled_length(template: str, label: str) -> int:
    """`len(fill_template(template, label))`, without making the prompt: a template that
    repeats its slot multiplies the label's length."""
    literals = _literals(template)
    return sum(map(len, literals)) + (len(literals) - 1) * len(label)


def ensemble_prompts(labels: Sequence[str], templates: Sequence[str]) -> list[str]:
    """Label-major: each template of label 0, then of label 1, ... (`ensemble_embeddings` order)."""
    return [fill_template(template, label) for label in labels for template in templates]


def ensemble_embeddings(prompt_embeddings: np.ndarray, n_templates: int) -> np.ndarray:
    """(labels * templates, D) unit vectors, label-major -> (labels, D): mean, re-normalised."""
    embeddings = np.asarray(prompt_embeddings, dtype=np.float32)
    if n_templates == 1:  # already unit vectors: re-normalising moved them by up to 6e-8
        return embeddings
    per_label = embeddings.reshape(-1, n_templates, embeddings.shape[-1]).mean(axis=1)
    norms = np.linalg.norm(per_label, axis=1, keepdims=True)
    return (per_label / np.maximum(norms, 1e-12)).astype(np.float32)


def ranked_labels(
    probabilities: np.ndarray, labels: Sequence[str], top_k: int | None
) -> list[dict[str, float | str]]:
    """`[{"label", "score"}]` by descending score (ties keep request order), at most top_k."""
    order = top_k_indices(np.asarray(probabilities), top_k or len(labels))
    return [{"label": labels[i], "score": float(probabilities[i])} for i in order]
