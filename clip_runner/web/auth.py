"""An optional shared API key: `Authorization: Bearer <key>` on every route but the health checks.

Off unless `CLIP_API_KEY` is set: SageMaker endpoints are protected by IAM, and SageMaker's own
`/ping` carries no credentials. When it is on, `/ping`, `/livez`, `/readyz` and `/metrics` stay
open (orchestrators and Prometheus probe them), and so do `/ui`, the demo page, and the API's
documentation (`/`, Swagger UI, its files under `/static_content/`, and `/docs.json`): a browser
cannot attach a header to a page it navigates to, and they are static, with nothing secret in
them; the demo page's API calls carry the key the user types into it, and Swagger UI's those
its Authorize button was given (the document declares the Bearer scheme). Everything else
answers 401
in the JSON error shape until the key matches. The check runs before the body is read, so
callers without the key cost neither a body buffer nor an admission slot (what they send of a
body is read and dropped, within bounds, so that the answer reaches them: traffic.py).
"""

from __future__ import annotations

import hmac

from starlette.types import ASGIApp, Receive, Scope, Send

from clip_runner.web.traffic import STATIC_PREFIX, Refusal, refuse_unread

# "/ui/" too, so that a browser there is sent on to "/ui" (trailing_slash.py).
OPEN_PATHS = frozenset({"/ping", "/livez", "/readyz", "/metrics", "/ui", "/ui/", "/", "/docs.json"})


def bearer_token(authorization: bytes) -> bytes | None:
    """The credentials of an `Authorization: Bearer <token>` header value (scheme in any case)."""
    scheme, _, token = authorization.strip().partition(b" ")
    if scheme.lower() != b"bearer" or not token.strip():
        return None
    return token.strip()


def key_matches(authorization: bytes, key: bytes) -> bool:
    """Whether the header carries `key`, compared in constant time (no timing oracle)."""
    token = bearer_token(authorization)
    return token is not None and hmac.compare_digest(token, key)


class ApiKeyMiddleware:
    """See the module docstring; with `key=None` every request passes."""

    def __init__(self, app: ASGIApp, key: str | None, body_timeout_s: float = 10.0) -> None:
        self.app = app
        self.key = key.encode() if key else None
        self.body_timeout_s = body_timeout_s

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if (
            self.key is None
            or scope["type"] != "http"
            or scope["path"] in OPEN_PATHS
            or scope["path"].startswith(STATIC_PREFIX)  # Swagger UI's scripts and styles
        ):
            await self.app(scope, receive, send)
            return
        authorization = next(
            (value for name, value in scope["headers"] if name.lower() == b"authorization"), b""
        )
        if key_matches(authorization, self.key):
            await self.app(scope, receive, send)
            return
        reason = "is missing" if not authorization else "does not carry the API key"
        refusal = Refusal(
            401,
            "unauthorized",
            f"the Authorization header {reason}: send 'Authorization: Bearer <key>' "
            "(the server's CLIP_API_KEY)",
            [(b"www-authenticate", b'Bearer realm="clip"')],
        )
        await refuse_unread(scope, receive, send, refusal, self.body_timeout_s)
