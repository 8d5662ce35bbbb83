"""The runner's direct route: which requests it answers, and how it answers errors.

Its answers' numbers are tested over a real server with the real model in
tests/answers/test_direct_runner.py, and through the served API everywhere else."""

from __future__ import annotations

import asyncio

import httpx
import numpy as np
import pytest
from bentoml._internal.server.http.traffic import TimeoutMiddleware
from bentoml.exceptions import ServiceUnavailable
from starlette.responses import PlainTextResponse

from clip_runner.model.direct_calls import DirectCallsMiddleware
from clip_runner.model.runner_wire import (
    MEDIA_TYPE,
    ROWS_HEADER,
    pack_pixels,
    pack_token_ids,
    unpack_embeddings,
)

BENTOML_ENDPOINT = PlainTextResponse("BentoML's endpoint", status_code=299)


def post(handler, path: str, body: bytes, headers: dict[str, str]) -> httpx.Response:
    app = DirectCallsMiddleware(BENTOML_ENDPOINT, handler)

    async def call() -> httpx.Response:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://runner") as client:
            return await client.post(path, content=body, headers=headers)

    return asyncio.run(call())


def wire(rows_header: str) -> dict[str, str]:
    return {"content-type": MEDIA_TYPE, ROWS_HEADER: rows_header}


def wire_body(token_ids: list[list[int]]) -> tuple[bytes, dict[str, str]]:
    body, header = pack_token_ids(token_ids)
    return body, wire(header)


async def row_sums(method: str, rows) -> np.ndarray:
    """Stands in for the runner's method: one row per input, naming the method by its length."""
    sums = [float(np.sum(np.asarray(row, dtype=np.float64))) for row in rows]
    return np.array([[total] * len(method) for total in sums], np.float32)


def test_a_wire_call_is_answered_by_the_method_of_its_route():
    token_ids = [[1, 2, 3], [40, 2]]
    answer = post(row_sums, "/encode_tokens", *wire_body(token_ids))
    assert answer.status_code == 200
    embeddings = unpack_embeddings(answer.content, answer.headers[ROWS_HEADER])
    np.testing.assert_array_equal(embeddings, [[6.0] * 13, [42.0] * 13])


@pytest.mark.parametrize(
    ("path", "headers"),
    [
        ("/encode_images", {"content-type": "application/vnd.bentoml+pickle"}),
        ("/encode_images", {"content-type": "application/json"}),
        ("/describe", wire("1")),
        ("/readyz", wire("1")),
    ],
)
def test_other_requests_go_to_bentomls_endpoint(path, headers):
    answer = post(row_sums, path, b"x", headers)
    assert (answer.status_code, answer.text) == (299, "BentoML's endpoint")


def test_a_malformed_body_is_a_400_naming_what_was_wrong():
    body, _ = pack_pixels(np.zeros((1, 2, 2, 3), np.uint8))
    answer = post(row_sums, "/encode_images", bytes(body), wire("1,2,3,3"))
    assert answer.status_code == 400
    assert "take 18 bytes, not 12" in answer.text


def test_the_queue_bound_answers_503_as_bentomls_endpoint_does():
    async def overloaded(method: str, rows) -> np.ndarray:
        raise ServiceUnavailable("the model's queue is full: queued 5.1 s")

    answer = post(overloaded, "/encode_tokens", *wire_body([[1]]))
    assert (answer.status_code, answer.text) == (503, "the model's queue is full: queued 5.1 s")


@pytest.mark.parametrize(
    ("error", "detail"),
    [
        (RuntimeError("CUDA error: an illegal memory access"), "CUDA"),
        # Only a malformed body is the caller's 400: a ValueError out of the method (a shape bug
        # in a pass) is the runner's own failure, and its log says so.
        (ValueError("operands could not be broadcast together"), "broadcast"),
    ],
)
def test_a_failing_method_is_a_500_without_its_details(caplog, error, detail):
    async def broken(method: str, rows) -> np.ndarray:
        raise error

    answer = post(broken, "/encode_tokens", *wire_body([[1]]))
    assert answer.status_code == 500
    assert detail not in answer.text
    assert "runner call /encode_tokens failed" in caplog.text


def test_a_caller_that_leaves_mid_body_is_answered_for_the_layers_outside():
    """An API worker that gives up while sending its call: nothing reaches it, but an answer
    ends BentoML's TimeoutMiddleware around this one, which had held the call for its traffic
    timeout."""
    app = TimeoutMiddleware(DirectCallsMiddleware(BENTOML_ENDPOINT, row_sums), timeout=20)
    messages = [{"type": "http.request", "body": b"\0", "more_body": True}]
    sent: list[dict] = []

    async def receive() -> dict:
        return messages.pop(0) if messages else {"type": "http.disconnect"}

    async def send(message: dict) -> None:
        sent.append(message)

    headers = [(key.encode(), value.encode()) for key, value in wire("1").items()]
    scope = {"type": "http", "method": "POST", "path": "/encode_tokens", "headers": headers}
    asyncio.run(asyncio.wait_for(app(scope, receive, send), 5))
    assert sent[0]["status"] == 499
