"""About one answer in N closes its connection: unit tests on the ASGI layer, then a real server
with two API workers (the tiny model's default on CPU) answering keep-alive clients."""

from __future__ import annotations

import asyncio

import httpx
import pytest

from clip_runner.config import KEEPALIVE_REQUESTS_WITH_SEVERAL_WORKERS
from clip_runner.web.connection_recycling import ConnectionRecyclingMiddleware
from tests.helpers import SEED_CLASSES, as_base64, assert_same_answer, photo_like


async def answer(scope, receive, send) -> None:
    headers = [(b"content-type", b"text/plain"), (b"connection", b"keep-alive")]
    await send({"type": "http.response.start", "status": 200, "headers": headers})
    await send({"type": "http.response.body", "body": b"ok"})


def headers_sent(middleware: ConnectionRecyclingMiddleware, kind: str = "http") -> list:
    sent: list[dict] = []

    async def send(message: dict) -> None:
        sent.append(message)

    async def receive() -> dict:
        return {"type": "http.request", "body": b""}

    asyncio.run(middleware({"type": kind}, receive, send))
    assert sent[1]["body"] == b"ok"  # the body passes untouched
    return sent[0]["headers"]


@pytest.mark.parametrize(
    ("every", "draw", "closes"),
    [(1, 0.999, True), (4, 0.2, True), (4, 0.25, False), (20, 0.04, True), (20, 0.05, False)],
)
def test_an_answer_closes_its_connection_when_the_draw_falls_under_one_in_every(
    every, draw, closes
):
    headers = headers_sent(ConnectionRecyclingMiddleware(answer, every, draw=lambda: draw))
    connection = [value for name, value in headers if name == b"connection"]
    assert connection == ([b"close"] if closes else [b"keep-alive"])  # never both
    assert (b"content-type", b"text/plain") in headers


def test_zero_never_closes_and_other_scopes_pass_through():
    never = ConnectionRecyclingMiddleware(answer, 0, draw=lambda: 0.0)
    assert (b"connection", b"keep-alive") in headers_sent(never)
    always = ConnectionRecyclingMiddleware(answer, 1, draw=lambda: 0.0)
    assert (b"connection", b"keep-alive") in headers_sent(always, kind="websocket")


def test_a_server_with_several_api_workers_recycles_keep_alive_connections(served):
    """200 requests over 8 keep-alive connections: all answered, and about one in 20 closed its
    connection (none at all would happen with probability 0.95 ** 200, about 4e-5)."""
    body = {"images": [as_base64(photo_like(48, 40, seed=5))], "classes": SEED_CLASSES}

    async def go() -> list[httpx.Response]:
        limits = httpx.Limits(max_connections=8)
        async with httpx.AsyncClient(base_url=served.url, timeout=60, limits=limits) as client:
            return await asyncio.gather(
                *(client.post("/invocations", json=body) for _ in range(200))
            )

    answers = asyncio.run(go())
    assert [a.status_code for a in answers] == [200] * 200
    for other in answers[1:]:  # the same image: the same answer from any worker
        assert_same_answer(other.json(), answers[0].json())
    closed = sum(a.headers.get("connection") == "close" for a in answers)
    expected = 200 / KEEPALIVE_REQUESTS_WITH_SEVERAL_WORKERS
    assert 1 <= closed <= 4 * expected
