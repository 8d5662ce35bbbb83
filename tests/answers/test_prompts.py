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
        ("a {0} and a {0}", "a cat and a cat"),
        ("a {{sketch}} of a {}", "a {sketch} of a cat"),  # literal braces, as str.format has them
        ("{{}} {{x}} {!s}", "{} {x} cat"),
        ("{} and {}", "cat and cat"),  # each slot (str.format would want a second label)
        ("the {name}, {{as sent}}", "the cat, {{as sent}}"),  # the original replaces {name}
    ],
)
def test_fill_template(template, expected):
    assert fill_template(check_template(template), "cat") == expected


@pytest.mark.parametrize(
    ("template", "expected"),
    [("a photo of a {{name}} {}", "a photo of a {cat} {}"), ("{name}: a {0}", "cat: a {0}")],
)
def test_the_originals_template_has_its_name_replaced_whatever_else_it_holds(template, expected):
    """`/invocations`' `template` is only checked for holding `{name}`, which is replaced, as
    the README says (str.format's rules had been taken where the rest had `{}` slots)."""
    assert fill_template(template, "cat") == expected
    assert filled_length(template, "cat") == len(expected)


@pytest.mark.parametrize(
    "template",
    ["a photo of a {name}", "a {} of a {}", "{}" * 150, "{name}{name} or {}", "a {{x}} {0}"],
)
@pytest.mark.parametrize("label", ["", "cat", "x" * 300])
def test_filled_length_is_the_filled_prompts_length(template, label):
    assert filled_length(template, label) == len(fill_template(template, label))


@pytest.mark.parametrize(
    "template",
    [
        *("", "a photo of something", "a {", "a }", "{x}", "{1}", "{} {0}", "{{}}"),
        # which slot gets the label could not be told; str.format would evaluate the rest
        *("{} or {name}", "{name} {braces}", "{name!s}", "{0.x}", "{0[0]}", "{:>10}", "{!r}"),
        # a `{name}` that is not replaced as a slot: every label had got the same prompt
        *("a photo of a {name:}", "{{name}}: {}", "{{name}} {name}"),
    ],
)
def test_templates_str_format_could_not_fill_plainly_are_refused(template):
    """Braces had been literal unless they were a slot: `a {} in {braces}` was taken, `{{ }}`
    kept doubled, `{} or {name}` filled at `{name}` only."""
    with pytest.raises(ValueError, match=r"the label's slot \{\} \(or \{0\}"):
        check_template(template)


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
