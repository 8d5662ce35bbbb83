"""SageMaker Batch Transform's side of `/invocations`: JSON Lines in, JSON Lines out.

A transform job with `SplitType=Line` and `BatchStrategy=MultiRecord` posts mini-batches of
input lines with `Content-Type: application/jsonlines`. Each line is one `/invocations` request
(the original's `images` + `classes`, or the Hugging Face toolkit's `inputs` + `parameters`);
the answer holds one JSON line per input line, in order, so `AssembleWith=Line` lines outputs up
with inputs. A bad line answers the usual error object (its message prefixed with the line
number) and does not fail the others; a server-side failure (5xx) fails the whole mini-batch.
All lines run at once, up to `max_in_flight`, so their images reach the runner together and
share its batches, as concurrent requests do.

`GET /execution-parameters` tells a transform job what to send when the job leaves it unset:
`execution_parameters` computes that from the settings.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from typing import Any

from pydantic import BaseModel, ValidationError
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import ASGIApp, Receive, Scope, Send

from clip_runner.config import DEFAULT_TEMPLATE, DEFAULT_TOP_K, Settings
from clip_runner.errors import RequestError, error_body
from clip_runner.web.error_responses import from_validation_detail
from clip_runner.web.schemas import (
    ClassList,
    ImageList,
    Template,
    ToolkitInputs,
    TopK,
    ZeroShotParameters,
)
from clip_runner.web.traffic import is_jsonlines_media_type, posted_content_type, without_bom

# SageMaker's bounds for a transform job's mini-batch size (MaxPayloadInMB).
MAX_PAYLOAD_MB_RANGE = (1, 100)
MIB = 1024 * 1024


class InvocationLine(BaseModel):
    """One line: the fields of `POST /invocations`, validated exactly as that API's body."""

    images: ImageList | None = None
    classes: ClassList | None = None
    template: Template = DEFAULT_TEMPLATE
    top_k: TopK = DEFAULT_TOP_K
    inputs: ToolkitInputs = None
    parameters: ZeroShotParameters | None = None


LineHandler = Callable[[InvocationLine], Awaitable[Any]]


def split_lines(body: bytes) -> list[bytes]:
    """Records of a JSON Lines body; `\\r\\n` endings and a final newline are allowed."""
    lines = [line.removesuffix(b"\r") for line in body.split(b"\n")]
    while lines and not lines[-1].strip():
        lines.pop()
    return lines


def request_error(error: ValidationError) -> RequestError:
    """The RequestError (400 for bad JSON, 422 for bad fields) that BentoML's endpoint and
    `JSONErrorMiddleware` give a body failing the API's validation."""
    status, answer = from_validation_detail(error.errors(include_url=False, include_context=False))
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
        raise request_error(error) from None


def line_error(number: int, error: RequestError) -> dict[str, Any]:
    """The usual error object, its message saying which line (1-based) it answers."""
    return error_body(error.error_type, f"line {number}: {error.message}", error.index)


async def answer_lines(body: bytes, handle: LineHandler, max_in_flight: int) -> list[Any]:
    """One answer (or error object) per line of `body`, in order; lines run concurrently.

    A caller's mistake in a line (4xx) answers that line; a failure of the server itself (5xx:
    the runner unavailable or overloaded) fails the whole mini-batch, so that SageMaker retries
    it rather than writing the outage into the results. The other lines are then cancelled.
    """
    lines = split_lines(body)
    if not lines:
        raise RequestError(400, "malformed_json", "the application/jsonlines body has no lines")
    slots = asyncio.Semaphore(max_in_flight)

    async def answer(number: int, line: bytes) -> Any:
        try:
            request = parse_line(line)
            async with slots:
                return await handle(request)
        except RequestError as error:
            if error.status >= 500:
                raise
            return line_error(number, error)

    try:
        async with asyncio.TaskGroup() as group:
            tasks = [group.create_task(answer(n, line)) for n, line in enumerate(lines, start=1)]
    except BaseExceptionGroup as failures:
        server_errors = [e for e in failures.exceptions if isinstance(e, RequestError)]
        if not server_errors:
            raise
        raise server_errors[0] from None
    return [task.result() for task in tasks]


def encode_lines(answers: list[Any]) -> bytes:
    """One compact JSON document per line, newline-separated (no trailing newline: SageMaker's
    `AssembleWith=Line` adds one between mini-batches)."""
    return b"\n".join(json.dumps(answer, separators=(",", ":")).encode() for answer in answers)


def execution_parameters(settings: Settings) -> dict[str, Any]:
    """What a transform job should send this server, for `GET /execution-parameters`.

    MultiRecord mini-batches as large as a request body may be (SageMaker allows 1-100 MB), and
    two concurrent mini-batches per API worker: one is being answered while the next one's
    images load, which keeps the runner's batches full without queueing whole mini-batches.
    """
    low, high = MAX_PAYLOAD_MB_RANGE
    return {
        "MaxConcurrentTransforms": min(settings.max_concurrency, 2 * settings.api_worker_count),
        "BatchStrategy": "MULTI_RECORD",
        "MaxPayloadInMB": max(low, min(high, settings.max_body_bytes // MIB)),
    }


class JsonLinesMiddleware:
    """Answers `POST path` with a JSON Lines body through `handler`, one line per record.

    It sits inside `traffic.RequestGuardMiddleware` (which has already admitted the request,
    bounded its body and started its deadline) and handles only JSON Lines bodies.
    """

    def __init__(
        self,
        app: ASGIApp,
        handler: LineHandler,
        path: str = "/invocations",
        max_in_flight: int = 64,
    ) -> None:
        self.app = app
        self.handler = handler
        self.path = path
        self.max_in_flight = max_in_flight

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        content_type = posted_content_type(scope, self.path)
        if content_type is None or not is_jsonlines_media_type(content_type):
            await self.app(scope, receive, send)
            return
        body = await Request(scope, receive).body()
        try:
            answers = await answer_lines(body, self.handler, self.max_in_flight)
        except RequestError as error:
            response: Response = error.to_response()
        else:
            response = Response(encode_lines(answers), media_type="application/jsonlines")
        await response(scope, receive, send)
