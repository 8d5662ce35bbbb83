"""Content negotiation on the API routes: which answer type a request's `Accept` allows.

The API answers JSON (JSON Lines for a JSON Lines body), whatever was asked; SageMaker clients
ask through `Accept` (the SDK's deserializers, boto3's `invoke_endpoint(Accept=...)`, Batch
Transform's `TransformOutput.Accept`). A client that asked for `text/csv` or `application/x-npy`
had been handed JSON and parsed it as CSV or numpy bytes. Following RFC 9110 (12.5.1), an
`Accept` that rules out every type a route answers is refused with a 406 before any work; an
absent, empty or unparsable one allows anything, as `*/*` does.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from starlette.types import Scope

# An Accept header we cannot read counts as this: refusing a request for a header the client's
# library wrote oddly would cost more than answering it in JSON.
ANY = (("*/*", 1.0),)


def request_accept(scope: Scope) -> str:
    """The request's `Accept` value; several headers are one list (RFC 9110)."""
    values = [value for name, value in scope.get("headers", []) if name.lower() == b"accept"]
    return ", ".join(value.decode("latin-1") for value in values)


def _quality(parameters: Iterable[str]) -> float | None:
    """The `q` parameter's weight (1 without one), None when it is not a number in [0, 1]."""
    for parameter in parameters:
        name, _, value = parameter.partition("=")
        if name.strip().lower() == "q":
            try:
                weight = float(value.strip())
            except ValueError:
                return None
            return weight if 0 <= weight <= 1 else None
    return 1.0


def accepted_ranges(header: str) -> tuple[tuple[str, float], ...]:
    """The media ranges of an `Accept` value (lower case, without parameters) and their weights;
    `ANY` for an empty header or one with a range that does not parse."""
    ranges = []
    for item in header.split(","):
        if not item.strip():
            continue  # RFC 9110 lists allow empty elements
        media_range, *parameters = item.split(";")
        media_range = media_range.strip().lower()
        kind, slash, subtype = media_range.partition("/")
        weight = _quality(parameters)
        if not slash or not kind or not subtype or weight is None or "/" in subtype:
            return ANY
        if kind == "*" and subtype != "*":
            return ANY
        ranges.append((media_range, weight))
    return tuple(ranges) or ANY


def _specificity(media_range: str, media_type: str) -> int:
    """How closely `media_range` names `media_type`: 2 exactly, 1 as `type/*`, 0 as `*/*`,
    -1 not at all."""
    if media_range == media_type:
        return 2
    kind = media_type.partition("/")[0]
    if media_range == f"{kind}/*":
        return 1
    return 0 if media_range == "*/*" else -1


def weight_of(ranges: Sequence[tuple[str, float]], media_type: str) -> float:
    """The weight the most specific range naming `media_type` gives it; 0 when none names it."""
    best, weight = -1, 0.0
    for media_range, range_weight in ranges:
        specificity = _specificity(media_range, media_type)
        if specificity > best:
            best, weight = specificity, range_weight
    return weight


def preferred(ranges: Sequence[tuple[str, float]], offered: Sequence[str]) -> str | None:
    """Of the `offered` types, the one the ranges weigh highest (the first on a tie); None when
    the ranges allow none of them."""
    best, choice = 0.0, None
    for media_type in offered:
        weight = weight_of(ranges, media_type)
        if weight > best:
            best, choice = weight, media_type
    return choice


def named_choice(ranges: Sequence[tuple[str, float]], offered: Sequence[str]) -> str:
    """Of the `offered` names of one type (JSON Lines' aliases), the one the ranges name
    themselves with the highest weight; else the first offered. A wildcard weighs them all
    alike, so it leaves the first."""
    named = [(media_range, weight) for media_range, weight in ranges if media_range in offered]
    return preferred(named, offered) or offered[0]
