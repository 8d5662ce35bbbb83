"""Admission, body limits, deadlines and client disconnects, enforced before any handler runs.

`RequestGuardMiddleware` answers in the project's JSON error shape:
- 415 when a JSON route gets a body that is not JSON (raw images are allowed where
  `raw_image_paths` says, for `raw_images.RawImageBodyMiddleware` to convert), or a compressed
  one (any `Content-Encoding` but identity); and any route a body with a `Transfer-Encoding`
  besides `chunked` (a gzip under it);
- 406 when the request's `Accept` allows none of the types the route answers (`accept.py`);
- 413 when the body is over `max_body_bytes`: by Content-Length before reading, or while reading;
- 408 when the body has not arrived within `body_timeout_s`, or when the request was the oldest
  of too many waiting for their bodies (`waiting_bodies.WaitingBodies`); the connection is closed;
- 429 when `max_concurrency` requests are already in flight in this worker (fast, no queueing).
  A request takes one of these slots only once its whole body has arrived, so slow uploads
  cannot hold the slots (nginx in front of the original container did this by buffering);
- 504 when no response has started after `timeout_s` (counted from admission);
a refusal before the body was read first reads and drops what the client sends of it, within
bounds (`drop_unread_body`); and it cancels the handler when the client disconnects, so
abandoned requests stop fetching images and waiting on the runner. Health and metrics routes
and the API's documentation bypass it so `/ping` stays fast under load (unless they carry a
body, which is then read under the same deadline).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import Iterable, Sequence
from typing import NamedTuple

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from clip_runner.answers.hf_toolkit import CUSTOM_ATTRIBUTES_HEADER
from clip_runner.errors import error_body, quoted
from clip_runner.images.formats import image_signature
from clip_runner.web.accept import accepted_ranges, preferred, request_accept
from clip_runner.web.waiting_bodies import Waiter, WaitingBodies

# Answered without an admission slot when they carry no body: health checks and metrics, which
# must answer under load, and the static pages: the API's documentation (`/`, `/docs.json`, and
# Swagger UI's files, which BentoML serves under STATIC_PREFIX) and the demo page (`/ui`; `/ui/`
# redirects to it). Their files had been refused 429 on a busy server, leaving the pages blank,
# and at CLIP_MAX_CONCURRENCY=1 a browser's parallel fetches of them refused each other.
EXEMPT_PATHS = frozenset(
    {"/ping", "/metrics", "/livez", "/healthz", "/readyz", "/", "/docs.json", "/ui", "/ui/"}
)
STATIC_PREFIX = "/static_content/"
JSON_MEDIA_TYPES = ("application/json", "text/json")
# Raw image bodies: any image/* type (the decoder judges the bytes, as for a JSON request's:
# `image/jpg` is a common mislabel, and GIF, BMP, TIFF, AVIF decode) and SageMaker's generic
# `application/x-image`, as the Hugging Face toolkit takes them.
RAW_IMAGE_MEDIA_TYPES = ("image/*", "application/x-image")
# Batch Transform's SplitType=Line bodies (jsonlines.py): SageMaker's name and common aliases.
JSONLINES_MEDIA_TYPES = (
    "application/jsonlines",
    "application/jsonl",
    "application/x-jsonlines",
    "application/json-lines",
    # NDJSON is the same format under another name (one JSON value per line); they had been 415.
    "application/x-ndjson",
    "application/ndjson",
)
# What the API routes answer (a JSON Lines body excepted): what an Accept must allow.
ANSWER_TYPES = ("application/json",)
# Sent when the request's body was not (fully) read: the connection cannot carry another request.
CLOSE = (b"connection", b"close")
# What is read and dropped of a refused request's body before its answer (drop_unread_body):
# a 6.7-MB upload refused 413 at SageMaker's 6-MB bound is read whole, a 1-GB one is not.
UNREAD_BODY_BYTES = 32 * 1024 * 1024
UNREAD_BODY_SECONDS = 5.0
UTF8_BOM = b"\xef\xbb\xbf"


def is_exempt(path: str) -> bool:
    """Whether a request for `path` needs no admission slot (without a body: `EXEMPT_PATHS`)."""
    return path in EXEMPT_PATHS or path.startswith(STATIC_PREFIX)


def without_bom(text: bytes) -> bytes:
    """JSON text without a leading UTF-8 byte order mark. Windows tools write one at the start
    of a file (Notepad, PowerShell's Out-File), so a body or a Batch Transform input made there
    begins with it; RFC 8259 lets a parser ignore it, and the JSON parsers here would not."""
    return text.removeprefix(UTF8_BOM)


def header_values(scope: Scope, name: bytes) -> list[bytes]:
    """Every value of the request's header `name` (lower case), in the order sent."""
    return [value for key, value in scope.get("headers", []) if key.lower() == name]


def media_type(content_type: str) -> str:
    """A Content-Type's media type, lower case, without its parameters (`; charset=...`)."""
    return content_type.split(";", 1)[0].strip().lower()


def charset(content_type: str) -> str | None:
    """A Content-Type's `charset` parameter, lower case and unquoted; None without one."""
    for parameter in content_type.split(";")[1:]:
        name, _, value = parameter.partition("=")
        if name.strip().lower() == "charset":
            return value.strip().strip('"').lower()
    return None


def is_json_media_type(content_type: str) -> bool:
    """`application/json` with any parameters, `application/*+json`, or no type at all."""
    posted = media_type(content_type)
    return not posted or posted in JSON_MEDIA_TYPES or posted.endswith("+json")


def is_application_json(content_type: str) -> bool:
    """`application/json` itself, any parameters: what `direct_json.py` answers."""
    return media_type(content_type) == "application/json"


def is_jsonlines_media_type(content_type: str) -> bool:
    """`application/jsonlines` (SageMaker's name) or a common alias, any parameters."""
    return media_type(content_type) in JSONLINES_MEDIA_TYPES


def posted_content_type(scope: Scope, path: str) -> str | None:
    """The Content-Type of an HTTP POST to `path` ("" when it has none), None for any other
    request: what the middlewares that answer or rewrite a route's bodies (raw images, JSON
    Lines, direct JSON) check first."""
    if scope["type"] != "http" or scope["method"] != "POST" or scope["path"] != path:
        return None
    for name, value in scope.get("headers", []):
        if name.lower() == b"content-type":
            return value.decode("latin-1")
    return ""


def is_raw_image_media_type(content_type: str) -> bool:
    """`image/<anything>` or `application/x-image`, any parameters."""
    posted = media_type(content_type)
    return (posted.startswith("image/") and len(posted) > 6) or posted == "application/x-image"


def has_body(scope: Scope) -> bool:
    """Whether the request declares a body (a non-zero Content-Length, or Transfer-Encoding)."""
    for name, value in scope.get("headers", []):
        name = name.lower()
        if name == b"transfer-encoding" or (name == b"content-length" and value.strip() != b"0"):
            return True
    return False


async def drop_unread_body(
    scope: Scope, receive: Receive, timeout_s: float, invited: bool = False
) -> None:
    """Read and drop the rest of a refused request's body, within UNREAD_BODY_BYTES and
    `timeout_s` (UNREAD_BODY_SECONDS at most), before its answer closes the connection. Closed
    with sent bytes unread, a socket resets instead of ending; a client still uploading when the
    reset comes (httpx's async client, so the BentoML AsyncHTTPClient; Node's) loses the answer
    with it, an empty ReadError instead of the 401 or 413 that says what to change (4 of 5
    tries, a 3-MB body on loopback). nginx reads on after its answer likewise. A body past the
    bounds is left, as is one announced by `Expect: 100-continue` and not `invited` yet (by a
    first read, which makes uvicorn send 100 Continue): the client waits for that leave to send
    it."""
    expecting = any(
        value.strip().lower() == b"100-continue" for value in header_values(scope, b"expect")
    )
    if not has_body(scope) or (expecting and not invited):
        return
    declared = header_values(scope, b"content-length")
    if declared and declared[0].strip().isdigit() and int(declared[0]) > UNREAD_BODY_BYTES:
        return
    dropped = 0
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(min(timeout_s, UNREAD_BODY_SECONDS)):
            while dropped <= UNREAD_BODY_BYTES:
                message = await receive()
                if message["type"] != "http.request" or not message.get("more_body", False):
                    return
                dropped += len(message.get("body", b""))


class Refusal(NamedTuple):
    """A request's refusal: its status, error type and message, and headers besides CLOSE."""

    status: int
    error_type: str
    message: str
    extra_headers: Sequence[tuple[bytes, bytes]] = ()


async def refuse_unread(
    scope: Scope,
    receive: Receive,
    send: Send,
    refusal: Refusal,
    timeout_s: float,
    invited: bool = False,
) -> None:
    """`refusal` of a request whose body was not (all) read: the body dropped within bounds
    (drop_unread_body, `timeout_s` the body deadline), then the JSON error, and the connection
    closed. `invited`: part of the body was read already."""
    await drop_unread_body(scope, receive, timeout_s, invited)
    status, error_type, message, extra_headers = refusal
    await send_error(send, status, error_type, message, [*extra_headers, CLOSE])


def codings_not_taken(scope: Scope, header: bytes, taken: frozenset[str]) -> str:
    """The request's `header` (Content- or Transfer-Encoding) as sent, where it names a coding
    besides `taken` (and `identity`); empty otherwise. Several headers of the name are one list
    (RFC 9110), applied in order."""
    sent = ", ".join(value.decode("latin-1").strip() for value in header_values(scope, header))
    codings = {coding.strip().lower() for coding in sent.split(",")}
    return sent if codings - taken - {"", "identity"} else ""


async def send_error(
    send: Send,
    status: int,
    error_type: str,
    message: str,
    extra_headers: Iterable[tuple[bytes, bytes]] = (),
) -> None:
    body = json.dumps(error_body(error_type, message)).encode()
    headers = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(body)).encode()),
        *extra_headers,
    ]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


async def answer_a_departed_client(send: Send) -> None:
    """An answer for a client that closed its connection before it was answered.

    Nothing reaches the client (uvicorn drops what is sent after a disconnect), but an answer
    ends BentoML's layers outside this one now: its TimeoutMiddleware holds a request (and its
    `bentoml_service_request_in_progress` share) until something is sent or its traffic
    timeout passes (70 s by default, an hour for Batch Transform); it also counts the request.
    499 as nginx logs a client that left.
    """
    await send_error(
        send, 499, "client_closed_request", "the client closed the connection before its answer"
    )


class _TooLarge(Exception):
    """The body passed the limit; `whole`: with its last bytes, so nothing is left to drop."""

    def __init__(self, whole: bool) -> None:
        super().__init__()
        self.whole = whole


class _Disconnected(Exception):
    pass


class _BodyTimeout(Exception):
    def __init__(self, evicted_because: str | None) -> None:
        self.evicted_because = evicted_because


class RequestGuardMiddleware:
    """See the module docstring; one instance per API worker."""

    def __init__(
        self,
        app: ASGIApp,
        max_concurrency: int,
        max_body_bytes: int,
        timeout_s: float,
        json_paths: Iterable[str] = ("/invocations",),
        raw_image_paths: Iterable[str] = (),
        body_timeout_s: float = 10.0,
        max_waiting_bodies: int = 512,
        max_waiting_body_bytes: int = 256 * 1024 * 1024,
    ) -> None:
        self.app = app
        self.max_concurrency = max_concurrency
        self.max_body_bytes = max_body_bytes
        self.timeout_s = timeout_s
        self.json_paths = frozenset(json_paths)
        self.raw_image_paths = frozenset(raw_image_paths)
        self.body_timeout_s = body_timeout_s
        self.waiting = WaitingBodies(max_waiting_bodies, max_waiting_body_bytes)
        self.in_flight = 0

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        # Health checks bypass the guard, but only without a body: a body the route never reads
        # would otherwise be drained by uvicorn for as long as a slow client keeps sending it.
        if scope["type"] != "http" or (is_exempt(scope["path"]) and not has_body(scope)):
            await self.app(scope, receive, send)
            return
        if refusal := self._refusal_by_headers(scope):
            await refuse_unread(scope, receive, send, refusal, self.body_timeout_s)
            return
        try:
            body = await self._read_body(receive)
            if self._is_json_post(scope):
                body = without_bom(body)  # for every JSON media type, each path that reads it
                if image_format := image_signature(body[:12]):
                    message = self._image_sent_as_json(scope, image_format)
                    await send_error(send, 400, "malformed_json", message)
                    return
        except _TooLarge as too_large:
            refusal = self._too_large(None)
            # Its last bytes read, a read would wait the deadline out for nothing (5 s).
            left_s = 0 if too_large.whole else self.body_timeout_s
            await refuse_unread(scope, receive, send, refusal, left_s, invited=True)
            return
        except _BodyTimeout as timeout:
            await self._body_timeout(send, timeout.evicted_because)
            return
        except _Disconnected:
            await answer_a_departed_client(send)
            return
        if self.in_flight >= self.max_concurrency:
            await send_error(
                send,
                429,
                "too_many_requests",
                f"server is at its limit of {self.max_concurrency} concurrent requests; retry",
                [(b"retry-after", b"1")],
            )
            return
        self.in_flight += 1
        try:
            await self._run_app(scope, receive, send, body)
        finally:
            self.in_flight -= 1

    def _is_json_post(self, scope: Scope) -> bool:
        """A POST of JSON (any JSON media type, or none) to one of `json_paths`."""
        content_types = header_values(scope, b"content-type") or [b""]
        return (
            scope["method"] == "POST"
            and scope["path"] in self.json_paths
            and is_json_media_type(content_types[0].decode("latin-1"))
        )

    def _image_sent_as_json(self, scope: Scope, image_format: str) -> str:
        """What a JSON route says of an image body sent as JSON (or with no Content-Type, which
        is JSON here): JSON's "expected value at line 1 column 1" had not said what to change.
        `httpx.post(url, content=jpeg)` sends no Content-Type."""
        sent = header_values(scope, b"content-type")
        label = f"Content-Type {quoted(sent[0].decode('latin-1'))!r}" if sent else "no Content-Type"
        article = "an" if image_format[0] in "AEIOU" else "a"
        message = f"the body is {article} {image_format} image sent with {label}, not JSON: "
        if scope["path"] in self.raw_image_paths:
            return message + (
                f"send it as image/{image_format.lower()} with the labels in "
                f"{CUSTOM_ATTRIBUTES_HEADER} (labels=cat,dog), or as base64 in a JSON request"
            )
        return message + "this route takes JSON, the image as base64 or a URL in `images`"

    def _refusal_by_headers(self, scope: Scope) -> Refusal | None:
        """400 for two Content-Types, 415 for a wrong one, a compressed body or a transfer
        coding besides chunked, 406 for an Accept that takes no answer, 413 for a declared size
        over the limit: what the headers alone refuse, before the body is read."""
        headers = {name.lower(): value for name, value in scope.get("headers", [])}
        if codings := codings_not_taken(scope, b"transfer-encoding", frozenset({"chunked"})):
            # uvicorn undoes only `chunked`: a gzip under it reached the JSON parser as it came,
            # "expected value at line 1 column 1". RFC 9112 suggests a 501; a caller's mistake
            # is a 4xx here (a 5xx reads as the server's fault), the one a Content-Encoding gets.
            return Refusal(
                415,
                "unsupported_media_type",
                f"Transfer-Encoding {quoted(codings)!r} is not supported; send the body "
                "uncompressed (chunked alone is fine)",
            )
        content_types = header_values(scope, b"content-type")
        if len(content_types) > 1 and (scope["method"] == "POST" or has_body(scope)):
            # Each layer (this one, the direct and raw-image paths, BentoML's endpoint) would
            # read one of them, and not all the same one: a JSON body passed as multipart here
            # reached BentoML's form parser, a 500.
            return Refusal(
                400,
                "bad_request",
                f"the request has {len(content_types)} Content-Type headers; send one",
            )
        if scope["method"] == "POST" and scope["path"] in self.json_paths:
            content_type = (content_types or [b""])[0].decode("latin-1")
            raw_image_allowed = scope["path"] in self.raw_image_paths
            if not is_json_media_type(content_type) and not (
                raw_image_allowed
                and (is_raw_image_media_type(content_type) or is_jsonlines_media_type(content_type))
            ):
                raw = ", ".join(RAW_IMAGE_MEDIA_TYPES)
                also = f" (or {raw}, application/jsonlines)" if raw_image_allowed else ""
                return Refusal(
                    415,
                    "unsupported_media_type",
                    f"Content-Type {quoted(content_type)!r} is not supported; "
                    "send application/json" + also,
                )
            declared = charset(content_type)
            if declared not in (None, "utf-8", "utf8") and not is_raw_image_media_type(
                content_type
            ):
                # JSON is UTF-8 (RFC 8259); read as UTF-8, a UTF-16 body failed as "expected
                # value at line 1 column 1", which did not say why.
                return Refusal(
                    415,
                    "unsupported_media_type",
                    f"charset {quoted(declared)!r} is not supported; send the body in UTF-8",
                )
            if encoding := codings_not_taken(scope, b"content-encoding", frozenset()):
                # RFC 9110: 415, with Accept-Encoding naming the codings taken. Read as it came,
                # a compressed body would fail as "not valid JSON", and an uncompressed one
                # labelled gzip would be answered as if the label were not there.
                return Refusal(
                    415,
                    "unsupported_media_type",
                    f"Content-Encoding {quoted(encoding)!r} is not supported; "
                    "send the body uncompressed",
                    [(b"accept-encoding", b"identity")],
                )
            # JSON Lines answers only a JSON Lines body (sent as such, or as JSON to a batch
            # endpoint): an image body offered it had been answered JSON where Accept refused it.
            lines_answered = raw_image_allowed and not is_raw_image_media_type(content_type)
            if refusal := self._not_acceptable(scope, lines_answered):
                return refusal
        declared = headers.get(b"content-length", b"").decode("latin-1")
        if declared.isdigit() and int(declared) > self.max_body_bytes:
            return self._too_large(int(declared))
        return None

    def _not_acceptable(self, scope: Scope, lines_allowed: bool) -> Refusal | None:
        """406 when the request's Accept allows none of the types the route answers: JSON, and
        on the route that takes JSON Lines, JSON Lines (whose aliases are all offered, and
        `application/json` with them: a Batch Transform job may name it beside SplitType=Line).
        """
        accept = request_accept(scope)
        offered = ANSWER_TYPES + (JSONLINES_MEDIA_TYPES if lines_allowed else ())
        if preferred(accepted_ranges(accept), offered) is not None:
            return None
        lines = f" (or {JSONLINES_MEDIA_TYPES[0]} for a JSON Lines body)" if lines_allowed else ""
        return Refusal(
            406,
            "not_acceptable",
            f"Accept {quoted(accept)!r} allows none of the types this route answers; it answers "
            f"{ANSWER_TYPES[0]}{lines}: send that Accept, or */*",
        )

    def _too_large(self, size: int | None) -> Refusal:
        size_text = f"{size} bytes" if size is not None else "the body"
        return Refusal(
            413,
            "payload_too_large",
            f"{size_text} exceeds the {self.max_body_bytes}-byte request limit "
            "(send image URLs, or smaller images)",
        )

    async def _body_timeout(self, send: Send, evicted_because: str | None) -> None:
        if evicted_because:
            reason = (
                f"the request body had not arrived when {evicted_because}; "
                "the one waiting longest made room"
            )
        else:
            reason = f"the request body did not arrive within {self.body_timeout_s:g} s"
        await send_error(send, 408, "body_timeout", reason, [CLOSE])

    async def _read_body(self, receive: Receive) -> bytes:
        """The whole body, within `body_timeout_s`, counted among the waiting bodies meanwhile."""
        chunks: list[bytes] = []
        size = 0
        try:
            async with asyncio.timeout(self.body_timeout_s) as deadline:
                waiter = Waiter(cut_short=lambda: deadline.reschedule(0))
                self.waiting.enter(waiter)
                try:
                    while True:
                        message = await receive()
                        if message["type"] == "http.disconnect":
                            raise _Disconnected
                        chunk = message.get("body", b"")
                        size += len(chunk)
                        if size > self.max_body_bytes:
                            raise _TooLarge(whole=not message.get("more_body", False))
                        self.waiting.received(waiter, len(chunk))
                        chunks.append(chunk)
                        if not message.get("more_body", False):
                            return b"".join(chunks)
                finally:
                    self.waiting.leave(waiter)
        except TimeoutError:
            raise _BodyTimeout(waiter.evicted_because) from None

    async def _run_app(self, scope: Scope, receive: Receive, send: Send, body: bytes) -> None:
        disconnected = asyncio.Event()
        body_sent = False
        response_started = False

        async def replay() -> Message:
            nonlocal body_sent
            if not body_sent:
                body_sent = True
                return {"type": "http.request", "body": body, "more_body": False}
            await disconnected.wait()
            return {"type": "http.disconnect"}

        async def tracking_send(message: Message) -> None:
            nonlocal response_started
            if message["type"] == "http.response.start":
                response_started = True
            await send(message)

        async def watch_disconnect() -> None:
            while True:
                message = await receive()
                if message["type"] == "http.disconnect":
                    disconnected.set()
                    return

        handler = asyncio.ensure_future(self.app(scope, replay, tracking_send))
        watcher = asyncio.ensure_future(watch_disconnect())
        try:
            done, _ = await asyncio.wait(
                {handler, watcher}, timeout=self.timeout_s, return_when=asyncio.FIRST_COMPLETED
            )
            if handler in done:
                handler.result()
            else:
                handler.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await handler
                if watcher not in done and not response_started:
                    await send_error(
                        tracking_send,
                        504,
                        "timeout",
                        f"the request was not answered within {self.timeout_s:g} s",
                    )
        finally:
            watcher.cancel()
            handler.cancel()
        if disconnected.is_set() and not response_started:
            await answer_a_departed_client(send)
