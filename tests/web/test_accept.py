"""Content negotiation's pure parts: reading Accept, weighing ranges, picking a type."""

from __future__ import annotations

import pytest

from clip_runner.web.accept import (
    ANY,
    accepted_ranges,
    named_choice,
    preferred,
    request_accept,
    weight_of,
)

JSON = ("application/json",)
LINES = ("application/jsonlines", "application/x-jsonlines")


@pytest.mark.parametrize(
    ("header", "ranges"),
    [
        ("", ANY),
        (" , ", ANY),
        ("application/json", (("application/json", 1.0),)),
        ("Application/JSON; charset=utf-8", (("application/json", 1.0),)),
        ("text/csv;q=0.5, */*; Q=0", (("text/csv", 0.5), ("*/*", 0.0))),
        ("text/csv,, application/json", (("text/csv", 1.0), ("application/json", 1.0))),
        # What no library writes: read as "anything" rather than refused.
        ("json", ANY),
        ("application/json;q=high", ANY),
        ("application/json;q=2", ANY),
        ("*/json", ANY),
        ("a/b/c", ANY),
    ],
)
def test_accepted_ranges(header, ranges):
    assert accepted_ranges(header) == ranges


def test_several_accept_headers_are_one_list():
    scope = {"headers": [(b"accept", b"text/csv"), (b"Accept", b"application/json;q=0.1")]}
    assert request_accept(scope) == "text/csv, application/json;q=0.1"
    assert request_accept({"headers": []}) == ""


@pytest.mark.parametrize(
    ("header", "weight"),
    [
        ("application/json", 1.0),
        ("*/*;q=0.2", 0.2),
        ("application/*;q=0.4, */*;q=0.1", 0.4),
        # The most specific range decides, whatever its place or weight.
        ("application/json;q=0, */*", 0.0),
        ("*/*, application/json;q=0.3, application/*;q=0.9", 0.3),
        ("text/*, text/csv", 0.0),
    ],
)
def test_the_most_specific_range_weighs_a_type(header, weight):
    assert weight_of(accepted_ranges(header), "application/json") == weight


@pytest.mark.parametrize(
    ("header", "offered", "choice"),
    [
        ("", JSON, "application/json"),
        ("*/*", JSON, "application/json"),
        # A browser's, and the SageMaker SDK's PandasDeserializer's.
        ("text/html,application/xhtml+xml,application/xml;q=0.9,*/*;q=0.8", JSON, JSON[0]),
        ("text/csv, application/json", JSON, "application/json"),
        ("text/csv", JSON, None),
        ("application/x-npy", JSON, None),
        ("text/html", JSON, None),
        ("application/json;q=0", JSON, None),
        ("application/jsonlines", JSON, None),
        ("application/x-jsonlines;q=0.5, application/json;q=0.4", JSON + LINES, LINES[1]),
        ("application/jsonlines", JSON + LINES, LINES[0]),
        ("application/*", JSON + LINES, "application/json"),
    ],
)
def test_preferred(header, offered, choice):
    assert preferred(accepted_ranges(header), offered) == choice


@pytest.mark.parametrize(
    ("header", "choice"),
    [
        ("", LINES[0]),
        ("*/*", LINES[0]),
        ("application/*", LINES[0]),
        ("application/json", LINES[0]),
        ("application/x-jsonlines", LINES[1]),
        ("application/jsonlines;q=0.2, application/x-jsonlines;q=0.9", LINES[1]),
        ("application/x-jsonlines;q=0, */*", LINES[0]),
    ],
)
def test_named_choice_takes_only_a_type_named_outright(header, choice):
    assert named_choice(accepted_ranges(header), LINES) == choice
