"""The error shape itself: what `RequestError` and `ImageError` answer with."""

from __future__ import annotations

import ast
import json
import re

from clip_runner.errors import QUOTED_CHARS, ImageError, RequestError, error_body, quoted
from clip_runner.web.error_responses import _STATUS_TYPES
from clip_runner.web.header_limits import TOO_LARGE
from tests.helpers import REPO_ROOT

# Calls that set an error's `type`, and which positional argument holds it.
TYPE_ARGUMENT = {"RequestError": 1, "ImageError": 2, "send_error": 2, "error_body": 0}


def error_types_in_code() -> dict[str, str]:
    """Every error `type` written as a literal where an error is made (clip_runner and
    service.py), with one place that makes it; the types passed on from elsewhere as variables
    are the literals found here, BentoML's statuses' and the header limit's."""
    types = {error_type: "error_responses._STATUS_TYPES" for error_type in _STATUS_TYPES.values()}
    types[TOO_LARGE] = "header_limits.TOO_LARGE"
    for path in [REPO_ROOT / "service.py", *sorted((REPO_ROOT / "clip_runner").rglob("*.py"))]:
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, ast.Call):
                continue
            name = getattr(node.func, "id", getattr(node.func, "attr", None))
            if name not in TYPE_ARGUMENT:
                continue
            position = TYPE_ARGUMENT[name]
            given = node.args[position : position + 1]
            given += [keyword.value for keyword in node.keywords if keyword.arg == "error_type"]
            for argument in given:
                if isinstance(argument, ast.Constant) and isinstance(argument.value, str):
                    types.setdefault(argument.value, f"{path.name}:{node.lineno}")
    return types


def test_every_error_type_the_server_answers_has_a_row_in_the_readmes_errors_table():
    """Clients match on `type`: `image_not_found` (a missing s3:// object) had been answered
    but was in no row of the table that lists them."""
    readme = (REPO_ROOT / "README.md").read_text()
    table = readme.split("\n### Errors\n", 1)[1].split("\n\n| status |", 1)[1]
    table = table.split("\n\n", 1)[0]
    listed = set(re.findall(r"`([a-z0-9_]+)`", table))
    types = error_types_in_code()
    assert {"invalid_image", "image_not_found", "s3_unavailable", "overloaded"} <= set(types)
    missing = {error_type: place for error_type, place in types.items() if error_type not in listed}
    assert not missing, f"error types the README's Errors table lacks: {missing}"


def test_error_body_carries_the_index_only_when_there_is_one():
    assert error_body("bad_request", "no") == {"error": {"type": "bad_request", "message": "no"}}
    assert error_body("invalid_image", "images[2]: x", 2)["error"]["index"] == 2
    assert error_body("invalid_image", "images[0]: x", 0)["error"]["index"] == 0


def test_request_error_answers_its_status_with_the_json_shape():
    response = RequestError(413, "payload_too_large", "too many pixels").to_response()
    assert response.status_code == 413
    assert response.headers["content-type"] == "application/json"
    assert json.loads(response.body) == {
        "error": {"type": "payload_too_large", "message": "too many pixels"}
    }


def test_image_error_names_the_field_it_came_in():
    error = ImageError(3, "not an image")
    assert (error.status, error.error_type, error.index) == (422, "invalid_image", 3)
    assert error.message == "images[3]: not an image"
    renamed = error.in_field("inputs")
    assert renamed.message == "inputs[3]: not an image"
    assert (renamed.index, renamed.reason, renamed.error_type) == (
        3,
        "not an image",
        "invalid_image",
    )


def test_long_caller_text_is_quoted_by_its_start_and_its_length():
    assert quoted("http://a/b.jpg") == "http://a/b.jpg"
    exactly = "x" * QUOTED_CHARS
    assert quoted(exactly) == exactly
    long = "http://a/" + "b" * 5_000_000
    shown = quoted(long)
    assert shown.startswith(long[:QUOTED_CHARS]) and shown.endswith("... (5000009 characters)")
    assert len(shown) < QUOTED_CHARS + 40
