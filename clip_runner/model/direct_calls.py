"""The runner's encoders answered straight from the HTTP request, for the API workers' calls.

BentoML's endpoint (request context, router, input model, pickle) stays for every other caller;
a `POST /encode_*` whose body is in this project's wire format (runner_wire.py) is answered
here, by the same API method, before those layers. One runner called both ways in turn (tiny
model, 2 cores; `scripts/bench.py --runner-calls`): a call of one image or 8 prompts took
0.9-1.1 ms less, and 0.5-0.8 ms less of the runner's CPU (BENCHMARKS.md). BentoML's server
layers outside this middleware (its timeout, error handler) still wrap it.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any

import numpy as np
from bentoml.exceptions import BentoMLException
from starlette.types import ASGIApp, Receive, Scope, Send

from clip_runner.model.runner_wire import (
    MEDIA_TYPE,
    ROWS_HEADER,
    pack_embeddings,
    unpack_jpegs,
    unpack_pixels,
    unpack_token_ids,
)

logger = logging.getLogger(__name__)

# Route -> (the API method's name, the rows from a wire body and its header).
ROUTES: dict[str, tuple[str, Callable[[bytes, str], Any]]] = {
    "/encode_images": ("encode_images", unpack_pixels),
    "/encode_jpegs": ("encode_jpegs", unpack_jpegs),
    "/encode_tokens": ("encode_tokens", unpack_token_ids),
}
# (method name, rows) -> embeddings: the runner's API method of that name, called directly.
Handler = Callable[[str, Any], Awaitable[np.ndarray]]


def header_value(scope: Scope, name: bytes) -> str:
    """One request header (lower-case `name`), "" when absent."""
    for key, value in scope["headers"]:
        if key.lower() == name:
            return value.decode("latin-1")
    return ""


async def read_body(receive: Receive) -> bytes | None:
    """The whole request body; None when the caller left before sending it."""
    chunks: list[bytes] = []
    while True:
        message = await receive()
        if message["type"] != "http.request":
            return None
        chunks.append(message.get("body", b""))
        if not message.get("more_body", False):
            return chunks[0] if len(chunks) == 1 else b"".join(chunks)


async def respond(send: Send, status: int, body: bytes, headers: dict[str, str]) -> None:
    raw = [(b"content-length", str(len(body)).encode())]
    raw += [(key.encode(), value.encode("latin-1")) for key, value in headers.items()]
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": body})


async def respond_error(send: Send, status: int, message: str) -> None:
    """The error as text, as BentoML's endpoint answers one: its client reads the text."""
    await respond(send, status, message.encode(), {"content-type": "text/plain; charset=utf-8"})


class DirectCallsMiddleware:
    """Answers `POST /encode_*` in the wire format through `handler` (module docstring)."""

    def __init__(self, app: ASGIApp, handler: Handler) -> None:
        self.app = app
        self.handler = handler

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        route = ROUTES.get(scope.get("path", "")) if scope["type"] == "http" else None
        if (
            route is None
            or scope["method"] != "POST"
            or header_value(scope, b"content-type") != MEDIA_TYPE
        ):
            await self.app(scope, receive, send)
            return
        body = await read_body(receive)
        if body is None:  # the caller left: answered all the same, for BentoML's outer layers
            await respond(send, 499, b"", {})  # (traffic.answer_a_departed_client says why)
            return
        method, unpack = route
        try:
            rows = unpack(body, header_value(scope, ROWS_HEADER.encode()))
        except ValueError as exc:  # a malformed body, or nothing to encode
            await respond_error(send, 400, str(exc))
            return
        try:
            embeddings = await self.handler(method, rows)
        except BentoMLException as exc:  # the queue bound's 503, as BentoML would answer it
            await respond_error(send, int(exc.error_code), str(exc))
            return
        except Exception:  # a bug or a failed pass: logged, answered as BentoML's endpoint would
            logger.exception("runner call %s failed", scope["path"])
            await respond_error(send, 500, "An unexpected error has occurred.")
            return
        packed, shape = pack_embeddings(embeddings)
        headers = {"content-type": "application/octet-stream", ROWS_HEADER: shape}
        await respond(send, 200, packed, headers)
