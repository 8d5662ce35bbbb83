"""RequestGuardMiddleware on a real ASGI app served by uvicorn-free Starlette test transport."""

from __future__ import annotations

import asyncio
import json

import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from clip_runner.traffic import RequestGuardMiddleware, is_json_media_type


def guarded_app(state: dict, **options) -> RequestGuardMiddleware:
    async def echo(request: Request) -> Response:
        body = await request.body()
        return JSONResponse({"size": len(body)})

    async def slow(_: Request) -> Response:
        state["started"] = state.get("started", 0) + 1
        try:
            await asyncio.sleep(10)
        except asyncio.CancelledError:
            state["cancelled"] = state.get("cancelled", 0) + 1
            raise
        return Response("late")

    async def ping(_: Request) -> Response:
        return Response(status_code=200)

    app = Starlette(
        routes=[
            Route("/invocations", echo, methods=["POST"]),
            Route("/slow", slow, methods=["POST"]),
            Route("/ping", ping),
        ]
    )
    settings = {"max_concurrency": 2, "max_body_bytes": 1000, "timeout_s": 0.5, **options}
    return RequestGuardMiddleware(app, **settings)


def client(app) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test")


@pytest.mark.parametrize(
    ("content_type", "json_like"),
    [
        ("application/json", True),
        ("application/json; charset=utf-8", True),
        ("Application/JSON", True),
        ("application/vnd.api+json", True),
        ("", True),
        ("text/plain", False),
        ("multipart/form-data; boundary=x", False),
    ],
)
def test_json_media_types(content_type, json_like):
    assert is_json_media_type(content_type) is json_like


def test_body_limits_and_content_types():
    async def go():
        async with client(guarded_app({})) as c:
            small = await c.post("/invocations", content=b"x" * 1000)
            big = await c.post("/invocations", content=b"x" * 1001)
            text = await c.post(
                "/invocations", content=b"{}", headers={"content-type": "text/plain"}
            )
            return small, big, text

    small, big, text = asyncio.run(go())
    assert small.json() == {"size": 1000}
    assert big.status_code == 413 and big.json()["error"]["type"] == "payload_too_large"
    assert text.status_code == 415 and "application/json" in text.json()["error"]["message"]


def test_streamed_body_over_the_limit_is_413_without_content_length():
    async def chunks():
        for _ in range(5):
            yield b"x" * 400

    async def go():
        async with client(guarded_app({})) as c:
            return await c.post("/invocations", content=chunks())

    response = asyncio.run(go())
    assert response.status_code == 413


def test_deadline_answers_504_and_cancels_the_handler():
    state: dict = {}

    async def go():
        async with client(guarded_app(state)) as c:
            return await c.post("/slow", content=b"{}")

    response = asyncio.run(go())
    assert response.status_code == 504
    assert json.loads(response.text)["error"] == {
        "type": "timeout",
        "message": "the request was not answered within 0.5 s",
    }
    assert state == {"started": 1, "cancelled": 1}


def test_concurrency_cap_answers_429_and_ping_is_exempt():
    state: dict = {}

    async def go():
        async with client(guarded_app(state, timeout_s=2)) as c:
            stuck = [asyncio.ensure_future(c.post("/slow", content=b"{}")) for _ in range(2)]
            await asyncio.sleep(0.2)
            refused = await c.post("/slow", content=b"{}")
            ping = await c.get("/ping")
            await asyncio.gather(*stuck)
            after = await c.post("/invocations", content=b"{}")
            return refused, ping, after

    refused, ping, after = asyncio.run(go())
    assert refused.status_code == 429 and refused.headers["retry-after"] == "1"
    assert ping.status_code == 200
    assert after.status_code == 200  # the slots were given back
    assert state["started"] == 2
