"""The OpenAPI document `/docs.json` serves (and Swagger UI at `/` renders): BentoML's, made true.

BentoML builds the document from the APIs' signatures. A client generator or Swagger UI read it
and was misled:
- every error was BentoML's `{"error": string}`, under 400, 404 and 500 only, where the server
  answers `{"error": {"type", "message", "index"?}}` under the statuses of the README's Errors
  table;
- `/invocations` declared the original's answer alone (not the Hugging Face toolkit's) and JSON
  bodies alone (not raw images with their labels header, nor JSON Lines);
- request fields lost their alternatives, BentoML keeping an `anyOf`'s first branch: `inputs`
  (one image, or a list of them) was a string;
- it said OpenAPI 3.0 and wrote 3.1's JSON Schema (`prefixItems`, `{"type": "null"}`,
  `examples`), so Swagger UI showed none of the examples and its "Try it out" sent `"string"`;
- `/ping` and `/execution-parameters` were missing, `/readyz` said nothing of its 503, and its
  title and text were BentoML's own (with badges loaded from other sites).

`served_document` is a pure function of BentoML's document and the APIs' input schemas
(pydantic's own, with every branch); `ApiDocumentationMiddleware` answers `GET /docs.json` with
it, built once per worker on the first request, and `GET /` with Swagger UI's page.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from typing import Any

from starlette.responses import HTMLResponse, Response
from starlette.types import ASGIApp, Receive, Scope, Send

from clip_runner.answers.hf_toolkit import CUSTOM_ATTRIBUTES_HEADER
from clip_runner.web.ui import page_headers, page_html

OPENAPI_VERSION = "3.0.3"
DOCUMENT_PATH = "/docs.json"
PAGE = "docs.html"
# Swagger UI's script and style files (which BentoML serves), the styles it sets inline, and
# its images (its own, and SVGs as data: URIs): nothing from another host.
PAGE_SOURCES = ("'self'", "'self' 'unsafe-inline'", "'self' data:")
SCHEMAS = "#/components/schemas/"
ERROR_REF = {"$ref": SCHEMAS + "Error"}
# The JSON error every 4xx/5xx answers with (clip_runner/errors.py).
ERROR_SCHEMA = {
    "type": "object",
    "required": ["error"],
    "properties": {
        "error": {
            "type": "object",
            "required": ["type", "message"],
            "properties": {
                "type": {"type": "string", "description": "e.g. invalid_image (README, Errors)"},
                "message": {"type": "string", "description": "what was wrong, for a person"},
                "index": {"type": "integer", "description": "which image, where one is at fault"},
            },
        }
    },
}
# What each status an API answers means here; the types are the README's Errors table's.
API_ERRORS = {
    400: "not JSON (malformed_json), an unparsable request or two Content-Types (bad_request)",
    406: "the Accept header allows no type the route answers (not_acceptable)",
    408: "the body or the headers did not arrive in time (body_timeout, header_timeout)",
    413: "the body over CLIP_MAX_BODY_BYTES (payload_too_large), the images over "
    "CLIP_MAX_REQUEST_PIXELS (too_many_pixels)",
    415: "a Content-Type, charset or coding the route does not take (unsupported_media_type)",
    422: "a field or an image is invalid (invalid_request, invalid_image, image_not_found, "
    "forbidden_url); `index` names the image",
    429: "CLIP_MAX_CONCURRENCY requests in flight in this worker (too_many_requests); "
    "Retry-After says when to retry",
    431: "the request line and headers over CLIP_MAX_HEADER_BYTES (headers_too_large)",
    500: "a bug of the server's (internal_error)",
    503: "the model is loading or the runner unavailable or overloaded (not_ready, "
    "runner_unavailable, overloaded, s3_unavailable): retry",
    504: "not answered within CLIP_REQUEST_TIMEOUT_S (timeout)",
}
UNAUTHORIZED = "Authorization lacks `Bearer <CLIP_API_KEY>` (unauthorized)"
INVOCATIONS_ERRORS = {
    400: API_ERRORS[400] + "; a raw image body empty, or without labels (missing_labels)",
    413: API_ERRORS[413] + "; more than CLIP_MAX_LINES JSON Lines (too_many_lines)",
}
RAW_IMAGE = {"schema": {"type": "string", "format": "binary"}}
LINES = {"schema": {"type": "string", "description": "one JSON request per line"}}
ANSWER_LINES = {
    "schema": {"type": "string", "description": "one JSON answer (or error) per request line"}
}
DESCRIPTION = (
    "CLIP zero-shot image classification. `POST /invocations` answers the original SageMaker "
    "container's request (`images` + `classes`) in its shape, the Hugging Face toolkit's "
    "(`inputs` + `parameters`) in that toolkit's, raw image bodies (labels in "
    f"`{CUSTOM_ATTRIBUTES_HEADER}: labels=cat,dog`) and Batch Transform's JSON Lines; "
    "`/classify`, `/embed_images` and `/embed_texts` are this server's own. Every error is "
    '`{"error": {"type", "message", "index"?}}`; the README lists each type.'
)


def as_openapi_30(schema: Any) -> Any:
    """A JSON Schema as pydantic writes it (2020-12, OpenAPI 3.1's), in OpenAPI 3.0's dialect:
    `{"type": "null"}` branches as `nullable`, `prefixItems` as `items` of either kind, the
    first of `examples` as `example` (what Swagger UI shows and fills in), and a `$ref` beside
    other keywords (which 3.0 ignores) put in an `allOf`."""
    if isinstance(schema, list):
        return [as_openapi_30(item) for item in schema]
    if not isinstance(schema, dict):
        return schema
    node = {key: as_openapi_30(value) for key, value in schema.items()}
    examples = node.pop("examples", None)
    if isinstance(examples, list) and examples:
        node.setdefault("example", examples[0])
    if "prefixItems" in node:
        node["items"] = {"anyOf": node.pop("prefixItems")}
    branches = node.get("anyOf")
    if isinstance(branches, list) and {"type": "null"} in branches:
        kept = [branch for branch in branches if branch != {"type": "null"}]
        node["nullable"] = True
        if len(kept) == 1:
            del node["anyOf"]
            node = {**kept[0], **node}
        else:
            node["anyOf"] = kept
    if "default" in node and node["default"] is None:
        node["nullable"] = True
    if "$ref" in node and len(node) > 1:
        node = {"allOf": [{"$ref": node.pop("$ref")}], **node}
    return node


def error_responses(errors: Mapping[int, str]) -> dict[str, Any]:
    """OpenAPI responses for `errors` (status -> what it means), each the JSON error."""
    return {
        str(status): {
            "description": meaning,
            "content": {"application/json": {"schema": ERROR_REF}},
        }
        for status, meaning in sorted(errors.items())
    }


def request_example(schema: Mapping[str, Any]) -> dict[str, Any]:
    """A request made of the fields that carry an example: what Swagger UI's "Try it out"
    starts from (built from every field, it had sent `inputs` and `parameters` beside `images`
    and `classes`: a toolkit request, refused)."""
    return {
        name: field["example"]
        for name, field in schema.get("properties", {}).items()
        if "example" in field
    }


def invocations_operation(operation: dict[str, Any]) -> None:
    """`/invocations`' other bodies (raw images, JSON Lines) and answers (the toolkit's)."""
    body = operation["requestBody"]["content"]["application/json"]
    body["schema"]["anyOf"] = [  # the original's fields, or the toolkit's
        {"required": ["images", "classes"]},
        {"required": ["inputs", "parameters"]},
    ]
    operation["requestBody"]["content"].update(
        {"image/*": RAW_IMAGE, "application/x-image": RAW_IMAGE, "application/jsonlines": LINES}
    )
    operation["parameters"] = [
        {
            "name": CUSTOM_ATTRIBUTES_HEADER,
            "in": "header",
            "required": False,
            "description": "With a raw image body: its labels (`labels=cat,dog`) and optionally "
            "a template (`;template=a photo of a {}`). Ignored with JSON.",
            "schema": {"type": "string", "example": "labels=cat,dog"},
        }
    ]
    label_scores = {"type": "array", "items": {"$ref": SCHEMAS + "LabelScore"}}
    answer = operation["responses"]["200"]
    answer["description"] = (
        "The original's answer (one Prediction per image); for a toolkit request, the labels "
        "by score (a list of them per image, where `inputs` was a list); for JSON Lines, one "
        "answer (or error) per line"
    )
    answer["content"] = {
        "application/json": {
            "schema": {
                "anyOf": [
                    {"type": "array", "items": {"$ref": SCHEMAS + "Prediction"}},
                    label_scores,
                    {"type": "array", "items": label_scores},
                ]
            }
        },
        "application/jsonlines": ANSWER_LINES,
    }


def health_paths() -> dict[str, Any]:
    """The routes BentoML's document lacks or misdescribes."""
    readiness = {
        "get": {
            "tags": ["Infrastructure"],
            "description": "200 (empty body) once the model is loaded and the runner answers; "
            "else a 503 `not_ready`, within a second (SageMaker's health check).",
            "responses": {
                "200": {"description": "ready"},
                **error_responses({503: "not ready: loading, or the runner is not answering"}),
            },
        }
    }
    parameters = {
        "type": "object",
        "properties": {
            "MaxConcurrentTransforms": {"type": "integer"},
            "BatchStrategy": {"type": "string", "enum": ["MULTI_RECORD"]},
            "MaxPayloadInMB": {"type": "integer"},
        },
    }
    return {
        "/ping": readiness,
        "/readyz": readiness,
        "/execution-parameters": {
            "get": {
                "tags": ["Infrastructure"],
                "description": "What a Batch Transform job asks when it leaves them unset.",
                "responses": {
                    "200": {
                        "description": "the job's parameters",
                        "content": {"application/json": {"schema": parameters}},
                    }
                },
            }
        },
    }


def served_document(
    bentoml_document: Mapping[str, Any],
    input_schemas: Mapping[str, Mapping[str, Any]],
    api_key: bool,
) -> dict[str, Any]:
    """BentoML's OpenAPI document (`Service.openapi_spec.asdict()`) corrected (module
    docstring). `input_schemas`: each API's path -> pydantic's JSON schema of its request, its
    references to `#/components/schemas/`; `api_key`: whether CLIP_API_KEY is set."""
    document = json.loads(json.dumps(bentoml_document))  # a copy, its statuses as strings
    components = document.setdefault("components", {})
    schemas = components.setdefault("schemas", {})
    for name in ("InvalidArgument", "NotFound", "InternalServerError", "TaskStatusResponse"):
        schemas.pop(name, None)  # BentoML's errors and tasks: neither is answered here
    for path, input_schema in input_schemas.items():
        request = dict(input_schema)
        schemas.update(request.pop("$defs", {}))
        request = as_openapi_30(request)
        operation = document["paths"][path]["post"]
        operation["requestBody"] = {
            "required": True,
            "content": {
                "application/json": {"schema": request, "example": request_example(request)}
            },
        }
        for status in ("400", "404", "500"):  # BentoML's, in its error shape
            operation["responses"].pop(status, None)
        errors = {**API_ERRORS, **(INVOCATIONS_ERRORS if path == "/invocations" else {})}
        if api_key:
            errors[401] = UNAUTHORIZED
            operation["security"] = [{"bearer": []}]
        operation["responses"].update(error_responses(errors))
        if path == "/invocations":
            invocations_operation(operation)
    schemas.update({name: as_openapi_30(schema) for name, schema in schemas.items()})
    schemas["Error"] = ERROR_SCHEMA
    for path_item in document["paths"].values():
        for operation in path_item.values():
            for answer in operation.get("responses", {}).values():
                for media in answer.get("content", {}).values():
                    if "schema" in media:
                        media["schema"] = as_openapi_30(media["schema"])
    document["paths"].update(health_paths())
    if api_key:
        components["securitySchemes"] = {"bearer": {"type": "http", "scheme": "bearer"}}
    version = str(document.get("info", {}).get("version"))
    document["info"] = {
        "title": "CLIP zero-shot image classification",
        "version": "dev" if version == "None" else version,
        "description": DESCRIPTION,
    }
    document["openapi"] = OPENAPI_VERSION
    return document


class ApiDocumentationMiddleware:
    """Answers `GET /docs.json` with `document()` (built on the first request, then kept),
    and `GET /` with Swagger UI's page for it (`docs.html`, this project's: BentoML's loaded
    Google Tag Manager, and Swagger UI's default sent the document's address to swagger.io)."""

    def __init__(self, app: ASGIApp, document: Callable[[], dict[str, Any]]) -> None:
        self.app = app
        self.document = document
        self.body: bytes | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = scope.get("path")
        asked = scope["type"] == "http" and scope["method"] in ("GET", "HEAD")
        if not asked or path not in (DOCUMENT_PATH, "/"):
            await self.app(scope, receive, send)
            return
        if path == "/":
            page = HTMLResponse(page_html(PAGE), headers=page_headers(PAGE, *PAGE_SOURCES))
            await page(scope, receive, send)
            return
        if self.body is None:
            self.body = json.dumps(self.document()).encode()
        await Response(self.body, media_type="application/json")(scope, receive, send)
