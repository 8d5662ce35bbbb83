"""Templates, prompt ensembling and ranking: the pure math behind `/classify`."""

from __future__ import annotations

import numpy as np
import pytest

from clip_runner.answers.prompts import (
    check_template,
    ensemble_embeddings,
    ensemble_prompts,
    fill_template,
    filled_length,
    ranked_labels,
)


def unit(rows: np.ndarray) -> np.ndarray:
    return rows / np.linalg.norm(rows, axis=-1, keepdims=True)


@pytest.mark.parametrize(
    ("template", "expected"),
    [
        ("a photo of a {name}", "a photo of a cat"),
        ("a photo of a {}.", "a photo of a cat."),
        ("{name} or {} in {braces}", "cat or {} in {braces}"),  # {name} wins; the rest is literal
    ],
)
def test_fill_template(template, expected):
    assert fill_template(template, "cat") == expected


@pytest.mark.parametrize(
    "template",
    ["a photo of a {name}", "a {} of a {}", "{}" * 150, "{name}{name} or {}", "{name} {braces}"],
)
@pytest.mark.parametrize("label", ["", "cat", "x" * 300])
def test_filled_length_is_the_filled_prompts_length(template, label):
    assert filled_length(template, label) == len(fill_template(template, label))


def test_templates_without_a_placeholder_are_refused():
    assert check_template("a {} photo") == "a {} photo"
    with pytest.raises(ValueError, match=r"\{name\} or \{\}"):
        check_template("a photo of something")


def test_prompts_are_label_major():
    assert ensemble_prompts(["cat", "dog"], ["a {}", "the {name}!"]) == [
        "a cat",
        "the cat!",
        "a dog",
        "the dog!",
    ]


def test_ensembling_averages_unit_vectors_per_label_and_renormalises():
    rng = np.random.default_rng(0)
    prompts = unit(rng.normal(size=(6, 8))).astype(np.float32)  # 2 labels x 3 templates
    ensembled = ensemble_embeddings(prompts, n_templates=3)
    assert ensembled.shape == (2, 8) and ensembled.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(ensembled, axis=1), 1.0, atol=1e-6)
    for label in range(2):
        expected = unit(prompts[label * 3 : label * 3 + 3].mean(axis=0))
        np.testing.assert_allclose(ensembled[label], expected, atol=1e-6)


def test_one_template_leaves_the_embeddings_unchanged():
    prompts = unit(np.random.default_rng(1).normal(size=(4, 5))).astype(np.float32)
    np.testing.assert_allclose(ensemble_embeddings(prompts, n_templates=1), prompts, atol=1e-7)


def test_ranking_is_descending_stable_and_cut_at_top_k():
    probabilities = np.array([0.2, 0.5, 0.2, 0.1], dtype=np.float32)
    labels = ["a", "b", "c", "d"]
    ranked = ranked_labels(probabilities, labels, top_k=None)
    assert [item["label"] for item in ranked] == ["b", "a", "c", "d"]  # a before c: request order
    assert [item["score"] for item in ranked] == pytest.approx([0.5, 0.2, 0.2, 0.1])
    assert [item["label"] for item in ranked_labels(probabilities, labels, top_k=2)] == ["b", "a"]
