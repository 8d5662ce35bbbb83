"""Bounds on a request's headers: their size and the time they take to arrive.

uvicorn reads a request's headers before any ASGI middleware sees the request, so the body's
bounds (traffic.py: its size, its deadline, its admission) cannot reach them, and BentoML
passes uvicorn no setting for them. uvicorn 0.55 with httptools sets none itself: measured
here, one 50-MB header was read whole (the API worker grew by about 80 MB), and a connection
that sends nothing, or a header byte a second, was held open for good (slowloris; it holds a
file descriptor per connection, and a peer that vanished without closing leaks one for ever).

`bound_request_headers` gives uvicorn's httptools protocol (what `requirements.txt` installs
and uvicorn picks) both bounds:
- **size**: a request line and headers over `max_bytes` get 431 `headers_too_large`, checked
  when their end arrives and, before it, from the bytes read so far (so headers that never
  end are not held in memory);
- **time**: a request's headers must be complete within `timeout_s` of its first byte, or of
  the connection's opening for its first request; else 408 `header_timeout`, or a silent close
  where not one byte of a request came (there is nothing to answer; uvicorn's keep-alive
  timeout does the same to an idle connection between requests).
Both answers are JSON and close the connection. Without httptools uvicorn parses with h11,
which refuses headers over 16 KiB itself (a 400) but has no deadline either.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from http import HTTPStatus
from typing import Any

from clip_runner.errors import error_body
from clip_runner.web.error_responses import answer_past_the_app
from clip_runner.web.traffic import CLOSE, send_error

TOO_LARGE_STATUS, TOO_LARGE = HTTPStatus.REQUEST_HEADER_FIELDS_TOO_LARGE, "headers_too_large"


@dataclass(frozen=True)
class HeaderLimits:
    timeout_s: float
    max_bytes: int


class HeaderWatch:
    """One connection's watch over the headers of the request it is receiving."""

    def __init__(self, protocol: Any, limits: HeaderLimits) -> None:
        self.protocol = protocol
        self.limits = limits
        self.reading = True  # between a request's first byte (or the opening) and its headers
        self.begun = False  # whether a byte of this request has arrived
        self.unfinished_reads = 0  # bytes of reads that ended inside this request's headers
        self.parsed = 0  # bytes of its request line and header lines, as the parser gave them
        self.deadline: asyncio.TimerHandle | None = None
        self._arm()

    def _arm(self) -> None:
        self.deadline = self.protocol.loop.call_later(self.limits.timeout_s, self._expired)

    def cancel(self) -> None:
        if self.deadline is not None:
            self.deadline.cancel()
            self.deadline = None

    def message_begun(self) -> None:
        """A request's first byte arrived (httptools' `on_message_begin`). The connection's
        first request keeps the deadline armed at the opening."""
        self.reading, self.begun = True, True
        self.unfinished_reads = self.parsed = 0
        if self.deadline is None:
            self._arm()

    def parsed_url(self, url: bytes) -> None:
        self.parsed += len(url)

    def parsed_header(self, name: bytes, value: bytes) -> None:
        self.parsed += len(name) + len(value) + len(b": \r\n")

    def headers_complete(self) -> bool:
        """The headers' end arrived: whether they are within the limit, counted as sent with
        one space after each colon (httptools gives the parts, not the bytes)."""
        self.reading = False
        self.cancel()
        method = self.protocol.parser.get_method()
        request_line = len(method) + len(b"  HTTP/1.1\r\n")
        return request_line + self.parsed + len(b"\r\n") <= self.limits.max_bytes

    def received(self, data: bytes) -> None:
        """After the parser took `data`: while this request's headers are still incomplete,
        counts the read and refuses past the limit, so headers that never end are not held
        in memory. Counting whole reads can only undercount (the read that completes the
        headers is not counted; `headers_complete` checks that one), except where a pipelined
        request begins in the same read as the end of the one before."""
        if not (self.reading and self.begun) or self.protocol.transport.is_closing():
            return
        self.unfinished_reads += len(data)
        if self.unfinished_reads > self.limits.max_bytes:
            self.cancel()
            # After any answer still being sent to the request before (answer_past_the_app): it
            # had been closed without it.
            body = error_body(TOO_LARGE, self.too_large_message())
            answer_past_the_app(self.protocol, TOO_LARGE_STATUS, body)

    def too_large_message(self) -> str:
        return (
            f"the request's headers are over the {self.limits.max_bytes}-byte limit "
            "(send large values such as image data in the body)"
        )

    def _expired(self) -> None:
        self.deadline = None
        if self.protocol.transport.is_closing():
            return
        if self._answering():  # a pipelined request behind one still being answered
            self._arm()
        elif not self.begun:
            self.protocol.transport.close()
        else:
            message = f"the request's headers did not arrive within {self.limits.timeout_s:g} s"
            body = error_body("header_timeout", message)
            answer_past_the_app(self.protocol, HTTPStatus.REQUEST_TIMEOUT, body)

    def _answering(self) -> bool:
        cycle = self.protocol.cycle
        return cycle is not None and not cycle.response_complete


def refusal_app(status: HTTPStatus, error_type: str, message: str) -> Any:
    """An ASGI app answering every request with this error and closing the connection: what
    uvicorn runs instead of the service for a request whose headers are over the limit (as
    it runs its own 503 app past `limit_concurrency`), so the answer follows any before it."""

    async def refuse(_scope: Any, _receive: Any, send: Any) -> None:
        await send_error(send, status, error_type, message, [CLOSE])

    return refuse


_limits: HeaderLimits | None = None


def bound_request_headers(limits: HeaderLimits) -> None:
    """Give uvicorn's httptools protocol `limits` (each call replaces the last; its methods are
    wrapped once). Without httptools installed there is nothing to bound here."""
    global _limits
    try:
        from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
    except ImportError:
        return
    _limits = limits
    if getattr(HttpToolsProtocol, "header_limits_wrapped", False):
        return
    HttpToolsProtocol.header_limits_wrapped = True
    connection_made = HttpToolsProtocol.connection_made
    connection_lost = HttpToolsProtocol.connection_lost
    data_received = HttpToolsProtocol.data_received
    on_message_begin = HttpToolsProtocol.on_message_begin
    on_url = HttpToolsProtocol.on_url
    on_header = HttpToolsProtocol.on_header
    on_headers_complete = HttpToolsProtocol.on_headers_complete

    def watched_connection_made(self: Any, transport: Any) -> None:
        connection_made(self, transport)
        self.header_watch = HeaderWatch(self, _limits)

    def watched_connection_lost(self: Any, exc: Exception | None) -> None:
        self.header_watch.cancel()
        connection_lost(self, exc)

    def watched_data_received(self: Any, data: bytes) -> None:
        data_received(self, data)
        self.header_watch.received(data)

    def watched_message_begin(self: Any) -> None:
        on_message_begin(self)
        self.header_watch.message_begun()

    def watched_url(self: Any, url: bytes) -> None:
        on_url(self, url)
        self.header_watch.parsed_url(url)

    def watched_header(self: Any, name: bytes, value: bytes) -> None:
        on_header(self, name, value)
        self.header_watch.parsed_header(name, value)

    def watched_headers_complete(self: Any) -> None:
        if self.header_watch.headers_complete():
            on_headers_complete(self)
            return
        message = self.header_watch.too_large_message()
        app, self.app = self.app, refusal_app(TOO_LARGE_STATUS, TOO_LARGE, message)
        # The refusal never reads the target, and httptools' URL parser refuses one past 65,535
        # bytes (a 400 "invalid HTTP request" where the same bytes in a header are a 431).
        self.url = b"/"
        try:
            on_headers_complete(self)
        finally:
            self.app = app

    HttpToolsProtocol.connection_made = watched_connection_made
    HttpToolsProtocol.connection_lost = watched_connection_lost
    HttpToolsProtocol.data_received = watched_data_received
    HttpToolsProtocol.on_message_begin = watched_message_begin
    HttpToolsProtocol.on_url = watched_url
    HttpToolsProtocol.on_header = watched_header
    HttpToolsProtocol.on_headers_complete = watched_headers_complete
