"""Validation of the `/invocations` body, through `InvocationLine` (a JSON Lines record's model;
BentoML's input model of the API, which the direct path and its endpoint use, has the same
fields and annotated types). A missing `images` or `classes` is the handler's 422
(tests/test_service.py): the body may carry the toolkit's shape instead."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from clip_runner.web.jsonlines import InvocationLine
from clip_runner.web.schemas import Prediction


def validate(body: dict) -> InvocationLine:
    return InvocationLine.model_validate(body)


def error_locations(body: dict) -> list[tuple]:
    with pytest.raises(ValidationError) as raised:
        validate(body)
    return [tuple(error["loc"]) for error in raised.value.errors()]


def test_seed_body_is_valid_with_original_defaults():
    request = validate({"images": ["aGk="], "classes": [["person", 1], ["bag", 0]]})
    assert request.classes == [("person", True), ("bag", False)]
    assert request.template == "a photo of a {name}"
    assert request.top_k == 3


@pytest.mark.parametrize("flag", [True, False, 0, 1])
def test_flags_accept_bools_and_zero_one(flag):
    assert validate({"images": ["x"], "classes": [["a", flag]]}).classes[0][1] is bool(flag)


@pytest.mark.parametrize("flag", [2, -1, "1", "yes", None, 1.0, [1]])
def test_other_flags_are_refused_naming_the_entry(flag):
    assert ("classes", 0, 1) in error_locations({"images": ["x"], "classes": [["a", flag]]})


def test_empty_fields_are_named():
    assert ("images",) in error_locations({"images": [], "classes": [["a", 1]]})
    assert ("classes",) in error_locations({"images": ["x"], "classes": []})


def test_class_entries_must_be_name_flag_pairs():
    assert ("classes", 0, 1) in error_locations({"images": ["x"], "classes": [["a"]]})
    assert ("classes", 0) in error_locations({"images": ["x"], "classes": [["a", 1, 2]]})
    assert ("classes", 0, 0) in error_locations({"images": ["x"], "classes": [[3, 1]]})
    # An empty name is one, as the original took it (its prompt is the template's text alone).
    request = validate({"images": ["x"], "classes": [["", 1], [" ", 0]]})
    assert request.classes == [("", True), (" ", False)]
    assert ("images", 0) in error_locations({"images": [3], "classes": [["a", 1]]})


def test_template_needs_the_name_placeholder_and_top_k_is_positive():
    assert ("template",) in error_locations(
        {"images": ["x"], "classes": [["a", 1]], "template": "a photo"}
    )
    assert ("top_k",) in error_locations({"images": ["x"], "classes": [["a", 1]], "top_k": 0})


@pytest.mark.parametrize("top_k", ["true", '"2"', "2.0", "1.5", "null"])
def test_top_k_is_a_whole_json_number(top_k):
    """Strict as the flags are: `true` had been taken as 1, `"2"` and `2.0` as 2."""
    body = '{"images": ["x"], "classes": [["a", 1]], "top_k": ' + top_k + "}"
    with pytest.raises(ValidationError) as raised:
        InvocationLine.model_validate_json(body)
    assert [error["loc"] for error in raised.value.errors()] == [("top_k",)]
    assert InvocationLine.model_validate_json(body.replace(top_k, "2")).top_k == 2


def test_prediction_serialises_in_the_original_key_order():
    prediction = Prediction(classification=1, confidence=0.5, prompts=([0], ["a"], [0.5]))
    assert prediction.model_dump_json() == (
        '{"classification":1,"confidence":0.5,"prompts":[[0],["a"],[0.5]]}'
    )
