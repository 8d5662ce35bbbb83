"""JSON requests to the APIs, answered here instead of by BentoML's endpoint.

Between this project's middlewares and an API method, BentoML runs its request context,
Starlette's exception middleware and router, and its endpoint, which parses the body into the
API's input model, calls the method and adds its response headers. With the tiny model at the
seed load, skipping those layers for `POST /invocations` cut about 8% of an API worker's CPU per
request; py-spy put them at about 11% of an API worker's samples under uncached `/embed_texts`
load (BENCHMARKS.md). Everything outside this middleware still wraps these requests: BentoML's
tracing (each request keeps its span and request id), HTTP metrics, access log and timeout, and
the project's own middlewares. The APIs stay declared to BentoML, so their schemas, docs and
Python client are unchanged, and BentoML still answers the routes' other JSON media types
(`text/json`, `...+json`, none at all: what `traffic.RequestGuardMiddleware` lets through).

Each route's body is validated by BentoML's own input model of the API (what its endpoint
validates with) and turned into the errors that endpoint gives; a served test holds both paths
to the same status and body over good and bad requests on every route.
"""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any

from bentoml._internal.configuration.containers import BentoMLContainer
from bentoml._internal.context import trace_context
from pydantic import BaseModel, ValidationError
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import ASGIApp, Receive, Scope, Send

from clip_runner.errors import UNEXPECTED_ERROR, RequestError
from clip_runner.web.answer_json import json_body
from clip_runner.web.error_responses import (
    REPORTED_PROBLEMS,
    Problems,
    rejection_line,
    validation_problems,
)
from clip_runner.web.jsonlines import request_error
from clip_runner.web.traffic import is_application_json, posted_content_type

JSON_MEDIA_TYPE = "application/json"
logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class DirectRoute:
    """One API answered here: the model its body is validated with, and the coroutine that
    answers a validated body (raising RequestError for the caller's mistakes)."""

    model: type[BaseModel]
    handler: Callable[[Any], Awaitable[Any]]


def parsed(body: bytes, model: type[BaseModel]) -> BaseModel:
    """The validated request, or the RequestError BentoML's endpoint would answer, with the
    warning line it would log (`error_responses.CallerErrorLogFilter`). An empty body is
    BentoML's `{}`: every field takes its default. A leading byte order mark was taken off by
    `traffic.RequestGuardMiddleware`, for every JSON media type."""
    try:
        return model.model_validate_json(body or b"{}")
    except ValidationError as error:
        problems = first_problems(error, body, model)
        line, args = rejection_line(problems)
        logger.warning(line, *args)
        raise request_error(problems) from None


# Past this many problems a body's unknown fields are counted rather than each made an error.
MANY_PROBLEMS = 100


def first_problems(error: ValidationError, body: bytes, model: type[BaseModel]) -> Problems:
    """The problems the answer names (the first REPORTED_PROBLEMS) and their count. pydantic
    builds each error as a Python dict, and a 5.5-MB body of 400,000 unknown keys held the
    event loop 0.7 s building them (the validation itself took 0.16 s): past MANY_PROBLEMS,
    the body is validated again with only its first unknown fields."""
    total = error.error_count()
    fields = None
    if total > MANY_PROBLEMS:
        with contextlib.suppress(ValueError, RecursionError):  # pydantic's parser took it
            fields = json.loads(body)
    if isinstance(fields, dict):
        taken = set(model.model_fields) | {f.alias for f in model.model_fields.values() if f.alias}
        unknown = [name for name in fields if name not in taken]
        if len(unknown) > REPORTED_PROBLEMS:
            kept = set(unknown[:REPORTED_PROBLEMS])
            fewer = {name: value for name, value in fields.items() if name in taken or name in kept}
            try:
                model.model_validate(fewer)
            except ValidationError as trimmed:
                return Problems(validation_problems(trimmed).first, total)
    return validation_problems(error)


class DirectJsonMiddleware:
    """Answers `POST` of a JSON body to each of `routes` (path -> DirectRoute) here (see the
    module docstring).

    It sits inside `raw_images.RawImageBodyMiddleware`, so image bodies, rewritten there into
    JSON requests to `/invocations`, are answered here too.
    """

    def __init__(self, app: ASGIApp, routes: Mapping[str, DirectRoute], service_name: str) -> None:
        self.app = app
        self.routes = dict(routes)
        self.server_header = f"BentoML Service/{service_name}"
        formats = BentoMLContainer.logging_formatting.get()
        self.request_id_format = formats["span_id"]
        trace_id_header = bool(BentoMLContainer.http.response.trace_id.get())
        self.trace_id_format = formats["trace_id"] if trace_id_header else None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = scope.get("path", "")
        route = self.routes.get(path)
        content_type = None if route is None else posted_content_type(scope, path)
        if route is None or content_type is None or not is_application_json(content_type):
            await self.app(scope, receive, send)
            return
        body = await Request(scope, receive).body()
        try:
            answer = await route.handler(parsed(body, route.model))
            response = Response(json_body(answer), media_type=JSON_MEDIA_TYPE)
        except RequestError as error:
            response = error.to_response()
        except Exception:  # a bug of ours: logged, and answered as BentoML's endpoint would
            logger.exception("unexpected error answering %s", path)
            response = RequestError(500, "internal_error", UNEXPECTED_ERROR).to_response()
        response.headers.update(self.bentoml_headers())
        await response(scope, receive, send)

    def bentoml_headers(self) -> dict[str, str]:
        """The headers BentoML's endpoint adds to every answer: its Server line, the request id
        (which BentoML's tracing middleware took from the request's span) and, when BentoML's
        `http.response.trace_id` setting is on, the trace id."""
        headers = {"Server": self.server_header}
        if trace_context.request_id is not None:
            headers["X-BentoML-Request-ID"] = format(
                trace_context.request_id, self.request_id_format
            )
        if self.trace_id_format is not None and trace_context.trace_id is not None:
            headers["X-BentoML-Trace-ID"] = format(trace_context.trace_id, self.trace_id_format)
        return headers
