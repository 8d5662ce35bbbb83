"""One JSON error shape for every caller mistake: {"error": {"type", "message", "index"?}}.

Every layer that can refuse a request (image sources, answers, the HTTP side) raises
`RequestError`; `clip_runner.web.error_responses` rewrites the errors BentoML and Starlette
produce themselves into the same shape.
"""

from __future__ import annotations

from typing import Any

from starlette.responses import JSONResponse

# Characters of a caller's text (a URL) an error message quotes (`quoted`).
QUOTED_CHARS = 200


class RequestError(Exception):
    """A caller's mistake, answered with a 4xx JSON error naming the field or image index."""

    def __init__(
        self, status: int, error_type: str, message: str, index: int | None = None
    ) -> None:
        super().__init__(message)
        self.status = status
        self.error_type = error_type
        self.message = message
        self.index = index

    def to_response(self) -> JSONResponse:
        return JSONResponse(
            error_body(self.error_type, self.message, self.index), status_code=self.status
        )


class ImageError(RequestError):
    """A 422 about one image of the request, named `images[index]` unless the request's images
    came in another field (`load_images` renames it: the Hugging Face shape's `inputs`); a 503
    where what the image is read from is down, not the caller's doing (S3 throttling, say)."""

    def __init__(
        self,
        index: int,
        reason: str,
        error_type: str = "invalid_image",
        field: str = "images",
        status: int = 422,
    ) -> None:
        super().__init__(status, error_type, f"{field}[{index}]: {reason}", index)
        self.reason = reason

    def in_field(self, field: str) -> ImageError:
        return ImageError(self.index or 0, self.reason, self.error_type, field, self.status)


# BentoML's endpoint's answer to an exception it did not expect; the direct JSON path and the
# JSON Lines path answer a bug of ours with it too.
UNEXPECTED_ERROR = "An unexpected error has occurred, please check the server log."


def quoted(text: str, most: int = QUOTED_CHARS) -> str:
    """Caller-sent `text` (a URL, say) as an error message quotes it: whole up to `most`
    characters, else its start and its length. A URL may be megabytes long (a request body's
    worth); the answer need not repeat it."""
    if len(text) <= most:
        return text
    return f"{text[:most]}... ({len(text)} characters)"


def error_body(error_type: str, message: str, index: int | None = None) -> dict[str, Any]:
    """The error object every endpoint answers with."""
    error: dict[str, Any] = {"type": error_type, "message": message}
    if index is not None:
        error["index"] = index
    return {"error": error}
