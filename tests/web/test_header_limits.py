"""The bounds on request headers: on a real uvicorn server parsing with httptools (as served),
and on the served models."""

from __future__ import annotations

import asyncio
import json
import socket
import time
from collections.abc import Iterator

import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from clip_runner.config import get_settings
from clip_runner.web.header_limits import HeaderLimits, bound_request_headers
from tests.helpers import (
    GUARD_AUTH,
    GUARD_SETTINGS,
    SEED_CLASSES,
    as_base64,
    photo_like,
    raw_exchange,
    uvicorn_on_loopback,
)

TIMEOUT_S = 0.5
# uvicorn runs uvloop, whose timers count in whole milliseconds of the loop's cached clock: one
# fired 0.08 ms before its 0.5-s deadline by the monotonic clock (the GPU rehearsal's run), and
# 200 of 50 ms up to 0.7 ms early here.
TIMER_SLACK_S = 0.002
MAX_BYTES = 4096


async def echo(request: Request) -> JSONResponse:
    """The body's length, after `?wait=` seconds."""
    await asyncio.sleep(float(request.query_params.get("wait", 0)))
    return JSONResponse({"received": len(await request.body())})


@pytest.fixture
def port() -> Iterator[int]:
    bound_request_headers(HeaderLimits(TIMEOUT_S, MAX_BYTES))
    app = Starlette(routes=[Route("/", echo, methods=["GET", "POST"])])
    try:
        with uvicorn_on_loopback(app, "httptools") as port:
            yield port
    finally:  # the served defaults again, for any other server this process starts
        settings = get_settings()
        bound_request_headers(HeaderLimits(settings.header_timeout_s, settings.max_header_bytes))


def request(headers: bytes = b"", body: bytes = b"", path: str = "/") -> bytes:
    head = b"POST %s HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n" % (path.encode(), len(body))
    return head + headers + b"\r\n" + body


def answers(data: bytes) -> list[tuple[int, dict]]:
    """Every (status, JSON body) in `data`, read as a run of responses with Content-Length."""
    found = []
    while data:
        head, _, rest = data.partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        headers = dict(line.lower().split(": ", 1) for line in lines[1:])
        length = int(headers["content-length"])
        found.append((int(lines[0].split(" ")[1]), json.loads(rest[:length])))
        data = rest[length:]
    return found


def closing_exchange(port: int, pieces: list[bytes], pause_s: float = 0.0) -> tuple[bytes, float]:
    """Send `pieces` `pause_s` apart (stopping early if the server closes), then read until the
    server closes: (everything it answered, seconds from connecting to the close)."""
    started = time.monotonic()
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        for piece in pieces:
            try:
                sock.sendall(piece)
            except OSError:  # closed by the server already
                break
            time.sleep(pause_s)
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    return answer, time.monotonic() - started


def good(port: int) -> None:
    """The server still answers a plain request."""
    assert answers(raw_exchange(port, request(b"Connection: close\r\n"))) == [
        (200, {"received": 0})
    ]


@pytest.mark.parametrize(
    "headers",
    [
        b"X-Big: " + b"a" * 100_000 + b"\r\n",  # one long value
        b"".join(b"X-%d: y\r\n" % index for index in range(2_000)),  # many small ones
    ],
    ids=["one long header", "many headers"],
)
def test_headers_over_the_limit_get_a_json_431_and_the_connection_closes(port, headers):
    answer = raw_exchange(port, request(headers))
    assert answers(answer) == [
        (
            431,
            {
                "error": {
                    "type": "headers_too_large",
                    "message": f"the request's headers are over the {MAX_BYTES}-byte limit "
                    "(send large values such as image data in the body)",
                }
            },
        )
    ]
    assert b"\r\nconnection: close\r\n" in answer
    good(port)


def test_a_request_line_past_the_url_parsers_limit_gets_the_431_too(port):
    """httptools' URL parser takes at most 65,535 bytes: a longer request line over the limit
    had been a 400 "invalid HTTP request", where the same bytes in a header are a 431."""
    answer = raw_exchange(port, request(path="/" + "a" * 70_000))
    assert [status for status, _ in answers(answer)] == [431]
    good(port)


def test_headers_that_never_end_are_refused_once_past_the_limit(port):
    """A header sent in 1,000-byte reads that never ends: refused from the reads alone,
    before its end (which never comes), so it is not held in memory."""
    value = [b"a" * 1_000] * (2 * MAX_BYTES // 1_000)
    answer, _ = closing_exchange(port, [b"POST / HTTP/1.1\r\nX-Endless: ", *value], pause_s=0.02)
    assert [status for status, _ in answers(answer)] == [431]


def test_headers_within_the_limit_pass_however_they_are_split_and_bodies_are_not_counted(port):
    headers = b"X-Near: " + b"a" * (MAX_BYTES - 200) + b"\r\nConnection: close\r\n"
    whole = request(headers, body=b"b" * 200_000)
    pieces = [whole[start : start + 100] for start in range(0, MAX_BYTES, 100)]
    pieces.append(whole[MAX_BYTES:])
    answer, _ = closing_exchange(port, pieces)
    assert answers(answer) == [(200, {"received": 200_000})]


def test_headers_that_stall_get_a_json_408_at_the_deadline(port):
    answer, took_s = closing_exchange(port, [b"POST / HTTP/1.1\r\nHost: x\r\n"])
    assert answers(answer) == [
        (
            408,
            {
                "error": {
                    "type": "header_timeout",
                    "message": f"the request's headers did not arrive within {TIMEOUT_S:g} s",
                }
            },
        )
    ]
    assert TIMEOUT_S - TIMER_SLACK_S <= took_s < TIMEOUT_S + 2
    good(port)


def test_a_trickle_does_not_move_the_deadline(port):
    """A byte every 0.05 s: the deadline counts from the opening, not from the last byte."""
    trickle = [bytes([byte]) for byte in request(b"X-Slow: " + b"a" * 100 + b"\r\n")]
    answer, took_s = closing_exchange(port, trickle, pause_s=0.05)
    assert [status for status, _ in answers(answer)] == [408]
    assert took_s < TIMEOUT_S + 2 < len(trickle) * 0.05


def test_a_connection_that_sends_nothing_is_closed_without_an_answer(port):
    answer, took_s = closing_exchange(port, [])
    assert answer == b"" and TIMEOUT_S - TIMER_SLACK_S <= took_s < TIMEOUT_S + 2


def test_idle_kept_alive_connections_are_uvicorns_and_each_request_has_its_own_deadline(port):
    """Idle between requests for longer than the header deadline, the connection still takes
    a request (uvicorn's keep-alive timeout, 5 s, closes idle ones); a later request's headers
    get their own deadline from their first byte."""
    answer, _ = closing_exchange(
        port, [request(), request(), b"POST / HTTP/1.1\r\n"], pause_s=TIMEOUT_S * 2
    )
    assert [status for status, _ in answers(answer)] == [200, 200, 408]


def test_a_request_behind_a_slow_answer_is_timed_out_only_after_that_answer(port):
    """A request still being answered (1.2 s) when the next one's stalled headers pass their
    deadline: the first is answered whole, then the second gets its 408."""
    answer, took_s = closing_exchange(port, [request(path="/?wait=1.2") + b"POST / HTTP/1.1\r\n"])
    assert answers(answer)[0] == (200, {"received": 0})
    assert [status for status, _ in answers(answer)] == [200, 408]
    assert 1.2 <= took_s < 1.2 + TIMEOUT_S + 2


def test_endless_headers_behind_a_slow_answer_are_refused_after_that_answer(port):
    """A request still being answered when the next one's never-ending headers pass the limit:
    the close had lost the first answer; it is sent whole, then the 431."""
    endless = [b"a" * 1_000] * (2 * MAX_BYTES // 1_000)
    pieces = [request(path="/?wait=0.5") + b"POST / HTTP/1.1\r\nX-Endless: ", *endless]
    answer, _ = closing_exchange(port, pieces, pause_s=0.02)
    assert answers(answer)[0] == (200, {"received": 0})
    assert [status for status, _ in answers(answer)] == [200, 431]


def served_port(url: str) -> int:
    return int(url.rsplit(":", 1)[1])


def test_served_headers_over_the_default_limit_get_a_431(served):
    limit = get_settings().max_header_bytes
    answer = raw_exchange(served_port(served.url), request(b"X-Big: " + b"a" * limit + b"\r\n"))
    [(status, body)] = answers(answer)
    assert status == 431 and body["error"]["type"] == "headers_too_large"
    assert f"over the {limit}-byte limit" in body["error"]["message"]
    assert httpx.get(f"{served.url}/ping", timeout=10).status_code == 200


def test_served_stalled_headers_get_a_408_while_good_requests_are_answered(guarded):
    """Eight connections whose headers stall: a good request is answered meanwhile, and each
    of the eight gets its 408 at CLIP_HEADER_TIMEOUT_S."""
    deadline_s = float(GUARD_SETTINGS["CLIP_HEADER_TIMEOUT_S"])
    stalled = []
    for _ in range(8):
        sock = socket.create_connection(("127.0.0.1", served_port(guarded.url)), timeout=10)
        sock.sendall(b"POST /invocations HTTP/1.1\r\nHost: x\r\n")
        stalled.append(sock)
    started = time.monotonic()
    body = {"images": [as_base64(photo_like(40, 40, seed=3))], "classes": SEED_CLASSES}
    good = httpx.post(f"{guarded.url}/invocations", json=body, headers=GUARD_AUTH, timeout=30)
    assert good.status_code == 200, good.text
    for sock in stalled:
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
        sock.close()
        assert [(status, body["error"]["type"]) for status, body in answers(answer)] == [
            (408, "header_timeout")
        ]
    assert deadline_s - 0.5 <= time.monotonic() - started < deadline_s + 5
