"""Every 4xx/5xx response in the project's JSON error shape (`clip_runner.errors`).

BentoML and Starlette answer some mistakes themselves (validation, unknown route, wrong method)
in their own formats; the middleware here rewrites those, so a client never sees HTML, a bare
string, or BentoML's own format. Validation tracebacks become one warning line in the log. A
request uvicorn cannot parse at all is answered by uvicorn itself, before any middleware:
`answer_unparsable_requests_in_json` gives that answer the same shape.
"""

from __future__ import annotations

import importlib
import json
import logging
from dataclasses import dataclass
from http import HTTPStatus
from typing import Any

from pydantic import ValidationError
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from clip_runner.errors import error_body, quoted
from clip_runner.metrics import SERVICE_ERRORS

# A field name as a message quotes it: unknown fields are named, and a key may be megabytes long.
QUOTED_FIELD_CHARS = 64
# The problems a 422 names; the rest are counted. One body of 400,000 unknown keys had been
# answered with a 24-MB message naming each (and logged whole).
REPORTED_PROBLEMS = 10


def _location(loc: list[Any]) -> str:
    """`["classes", 0, 1]` -> `classes[0][1]`: the path a user can find in their request."""
    text = ""
    for part in loc:
        if isinstance(part, int):
            text += f"[{part}]"
        else:
            name = quoted(str(part), QUOTED_FIELD_CHARS)
            text += f".{name}" if text else name
    return text or "body"


def _reason(item: dict[str, Any]) -> str:
    """One pydantic error's message, for a caller: without the "Value error, " prefix pydantic
    gives custom validators' messages, and an unknown field said as such (pydantic's "Extra
    inputs are not permitted" does not say what was wrong with them)."""
    if item.get("type") == "extra_forbidden":
        return "no such field (the route's fields are in /docs.json)"
    return str(item.get("msg", "")).removeprefix("Value error, ")


def from_validation_detail(
    detail: list[dict[str, Any]], total: int | None = None
) -> tuple[int, dict[str, Any]]:
    """Turn pydantic's error list (as BentoML reports it) into (status, our error body);
    `total`: how many problems the body had, where `detail` holds only the first ones."""
    if any(item.get("type") == "json_invalid" for item in detail):
        reason = next(item.get("msg", "") for item in detail if item.get("type") == "json_invalid")
        return 400, error_body("malformed_json", f"request body is not valid JSON: {reason}")
    if any(item.get("type") == "model_type" and not item.get("loc") for item in detail):
        return 400, error_body("malformed_json", "request body must be a JSON object")
    messages = [
        f"{_location(list(item.get('loc', [])))}: {_reason(item)}"
        for item in detail[:REPORTED_PROBLEMS]
    ]
    if (more := (total or len(detail)) - len(messages)) > 0:
        messages.append(f"and {more} more problems")
    first_index = next(
        (
            item["loc"][1]
            for item in detail
            if len(item.get("loc", [])) > 1
            and item["loc"][0] == "images"
            and isinstance(item["loc"][1], int)
        ),
        None,
    )
    return 422, error_body("invalid_request", "; ".join(messages), first_index)


_STATUS_TYPES = {
    400: "bad_request",
    404: "not_found",
    405: "method_not_allowed",
    413: "payload_too_large",
    415: "unsupported_media_type",
    422: "invalid_request",
    429: "too_many_requests",
    499: "client_closed_request",
    500: "internal_error",
    503: "service_unavailable",
    504: "timeout",
}


def normalise_error(status: int, body: bytes) -> tuple[int, dict[str, Any]]:
    """Map any error response body to (status, our error body); ours pass through unchanged."""
    try:
        parsed: Any = json.loads(body) if body else None
    except ValueError:
        parsed = None
    # BentoML wraps some messages in a one-element list.
    if isinstance(parsed, list) and len(parsed) == 1 and isinstance(parsed[0], dict):
        parsed = parsed[0]
    if isinstance(parsed, dict):
        error = parsed.get("error")
        if isinstance(error, dict) and "type" in error and "message" in error:
            return status, parsed
        if isinstance(parsed.get("detail"), list):
            return from_validation_detail(parsed["detail"])
        if isinstance(error, str):
            return status, error_body(_STATUS_TYPES.get(status, "error"), error)
        if isinstance(parsed.get("detail"), str):
            return status, error_body(_STATUS_TYPES.get(status, "error"), parsed["detail"])
    text = body.decode("utf-8", "replace").strip() if body else ""
    if not text or text.lstrip().startswith("<"):
        text = _STATUS_TYPES.get(status, "error").replace("_", " ")
    return status, error_body(_STATUS_TYPES.get(status, "error"), text)


# Starlette's router's own answers, plain text that names neither the path nor the method.
ROUTING_TEXTS = {404: "Not Found", 405: "Method Not Allowed"}


def routing_message(scope: Scope, status: int, allow: str) -> str:
    """What a 404 or 405 of the router says instead: the request it answers, and for a 405 the
    methods the route takes (its `Allow` header)."""
    request = f"{scope.get('method', '')} {quoted(scope.get('path', ''))}"
    if status == 404:
        return f"{request}: no such route (the API: /docs.json)"
    return f"{request}: method not allowed; this route takes {allow or 'other methods'}"


class JSONErrorMiddleware:
    """Rewrites every 4xx/5xx response into the project's JSON error shape.

    Only error responses are buffered; successful responses stream through untouched.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start: Message | None = None
        chunks: list[bytes] = []

        async def capture(message: Message) -> None:
            nonlocal start
            if message["type"] == "http.response.start":
                if message["status"] < 400:
                    await send(message)
                else:
                    start = message
                return
            if message["type"] == "http.response.body" and start is not None:
                chunks.append(message.get("body", b""))
                if message.get("more_body", False):
                    return
                body = b"".join(chunks)
                status, payload = normalise_error(start["status"], body)
                if body.decode("latin-1") == ROUTING_TEXTS.get(status):
                    allow = dict(start.get("headers", [])).get(b"allow", b"").decode("latin-1")
                    message = routing_message(scope, status, allow)
                    payload = error_body(payload["error"]["type"], message)
                SERVICE_ERRORS.labels(payload["error"]["type"]).inc()
                body = json.dumps(payload).encode()
                headers = [
                    (name, value)
                    for name, value in start.get("headers", [])
                    if name.lower() not in (b"content-length", b"content-type")
                ]
                headers += [
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(body)).encode()),
                ]
                await send({"type": "http.response.start", "status": status, "headers": headers})
                await send({"type": "http.response.body", "body": body})
                return
            await send(message)

        await self.app(scope, receive, capture)


# Characters of one field of an access-log line (BentoML's: the request's path and Content-Type
# as sent); past it the field is quoted by its start and length.
ACCESS_FIELD_CHARS = 500


class AccessLineFilter(logging.Filter):
    """Bounds BentoML's access-log lines: they held the request's path and Content-Type whole,
    so a 60-kB path (under the 64-KiB header bound) wrote a 60-kB line per request, to
    CloudWatch on SageMaker, where its answer quoted it in 200 characters."""

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.args, tuple):
            record.args = tuple(
                quoted(arg, ACCESS_FIELD_CHARS) if isinstance(arg, str) else arg
                for arg in record.args
            )
        return True


class CallerErrorLogFilter(logging.Filter):
    """Logs a rejected request body as one warning line instead of an ERROR with a traceback.

    BentoML logs every input validation failure as a server exception; under a stream of bad
    requests that floods the log with tracebacks of the caller's mistakes.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        exc_info = record.exc_info
        if exc_info and isinstance(exc_info[1], ValidationError):
            record.levelno, record.levelname = logging.WARNING, "WARNING"
            record.msg, record.args = rejection_line(validation_problems(exc_info[1]))
            record.exc_info = None
            record.exc_text = None
        return True


REJECTION_FORMAT = "rejected request: %d validation error(s), first at %s: %s"


@dataclass(frozen=True)
class Problems:
    """A body's validation problems: the first ones (or all), and how many it had."""

    first: list[dict[str, Any]]
    total: int


def validation_problems(error: ValidationError) -> Problems:
    """pydantic's errors as `from_validation_detail` and `rejection_line` read them, built once
    and without the inputs (each is a Python dict: see direct_json.py's `first_problems`)."""
    items = error.errors(include_url=False, include_context=False, include_input=False)
    return Problems(items, len(items))


def rejection_line(problems: Problems) -> tuple[str, tuple[Any, ...]]:
    """The warning a rejected request body gets in the log (`validation_problems`): (format,
    args), for logging."""
    first = problems.first[0]
    return REJECTION_FORMAT, (problems.total, _location(list(first["loc"])), _reason(dict(first)))


def quiet_caller_error_logs() -> None:
    """Install `CallerErrorLogFilter` on the logger BentoML reports request exceptions with, and
    have uvicorn's warnings written once: BentoML's logging gives `uvicorn.error` the handler
    the root logger has too, and lets it propagate, so each (`Invalid HTTP request received.`
    for every unparsable request) was written twice; and bound the access log's lines
    (`AccessLineFilter`)."""
    logging.getLogger("bentoml._internal.server.http_app").addFilter(CallerErrorLogFilter())
    logging.getLogger("uvicorn.error").propagate = False
    logging.getLogger("bentoml.access").addFilter(AccessLineFilter())


# What uvicorn's parser refused; it does not say which rule the request broke.
UNPARSABLE_REQUEST = error_body(
    "bad_request",
    "invalid HTTP request: its request line, headers or body framing could not be parsed "
    "(a malformed header, Content-Length beside Transfer-Encoding, a broken chunk)",
)


def answer_past_the_app(protocol: Any, status: HTTPStatus, body: dict[str, Any]) -> None:
    """Answer `body` with `status` on a uvicorn protocol's connection, then close it: for the
    answers uvicorn's protocol gives before the app sees a request. The status line, uvicorn's
    default headers (date, server), the JSON error, written straight to the transport, past the
    protocol's own HTTP state (a request it could not parse has left that in error anyway).

    A request refused while the connection still answers one whose whole message came before it
    (pipelined: both in one write) is answered after that one: answers go in request order (RFC
    9112, 9.3.2), and the earlier request's answer had been lost to the close. What arrives
    meanwhile is read and dropped: left unread, it would turn the close into a reset, which can
    cost the client the answers. A request whose own body is refused (a broken chunk) is
    answered at once."""
    cycle = getattr(protocol, "cycle", None)
    if cycle is not None and not cycle.response_complete and not cycle.more_body:
        if not getattr(protocol, "refusal_waiting", False):
            protocol.refusal_waiting = True
            protocol.data_received = _drop
            protocol.flow.resume_reading()
            complete = cycle.on_response

            def refuse_then_complete() -> None:
                _write_and_close(protocol, status, body)
                complete()  # uvicorn's bookkeeping; it sees the connection closing

            cycle.on_response = refuse_then_complete
        return
    _write_and_close(protocol, status, body)


def _drop(_data: bytes) -> None:
    """A refused connection's reads while it waits to answer (answer_past_the_app)."""


def _write_and_close(protocol: Any, status: HTTPStatus, body: dict[str, Any]) -> None:
    if protocol.transport.is_closing():  # the answer before asked to close (Connection: close)
        return
    content = json.dumps(body).encode()
    head = [b"HTTP/1.1 %d %s\r\n" % (status, status.phrase.encode())]
    for name, value in protocol.server_state.default_headers:
        head += [name, b": ", value, b"\r\n"]
    head.append(b"content-type: application/json\r\ncontent-length: %d\r\n" % len(content))
    head.append(b"connection: close\r\n\r\n")
    protocol.transport.write(b"".join(head) + content)
    protocol.transport.close()


def _send_json_400(protocol: Any, _message: str) -> None:
    """uvicorn's `send_400_response` (every HTTP protocol class has one), in the JSON shape."""
    answer_past_the_app(protocol, HTTPStatus.BAD_REQUEST, UNPARSABLE_REQUEST)


def answer_unparsable_requests_in_json() -> None:
    """A request the HTTP parser refuses never reaches the app: uvicorn answers it itself, with
    a plain-text 400 ("Invalid HTTP request received."). Make each of its HTTP protocols answer
    in the JSON shape instead. Those whose parser is not installed (httptools, zttp) are
    skipped."""
    from uvicorn.config import HTTP_PROTOCOLS

    for name, location in HTTP_PROTOCOLS.items():
        if name == "auto":  # an alias of one of the others
            continue
        module_name, class_name = location.split(":")
        try:
            module = importlib.import_module(module_name)
        except ImportError:
            continue
        protocol_class = getattr(module, class_name)
        if hasattr(protocol_class, "send_400_response"):
            protocol_class.send_400_response = _send_json_400
