"""The original's scoring rules on hand-built arrays."""

from __future__ import annotations

import numpy as np
import pytest

from clip_runner.answers.zero_shot import (
    build_prompts,
    classification_flag,
    predict,
    top_k_indices,
    zero_shot_probabilities,
)


def unit(rows: list[list[float]]) -> np.ndarray:
    array = np.asarray(rows, dtype=np.float32)
    return array / np.linalg.norm(array, axis=1, keepdims=True)


def test_prompts_use_the_template_and_leave_other_braces_alone():
    assert build_prompts(["cat", "dog"], "a photo of a {name}") == [
        "a photo of a cat",
        "a photo of a dog",
    ]
    assert build_prompts(["x"], "{} {name} {other}") == ["{} x {other}"]


def test_probabilities_are_softmax_of_scaled_cosine_over_all_prompts():
    images = unit([[1, 0, 0], [0, 1, 1]])
    texts = unit([[1, 0, 0], [0, 1, 0], [1, 1, 1]])
    probabilities = zero_shot_probabilities(images, texts, logit_scale=100.0)
    cosine = images.astype(np.float64) @ texts.T
    expected = np.exp(100 * cosine) / np.exp(100 * cosine).sum(axis=1, keepdims=True)
    assert probabilities.dtype == np.float32
    np.testing.assert_allclose(probabilities, expected, atol=1e-6)
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, atol=1e-6)


def test_logit_scale_changes_sharpness():
    images = unit([[1, 0.2]])
    texts = unit([[1, 0], [0, 1]])
    soft = zero_shot_probabilities(images, texts, logit_scale=1.0)[0]
    sharp = zero_shot_probabilities(images, texts, logit_scale=100.0)[0]
    assert sharp[0] > soft[0] > 0.5


@pytest.mark.parametrize(("count", "expected_k"), [(1, 1), (2, 2), (3, 3), (4, 3), (7, 3)])
def test_top_k_is_min_of_three_and_class_count(count: int, expected_k: int):
    probabilities = np.linspace(0.1, 0.9, count).astype(np.float32)
    probabilities /= probabilities.sum()
    indices = top_k_indices(probabilities, 3)
    assert len(indices) == expected_k
    assert list(indices) == list(range(count - 1, count - 1 - expected_k, -1))


def test_equal_probabilities_keep_request_order():
    assert list(top_k_indices(np.array([0.2, 0.4, 0.4], dtype=np.float32), 3)) == [1, 2, 0]


def test_flag_of_the_top_class_decides_without_near_ties():
    assert classification_flag([0.6, 0.3, 0.1], [True, False, False]) == 1
    assert classification_flag([0.6, 0.3, 0.1], [False, True, True]) == 0


def test_near_tie_within_margin_resolves_to_positive():
    assert classification_flag([0.50, 0.49, 0.01], [False, True, False]) == 1


def test_tie_at_exactly_the_margin_counts_even_in_float32():
    top = np.array([0.5, 0.48, 0.02], dtype=np.float32).tolist()
    assert classification_flag(top, [False, True, False]) == 1


def test_just_beyond_the_margin_does_not_count():
    assert classification_flag([0.5, 0.4799, 0.0201], [False, True, True]) == 0


def test_flags_outside_top_k_never_count():
    probabilities = np.array([0.30, 0.295, 0.29, 0.115], dtype=np.float32)
    answer = predict(probabilities, ["a", "b", "c", "d"], [False, False, False, True], k=3)
    assert answer["classification"] == 0
    answer = predict(probabilities, ["a", "b", "c", "d"], [False, False, True, False], k=3)
    assert answer["classification"] == 1


def test_prediction_has_the_original_shape():
    probabilities = np.array([0.1, 0.6, 0.05, 0.25], dtype=np.float32)
    answer = predict(probabilities, ["w", "x", "y", "z"], [True, False, True, True], k=3)
    assert list(answer) == ["classification", "confidence", "prompts"]
    indices, names, scores = answer["prompts"]
    assert indices == [1, 3, 0]
    assert names == ["x", "z", "w"]
    assert scores == [float(probabilities[i]) for i in indices]
    assert answer["confidence"] == scores[0]
    assert answer["classification"] == 0
    assert all(type(i) is int for i in indices) and all(type(s) is float for s in scores)


def test_single_class_is_certain():
    answer = predict(np.array([1.0], dtype=np.float32), ["only"], [True], k=3)
    assert answer == {"classification": 1, "confidence": 1.0, "prompts": [[0], ["only"], [1.0]]}
