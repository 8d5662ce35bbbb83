"""`GET /readyz` answered as `/ping` is, from this worker's probe of the runner.

BentoML's own `/readyz` asks the runner itself, and its client catches only aiohttp's
ServerTimeoutError while aiohttp's overall timeout raises a plain TimeoutError: while the runner
was not ready (loading, frozen) `/readyz` hung for BentoML's traffic timeout (70 s by default),
then answered a text/plain 500 (BentoML's timeout layer never saw the error). Orchestrators'
readiness probes read it (Kubernetes', a load balancer's); here it is 200 when ready, else the
JSON 503 `not_ready` within a second, as `/ping`.
"""

from __future__ import annotations

from starlette.types import ASGIApp, Receive, Scope, Send

READYZ_PATH = "/readyz"


class ReadyzMiddleware:
    """Answers `GET`/`HEAD /readyz` with `answer` (the ASGI app of `/ping`'s endpoint)."""

    def __init__(self, app: ASGIApp, answer: ASGIApp) -> None:
        self.app = app
        self.answer = answer

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if (
            scope["type"] == "http"
            and scope["path"] == READYZ_PATH
            and scope["method"] in ("GET", "HEAD")
        ):
            await self.answer(scope, receive, send)
            return
        await self.app(scope, receive, send)
