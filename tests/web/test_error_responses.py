"""BentoML's and Starlette's own errors rewritten into the one JSON error shape; ours kept."""

from __future__ import annotations

import asyncio
import json
import logging
import re
import socket
import sys
import time
from urllib.parse import urlsplit

import httpx
import pytest
from pydantic import ValidationError
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, PlainTextResponse
from starlette.routing import Route
from starlette.testclient import TestClient

from clip_runner.errors import RequestError
from clip_runner.web.error_responses import (
    CallerErrorLogFilter,
    JSONErrorMiddleware,
    answer_unparsable_requests_in_json,
    normalise_error,
)
from clip_runner.web.jsonlines import InvocationLine
from tests.helpers import in_progress, raw_exchange, uvicorn_on_loopback


def test_validation_detail_names_the_field_and_becomes_422():
    body = json.dumps(
        {
            "error": "1 validation error for Input",
            "detail": [{"type": "value_error", "loc": ["classes", 2, 1], "msg": "bad flag"}],
        }
    ).encode()
    assert normalise_error(400, body) == (
        422,
        {"error": {"type": "invalid_request", "message": "classes[2][1]: bad flag"}},
    )


def test_a_flood_of_unknown_fields_is_named_in_a_bounded_message():
    """A body of 400,000 unknown keys had been answered with a 24-MB message naming each, and a
    1-MB key quoted whole (the README's rule: whole up to 200 characters)."""
    extra = [{"type": "extra_forbidden", "loc": [f"key{i}"], "msg": "x"} for i in range(25)]
    long_key = [{"type": "extra_forbidden", "loc": ["k" * 1_000_000], "msg": "x"}]
    body = json.dumps({"detail": long_key + extra}).encode()
    status, payload = normalise_error(400, body)
    message = payload["error"]["message"]
    assert status == 422 and len(message) < 1500
    assert message.startswith("k" * 64 + "... (1000000 characters): no such field")
    assert "key8: no such field" in message and "key9" not in message
    assert message.endswith("; and 16 more problems")


def test_image_validation_errors_carry_the_index():
    body = json.dumps({"detail": [{"type": "string_type", "loc": ["images", 3], "msg": "x"}]})
    status, payload = normalise_error(400, body.encode())
    assert status == 422 and payload["error"]["index"] == 3


def test_invalid_json_stays_400():
    body = json.dumps({"detail": [{"type": "json_invalid", "loc": [], "msg": "EOF"}]}).encode()
    status, payload = normalise_error(400, body)
    assert status == 400 and payload["error"]["type"] == "malformed_json"


def test_bentoml_list_wrapped_and_plain_errors_are_reshaped():
    assert normalise_error(415, b'[{"error": "bad type"}]')[1] == {
        "error": {"type": "unsupported_media_type", "message": "bad type"}
    }
    assert normalise_error(404, b"Not Found")[1]["error"]["type"] == "not_found"
    html = normalise_error(500, b"<html>Internal Server Error</html>")[1]
    assert "<" not in html["error"]["message"]


def test_our_own_errors_pass_through():
    ours = RequestError(422, "invalid_image", "images[1]: broken", 1)
    body = ours.to_response().body
    assert normalise_error(422, body) == (422, json.loads(body))


def test_middleware_rewrites_errors_and_leaves_success_alone():
    async def ok(_):
        return PlainTextResponse("fine")

    async def html_error(_):
        return HTMLResponse("<h1>boom</h1>", status_code=503)

    async def ours(_):
        return RequestError(422, "invalid_image", "images[0]: no", 0).to_response()

    async def json_error(_):
        return JSONResponse({"error": "overloaded"}, status_code=503)

    app = Starlette(
        routes=[
            Route("/ok", ok),
            Route("/html", html_error),
            Route("/ours", ours),
            Route("/json", json_error),
        ]
    )
    client = TestClient(JSONErrorMiddleware(app))
    assert client.get("/ok").text == "fine"
    html = client.get("/html")
    assert html.status_code == 503 and html.headers["content-type"] == "application/json"
    assert html.json()["error"]["type"] == "service_unavailable"
    assert client.get("/ours").json() == {
        "error": {"type": "invalid_image", "message": "images[0]: no", "index": 0}
    }
    assert client.get("/json").json()["error"]["message"] == "overloaded"
    missing = client.get("/missing")
    assert missing.status_code == 404 and missing.json()["error"]["type"] == "not_found"


def test_the_routers_404_and_405_name_the_request_and_the_methods_taken():
    async def ok(_):
        return PlainTextResponse("fine")

    app = Starlette(routes=[Route("/classify", ok, methods=["POST"])])
    client = TestClient(JSONErrorMiddleware(app))
    missing = client.get("/nowhere/" + "x" * 5000)
    assert missing.json()["error"] == {
        "type": "not_found",
        "message": f"GET /nowhere/{'x' * 191}... (5009 characters): no such route "
        "(the API: /docs.json)",
    }
    wrong_method = client.get("/classify")
    assert wrong_method.status_code == 405 and wrong_method.headers["allow"] == "POST"
    assert wrong_method.json()["error"] == {
        "type": "method_not_allowed",
        "message": "GET /classify: method not allowed; this route takes POST",
    }


def test_validation_tracebacks_become_one_warning_line():
    try:
        InvocationLine.model_validate({"images": [], "classes": [["a", 9]]})
    except ValidationError:
        record = logging.LogRecord(
            "bentoml", logging.ERROR, __file__, 1, "Exception on %s", ("/x",), sys.exc_info()
        )
    assert CallerErrorLogFilter().filter(record)
    assert record.levelno == logging.WARNING and record.exc_info is None
    assert record.getMessage().startswith(
        "rejected request: 2 validation error(s), first at images"
    )


UNPARSABLE = {
    "Content-Length beside Transfer-Encoding": b"POST / HTTP/1.1\r\nHost: x\r\n"
    b"Transfer-Encoding: chunked\r\nContent-Length: 2\r\n\r\n{}",
    "a space in a header name": b"POST / HTTP/1.1\r\nHost: x\r\nBad Header: y\r\n\r\n",
    "a broken chunk": b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
    "no request line": b"GARBAGE\r\n\r\n",
}


# h11 reads the chunks and ignores the length, as RFC 9112 allows; httptools refuses both.
CASES = [
    (protocol, name)
    for protocol in ("h11", "httptools")
    for name in sorted(UNPARSABLE)
    if not (protocol == "h11" and name == "Content-Length beside Transfer-Encoding")
]


@pytest.mark.parametrize(("protocol", "name"), CASES)
def test_a_request_uvicorn_cannot_parse_is_a_json_400_and_the_connection_closes(protocol, name):
    answer_unparsable_requests_in_json()
    app = Starlette(routes=[Route("/", lambda _: JSONResponse({}), methods=["POST"])])
    with uvicorn_on_loopback(app, protocol) as port:
        answer = raw_exchange(port, UNPARSABLE[name])  # returns once the server closed it
        good = raw_exchange(port, b"POST / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    head, _, body = answer.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = dict(line.lower().split(": ", 1) for line in lines[1:])
    assert lines[0] == "HTTP/1.1 400 Bad Request"
    assert headers["content-type"] == "application/json" and headers["connection"] == "close"
    assert int(headers["content-length"]) == len(body) and "date" in headers
    error = json.loads(body)["error"]
    assert error["type"] == "bad_request" and error["message"].startswith("invalid HTTP request")
    assert good.startswith(b"HTTP/1.1 200 OK") and good.endswith(b"{}")  # still serving


@pytest.mark.parametrize("name", sorted(set(UNPARSABLE) - {"a broken chunk"}))
def test_a_request_pipelined_behind_an_unparsable_one_is_answered_first(name):
    """Both in one write: the answer to the good request was still being made when the parser
    refused the next, and the close lost it; answers go in request order (RFC 9112, 9.3.2).
    (httptools parses ahead; h11 reads a pipelined request only once the one before is
    answered.)"""

    async def slow(_: Request) -> JSONResponse:
        await asyncio.sleep(0.3)
        return JSONResponse({"answered": True})

    answer_unparsable_requests_in_json()
    app = Starlette(routes=[Route("/", slow, methods=["POST"])])
    good = b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\n{}"
    with uvicorn_on_loopback(app, "httptools") as port:
        answers = raw_exchange(port, good + UNPARSABLE[name])
    first, _, rest = answers.partition(b"\r\n\r\n")
    assert first.startswith(b"HTTP/1.1 200 OK"), answers[:200]
    assert rest.startswith(b'{"answered":true}')
    refused = rest[rest.index(b"HTTP/1.1") :]
    assert refused.startswith(b"HTTP/1.1 400 Bad Request") and b'"bad_request"' in refused


def test_an_unparsable_request_is_logged_once(served):
    """BentoML's logging wrote each of uvicorn's warnings twice (its handler and the root's)."""
    request = b"POST /invocations HTTP/1.1\r\nHost: x\r\nBad Header: z\r\n\r\n"
    before = served.log().count("Invalid HTTP request received.")
    assert raw_exchange(served_port(served), request).startswith(b"HTTP/1.1 400")
    time.sleep(0.5)  # the log is written by another process
    assert served.log().count("Invalid HTTP request received.") == before + 1


def test_an_access_log_line_quotes_a_long_path_by_its_start(served):
    """BentoML wrote the path and Content-Type whole: a 60-kB path made a 60-kB line."""
    path = "/p" + "x" * 20_000
    response = httpx.get(f"{served.url}{path}", timeout=10)
    assert response.status_code == 404
    time.sleep(0.5)  # the log is written by another process
    lines = [line for line in served.log().splitlines() if "xxxxxxxxxx" in line]
    assert lines and all(len(line) < 2000 for line in lines)
    assert any(re.search(r"\(200\d\d characters\)\) \(status=404", line) for line in lines)


def served_port(served) -> int:
    return urlsplit(served.url).port


def errors_counted(served) -> dict[str, float]:
    metrics = httpx.get(f"{served.url}/metrics", timeout=10).text
    return {
        kind: float(value)
        for kind, value in re.findall(
            r'^clip_service_errors_total\{type="(\w+)"\} (\S+)$', metrics, re.M
        )
    }


def test_error_answers_are_counted_by_type_on_metrics(served):
    """By status alone a 422 could be a bad field, a bad image or a forbidden URL, and a JSON
    Lines answer with failed lines is a 200: `clip_service_errors_total{type}` tells them apart."""
    before = errors_counted(served)
    url = f"{served.url}/invocations"
    bad_image = {"images": ["not base64!"], "classes": [["cat", 1]]}
    assert httpx.post(url, json=bad_image, timeout=30).status_code == 422
    assert httpx.post(url, json=bad_image, timeout=30).status_code == 422
    assert httpx.post(url, json={"images": []}, timeout=30).status_code == 422
    assert httpx.post(url, content=b"x", headers={"content-type": "text/csv"}).status_code == 415
    lines = json.dumps(bad_image).encode() + b"\n{\n"
    answered = httpx.post(url, content=lines, headers={"content-type": "application/jsonlines"})
    assert answered.status_code == 200
    after = errors_counted(served)
    grown = {kind: after[kind] - before.get(kind, 0) for kind in after}
    assert {kind: n for kind, n in grown.items() if n} == {
        "invalid_image": 3,  # two requests and a line
        "invalid_request": 1,
        "unsupported_media_type": 1,
        "malformed_json": 1,  # a line
    }


def test_a_client_that_leaves_is_counted_and_leaves_the_live_gauge(served, image_host_server):
    """A client that closed its connection while its image was being fetched stayed in
    `bentoml_service_request_in_progress` for BentoML's whole traffic timeout (70 s by default),
    and was counted nowhere; it leaves the gauge at once now, counted as a 499."""
    host = image_host_server
    body = json.dumps({"images": [f"{host.url}/hang?leaver"], "labels": ["a cat"]}).encode()
    head = b"POST /classify HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
    before = errors_counted(served)
    with socket.create_connection(("127.0.0.1", urlsplit(served.url).port), timeout=10) as sock:
        sock.sendall(head + b"Content-Length: %d\r\n\r\n" % len(body) + body)
        started_by = time.monotonic() + 15
        while "/hang?leaver" not in host.access_log:
            assert time.monotonic() < started_by, "the image was never fetched"
            time.sleep(0.05)
        metrics = httpx.get(f"{served.url}/metrics", timeout=10).text
        assert in_progress(metrics, "/classify") == 1
    left_by = time.monotonic() + 10
    while in_progress(httpx.get(f"{served.url}/metrics", timeout=10).text, "/classify"):
        assert time.monotonic() < left_by, "still in progress 10 s after the client left"
        time.sleep(0.1)
    grown = errors_counted(served).get("client_closed_request", 0) - before.get(
        "client_closed_request", 0
    )
    assert grown == 1
