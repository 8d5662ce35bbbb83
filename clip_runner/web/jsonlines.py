"""SageMaker Batch Transform's side of `/invocations`: JSON Lines in, JSON Lines out.

A transform job with `SplitType=Line` and `BatchStrategy=MultiRecord` posts mini-batches of
input lines with `Content-Type: application/jsonlines`. Each line is one `/invocations` request
(the original's `images` + `classes`, or the Hugging Face toolkit's `inputs` + `parameters`);
the answer holds one JSON line per input line, in order, so `AssembleWith=Line` lines outputs up
with inputs. A bad line answers the usual error object (its message prefixed with the line
number) and does not fail the others; a server-side failure (5xx) fails the whole mini-batch.
Up to `max_in_flight` lines run at once in each API worker, across its mini-batches, so their
images reach the runner together and share its batches, as concurrent requests do.

`GET /execution-parameters` tells a transform job what to send when the job leaves it unset:
`execution_parameters` computes that from the settings.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

from pydantic import BaseModel, ValidationError
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from clip_runner.config import DEFAULT_TEMPLATE, DEFAULT_TOP_K, Settings
from clip_runner.errors import UNEXPECTED_ERROR, RequestError, error_body
from clip_runner.metrics import SERVICE_ERRORS
from clip_runner.web.accept import accepted_ranges, named_choice, request_accept
from clip_runner.web.error_responses import (
    Problems,
    from_validation_detail,
    validation_problems,
)
from clip_runner.web.schemas import (
    ClassList,
    ImageList,
    Template,
    ToolkitInputs,
    TopK,
    ZeroShotParameters,
)
from clip_runner.web.traffic import (
    JSONLINES_MEDIA_TYPES,
    is_json_media_type,
    is_jsonlines_media_type,
    media_type,
    posted_content_type,
    without_bom,
)

logger = logging.getLogger(__name__)

# SageMaker's bounds for a transform job's mini-batch size (MaxPayloadInMB).
MAX_PAYLOAD_MB_RANGE = (1, 100)
MIB = 1024 * 1024


def answer_type(scope: Scope, content_type: str) -> str:
    """The JSON Lines name the answer carries: the alias the request's Accept names with the
    highest weight, else the body's own alias, else SageMaker's `application/jsonlines` (a JSON
    body read as lines). A client that sent and asked for `application/x-jsonlines` had been
    answered `application/jsonlines`."""
    sent = media_type(content_type)
    first = sent if sent in JSONLINES_MEDIA_TYPES else JSONLINES_MEDIA_TYPES[0]
    offered = (first, *(alias for alias in JSONLINES_MEDIA_TYPES if alias != first))
    return named_choice(accepted_ranges(request_accept(scope)), offered)


class InvocationLine(BaseModel):
    """One line: the fields of `POST /invocations`, validated exactly as that API's body."""

    images: ImageList | None = None
    classes: ClassList | None = None
    template: Template = DEFAULT_TEMPLATE
    top_k: TopK = DEFAULT_TOP_K
    inputs: ToolkitInputs = None
    parameters: ZeroShotParameters | None = None


LineHandler = Callable[[InvocationLine], Awaitable[Any]]


def content_end(body: bytes) -> int:
    """Where a body's content ends: before its trailing whitespace (blank lines, a final
    newline), found without copying the body as `rstrip` would."""
    end = len(body)
    while end and body[end - 1] in b" \t\r\n\x0b\x0c":
        end -= 1
    return end


def line_count(body: bytes) -> int:
    """How many records a JSON Lines body holds; blank lines at its end are none (a final
    newline is allowed), blank lines before a record are records (answered with an error, so
    that answers and inputs still line up)."""
    end = content_end(body)
    return body.count(b"\n", 0, end) + 1 if end else 0


def records(body: bytes) -> Iterator[bytes]:
    """The `line_count(body)` records of a JSON Lines body, in order, each cut out only when
    asked for (a 6 MB body of blank lines is six million records); `\r\n` endings allowed."""
    end, start = content_end(body), 0
    while start < end:
        stop = body.find(b"\n", start, end)
        stop = end if stop < 0 else stop
        yield body[start:stop].removesuffix(b"\r")
        start = stop + 1


def request_error(problems: Problems) -> RequestError:
    """The RequestError (400 for bad JSON, 422 for bad fields) that BentoML's endpoint and
    `JSONErrorMiddleware` give a body failing the API's validation (its
    `error_responses.validation_problems`)."""
    status, answer = from_validation_detail(problems.first, problems.total)
    return RequestError(status, answer["error"]["type"], answer["error"]["message"])


def parse_line(line: bytes) -> InvocationLine:
    """One record -> the validated request, or the RequestError its body would get. Each may
    start with a byte order mark (files joined end to end each bring theirs)."""
    line = without_bom(line)
    if not line.strip():
        raise RequestError(400, "malformed_json", "the line is empty")
    try:
        return InvocationLine.model_validate_json(line)
    except ValidationError as error:
        raise request_error(validation_problems(error)) from None


def line_error(number: int, error: RequestError) -> dict[str, Any]:
    """The usual error object, its message saying which line (1-based) it answers."""
    return error_body(error.error_type, f"line {number}: {error.message}", error.index)


class LineAnswerer:
    """One answer (or error object) per record of a JSON Lines body, in order, the records of
    every body of this API worker sharing `max_in_flight` slots.

    Shared slots: each body's own would let a worker run `max_in_flight` lines of each of its
    `max_in_flight` admitted requests at once, every line a request's worth of work (a 64 x 64
    fan-out past the admission bound). Within a body, `max_in_flight` workers take records one
    by one as they go (not one task per record, each parsed at once: a body of short lines
    stopped the event loop for seconds and held gigabytes), and each answer is kept as its JSON
    line. A body of more than `max_lines` records is refused whole (413).
    """

    def __init__(self, handle: LineHandler, max_in_flight: int, max_lines: int) -> None:
        self.handle = handle
        self.max_in_flight = max_in_flight
        self.max_lines = max_lines
        self.slots = asyncio.Semaphore(max_in_flight)

    async def answer(self, body: bytes) -> list[bytes]:
        """A caller's mistake in a line (4xx) answers that line; a failure of the server itself
        (5xx: the runner unavailable or overloaded) fails the whole mini-batch, so that
        SageMaker retries it rather than writing the outage into the results. The other lines
        are then cancelled."""
        count = line_count(body)
        if not count:
            raise RequestError(400, "malformed_json", "the application/jsonlines body has no lines")
        if count > self.max_lines:
            raise RequestError(
                413,
                "too_many_lines",
                f"the body has {count} lines, more than the {self.max_lines} answered per request "
                "(CLIP_MAX_LINES): send smaller mini-batches (a lower MaxPayloadInMB)",
            )
        answers = [b""] * count
        failed: list[str] = []  # the failed lines' error types
        numbered = enumerate(records(body))  # shared by the workers: each takes the next one

        async def work() -> None:
            for index, line in numbered:
                async with self.slots:
                    answers[index] = json_line(await self.answer_line(index + 1, line, failed))
                await asyncio.sleep(0)  # a run of bad lines awaits nothing else

        try:
            async with asyncio.TaskGroup() as group:
                for _ in range(min(count, self.max_in_flight)):
                    group.create_task(work())
        except BaseExceptionGroup as failures:
            server_errors = [e for e in failures.exceptions if isinstance(e, RequestError)]
            if not server_errors:
                raise
            raise server_errors[0] from None
        # Each failed line counted as a request's error would be, though the answer is a 200;
        # only now that there is one: a mini-batch that timed out, failed whole or lost its
        # client had its lines' errors counted though none was sent (70 lines fetching a URL
        # that never answered, then a 504: 64 `invalid_image` errors besides the timeout).
        for error_type in failed:
            SERVICE_ERRORS.labels(error_type).inc()
        return answers

    async def answer_line(self, number: int, line: bytes, failed: list[str]) -> Any:
        """The line's answer, or its error object (its type added to `failed`)."""
        try:
            return await self.handle(parse_line(line))
        except RequestError as error:
            if error.status >= 500:  # the mini-batch's answer, naming the line as a 4xx's does
                message = f"line {number}: {error.message}"
                raise RequestError(error.status, error.error_type, message, error.index) from None
            failed.append(error.error_type)
            return line_error(number, error)
        except Exception as error:
            # A bug of ours: the mini-batch fails at once, as a request's would (an exception
            # out of here reached BentoML's timeout middleware, which answers nothing until its
            # timer: SageMaker's invocation timed out first).
            logger.exception("unexpected error answering line %d", number)
            raise RequestError(500, "internal_error", UNEXPECTED_ERROR) from error


def json_line(answer: Any) -> bytes:
    """One compact JSON document: a line of the answer."""
    return json.dumps(answer, separators=(",", ":")).encode()


def encode_lines(lines: list[bytes]) -> bytes:
    """The answer's lines, newline-separated (no trailing newline: SageMaker's
    `AssembleWith=Line` adds one between mini-batches)."""
    return b"\n".join(lines)


def execution_parameters(settings: Settings) -> dict[str, Any]:
    """What a transform job should send this server, for `GET /execution-parameters`.

    MultiRecord mini-batches as large as a request body may be (SageMaker allows 1-100 MB), and
    two concurrent mini-batches per API worker: one is being answered while the next one's
    images load, which keeps the runner's batches full without queueing whole mini-batches;
    fewer where their product would pass SageMaker's bound on it (100 MB).
    """
    low, high = MAX_PAYLOAD_MB_RANGE
    payload_mb = max(low, min(high, settings.max_body_bytes // MIB))
    concurrent = min(settings.max_concurrency, 2 * settings.api_worker_count, high // payload_mb)
    return {
        "MaxConcurrentTransforms": concurrent,
        "BatchStrategy": "MULTI_RECORD",
        "MaxPayloadInMB": payload_mb,
    }


def is_lines_of_json(body: bytes) -> bool:
    """Whether a body sent as JSON is JSON Lines: records on lines of their own. A Batch
    Transform job with `ContentType=application/json`, `SplitType=Line` and MultiRecord (what
    `/execution-parameters` advises) sends its mini-batches so. Such a body runs over several
    lines and is no JSON document (the parser stops at the end of its first record, or at its
    first broken one); a pretty-printed document is one. A mini-batch whose first record was
    broken had been refused whole (400), its good records with it, where one whose broken
    record came later had that line's error only."""
    if body.find(b"\n", 0, content_end(body)) < 0:
        return False
    try:
        json.loads(body)
    except ValueError:
        return True
    return False


def replaying(first: Message, receive: Receive) -> Receive:
    """A `receive` that gives the app `first` (already received here), then the client's
    messages."""
    sent = False

    async def replay() -> Message:
        nonlocal sent
        if sent:
            return await receive()
        sent = True
        return first

    return replay


class JsonLinesMiddleware:
    """Answers `POST path` with a JSON Lines body through `handler`, one line per record.

    It sits inside `traffic.RequestGuardMiddleware` (which has already admitted the request,
    bounded its body and started its deadline) and handles JSON Lines bodies, sent as such or
    as JSON (`is_lines_of_json`); any other body goes on to the app as it came.
    """

    def __init__(
        self,
        app: ASGIApp,
        handler: LineHandler,
        path: str = "/invocations",
        max_in_flight: int = 64,
        max_lines: int = 200_000,
        lines_sent_as_json: bool = False,
    ) -> None:
        self.app = app
        self.path = path
        self.lines = LineAnswerer(handler, max_in_flight, max_lines)
        # Look into JSON bodies for lines only where Batch Transform sends them (a batch
        # endpoint): elsewhere a JSON request pays nothing for it.
        self.lines_sent_as_json = lines_sent_as_json

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        content_type = posted_content_type(scope, self.path)
        if content_type is None:
            await self.app(scope, receive, send)
            return
        if is_jsonlines_media_type(content_type):
            body = await Request(scope, receive).body()
        elif self.lines_sent_as_json and is_json_media_type(content_type):
            first = await receive()  # the guard hands the body over as one message
            body = first.get("body", b"")
            if first.get("more_body", False) or not is_lines_of_json(body):
                await self.app(scope, replaying(first, receive), send)
                return
        else:
            await self.app(scope, receive, send)
            return
        try:
            answers = await self.lines.answer(body)
        except RequestError as error:
            response: Response = error.to_response()
        else:
            response = Response(encode_lines(answers), media_type=answer_type(scope, content_type))
        await response(scope, receive, send)
