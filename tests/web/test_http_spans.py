"""The API service's requests each get one OpenTelemetry span, without per-message spans."""

from __future__ import annotations

import asyncio

import httpx
import pytest
from opentelemetry.instrumentation import asgi
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from clip_runner.web.http_spans import RequestSpanMiddleware, one_span_per_request
from tests.helpers import SEED_CLASSES, as_base64, photo_like

# OpenTelemetry's own class (the module attribute is ours once service.py has been imported).
OPEN_TELEMETRY_MIDDLEWARE = RequestSpanMiddleware.__bases__[0]


async def echo(request: Request) -> JSONResponse:
    return JSONResponse({"received": len(await request.body())})


def spans_of_one_request(middleware: type, **options: object) -> list[str]:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    app = middleware(
        Starlette(routes=[Route("/echo", echo, methods=["POST"])]),
        tracer_provider=provider,
        **options,
    )

    async def post() -> httpx.Response:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            return await client.post("/echo", content=b"x" * 1000)

    assert asyncio.run(post()).json() == {"received": 1000}
    return [span.name for span in exporter.get_finished_spans()]


def test_plain_middleware_opens_spans_per_message_and_ours_only_the_request_span():
    plain = spans_of_one_request(OPEN_TELEMETRY_MIDDLEWARE)
    ours = spans_of_one_request(RequestSpanMiddleware)
    assert len(ours) == 1 and ours[0].startswith("POST")
    assert len(plain) >= 5 and any("send" in name for name in plain)


def test_an_explicit_choice_of_spans_is_kept():
    assert len(spans_of_one_request(RequestSpanMiddleware, exclude_spans=[])) > 1


def test_the_service_makes_bentoml_build_ours(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(asgi, "OpenTelemetryMiddleware", OPEN_TELEMETRY_MIDDLEWARE)
    assert one_span_per_request() is True
    assert asgi.OpenTelemetryMiddleware is RequestSpanMiddleware
    assert one_span_per_request() is True  # idempotent


def test_served_requests_keep_their_own_request_id(served):
    """BentoML reads the request id from the request's span: it must still be there."""
    body = {"images": [as_base64(photo_like(64, 48, seed=5), "JPEG")], "classes": SEED_CLASSES}
    answers = [httpx.post(f"{served.url}/invocations", json=body, timeout=30) for _ in range(3)]
    assert [answer.status_code for answer in answers] == [200] * 3
    ids = {answer.headers.get("x-bentoml-request-id") for answer in answers}
    assert None not in ids and len(ids) == 3
