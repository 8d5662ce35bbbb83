"""One OpenTelemetry span per HTTP request in the API service, not five or more.

BentoML wraps the API service in OpenTelemetry's ASGI middleware, which by default opens an
"http receive" span for each call to `receive` and an "http send" span for each message sent,
beside the request's own span: five spans for a small JSON request (tests/web/test_http_spans.py),
and BentoML records every span, sampled or not (its sampler always records). OpenTelemetry lets
the per-message ones be left out (`exclude_spans`), but BentoML does not pass it. This module
gives BentoML's middleware that default, so each request keeps its span (its
`X-BentoML-Request-ID`, an exporter's trace) without the per-message ones.

With JPEGs forwarded to the runner (the GPU path) those spans cost about a tenth of an API
worker's CPU per request (BENCHMARKS.md).
"""

from __future__ import annotations

import inspect
from typing import Any

from opentelemetry.instrumentation import asgi

PER_MESSAGE_SPANS = ["receive", "send"]


class RequestSpanMiddleware(asgi.OpenTelemetryMiddleware):
    """OpenTelemetry's ASGI middleware leaving out the per-message spans unless told otherwise."""

    def __init__(self, app: Any, **options: Any) -> None:
        options.setdefault("exclude_spans", PER_MESSAGE_SPANS)
        super().__init__(app, **options)


def one_span_per_request() -> bool:
    """Make the middleware BentoML builds (it imports the class when it builds the app, after
    this service module is loaded) the one above. False where this OpenTelemetry version has no
    `exclude_spans` (before 0.46b0): its middleware is then left as it is."""
    original = asgi.OpenTelemetryMiddleware
    if original is RequestSpanMiddleware:
        return True
    if "exclude_spans" not in inspect.signature(original.__init__).parameters:
        return False
    asgi.OpenTelemetryMiddleware = RequestSpanMiddleware
    return True
