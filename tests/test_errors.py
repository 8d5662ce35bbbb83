"""The error shape itself: what `RequestError` and `ImageError` answer with."""

from __future__ import annotations

import json

from clip_runner.errors import QUOTED_CHARS, ImageError, RequestError, error_body, quoted


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
