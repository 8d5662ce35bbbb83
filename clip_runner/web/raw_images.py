"""Raw image bodies on `/invocations`, as SageMaker clients often send them.

`invoke_endpoint(Body=jpeg_bytes, ContentType="image/jpeg", CustomAttributes="labels=cat,dog")`
arrives as an image body with the labels in `X-Amzn-SageMaker-Custom-Attributes`. This middleware
turns it into the Hugging Face toolkit's JSON request (`inputs` = the image as base64), so it
goes through the same validation, batching and answer shape as every other request. It sits
inside `RequestGuardMiddleware`, which has already bounded the body's size.
"""

from __future__ import annotations

import base64
import json

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from clip_runner.answers.hf_toolkit import CUSTOM_ATTRIBUTES_HEADER, labels_from_custom_attributes
from clip_runner.errors import RequestError, quoted
from clip_runner.web.traffic import (
    is_raw_image_media_type,
    media_type,
    posted_content_type,
)


def toolkit_body(image: bytes, labels: list[str], template: str | None) -> bytes:
    """The JSON request an image body and its header labels stand for."""
    parameters: dict[str, object] = {"candidate_labels": labels}
    if template is not None:  # an empty one too: the request's checks refuse it
        parameters["hypothesis_template"] = template
    inputs = base64.b64encode(image).decode("ascii")
    return json.dumps({"inputs": inputs, "parameters": parameters}).encode()


def header_text(value: bytes) -> str:
    """A header's text: UTF-8 where its bytes are (curl sends a typed `café` so; SageMaker allows
    only ASCII there, and percent-encoding works everywhere), else Latin-1, HTTP's old rule."""
    try:
        return value.decode("utf-8")
    except UnicodeDecodeError:
        return value.decode("latin-1")


def body_name(content_type: str) -> str:
    """How an error message names a raw body: by its media type, without parameters, quoted
    (a Content-Type may be 64 KiB long, and the answer had repeated it whole)."""
    return f"the {quoted(media_type(content_type))} body"


def callers_terms(message: str, content_type: str) -> str:
    """An error message about the toolkit request a raw body became, in terms of what the
    caller sent: its body and its header, not `inputs[0]` and `parameters` it never wrote."""
    header = CUSTOM_ATTRIBUTES_HEADER
    # A long prompt's message names its template after its label, mid-message.
    message = message.replace(" with parameters.hypothesis_template", f" with {header} template")
    for field, sent in (
        ("inputs[0]", body_name(content_type)),
        ("inputs", body_name(content_type)),
        ("parameters.hypothesis_template", f"{header} template"),
        ("parameters.candidate_labels", f"{header} labels"),
    ):
        if message.startswith(field):
            return sent + message[len(field) :]
    return message


def errors_in_callers_terms(send: Send, content_type: str) -> Send:
    """`send`, with a JSON error answer's message put in the caller's terms (`callers_terms`)."""
    start: Message | None = None
    chunks: list[bytes] = []

    async def rewriting(message: Message) -> None:
        nonlocal start
        if message["type"] == "http.response.start" and message["status"] >= 400:
            start = message
            return
        if start is None or message["type"] != "http.response.body":
            await send(message)
            return
        chunks.append(message.get("body", b""))
        if message.get("more_body", False):
            return
        body = b"".join(chunks)
        try:
            answer = json.loads(body)
            error = answer["error"]
            error["message"] = callers_terms(error["message"], content_type)
            body = json.dumps(answer).encode()
        except (ValueError, KeyError, TypeError):
            pass
        headers = [(k, v) for k, v in start["headers"] if k.lower() != b"content-length"]
        headers.append((b"content-length", b"%d" % len(body)))
        await send({**start, "headers": headers})
        await send({"type": "http.response.body", "body": body})

    return rewriting


class RawImageBodyMiddleware:
    """See the module docstring."""

    def __init__(
        self, app: ASGIApp, path: str = "/invocations", max_image_bytes: int = 10 * 1024 * 1024
    ) -> None:
        self.app = app
        self.path = path
        self.max_image_bytes = max_image_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        content_type = posted_content_type(scope, self.path)
        if content_type is None or not is_raw_image_media_type(content_type):
            await self.app(scope, receive, send)
            return
        named = CUSTOM_ATTRIBUTES_HEADER.lower().encode()
        sent = [value for name, value in scope.get("headers", []) if name.lower() == named]
        image = await self._read_body(receive)
        try:
            if not image:
                raise RequestError(400, "invalid_image", f"{body_name(content_type)} is empty", 0)
            # Before it is rewritten (base64 and JSON on the event loop): on an async endpoint
            # (1 GiB bodies) a 256-MiB image had held the loop, and /ping, for 9-12 s.
            if len(image) > self.max_image_bytes:
                raise RequestError(
                    422,
                    "invalid_image",
                    f"{body_name(content_type)}: image is larger than the "
                    f"{self.max_image_bytes}-byte limit",
                    0,  # the image's index, as the same image sent in JSON has it
                )
            if len(sent) > 1:  # the last one had been read, the others dropped unsaid
                raise RequestError(400, "bad_request", f"{CUSTOM_ATTRIBUTES_HEADER} is sent twice")
            labels, template = labels_from_custom_attributes(header_text(sent[0] if sent else b""))
        except RequestError as error:
            await error.to_response()(scope, receive, send)
            return
        body = toolkit_body(image, labels, template)
        rewritten = [
            (name, value)
            for name, value in scope["headers"]
            if name.lower() not in (b"content-type", b"content-length")
        ]
        rewritten += [
            (b"content-type", b"application/json"),
            (b"content-length", b"%d" % len(body)),
        ]
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()  # disconnects still reach the handler

        await self.app(
            {**scope, "headers": rewritten}, replay, errors_in_callers_terms(send, content_type)
        )

    @staticmethod
    async def _read_body(receive: Receive) -> bytes:
        chunks: list[bytes] = []
        while True:
            message = await receive()
            if message["type"] != "http.request":
                return b""
            chunks.append(message.get("body", b""))
            if not message.get("more_body", False):
                return b"".join(chunks)
