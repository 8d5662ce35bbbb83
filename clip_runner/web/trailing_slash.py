"""Starlette's redirects of a path with a trailing slash (`/classify/` -> `/classify`), made safe.

Starlette answers a request to a route's path plus `/` with a bodiless 307 to the route, its
`Location` built from the request's `Host` header. An API client then got an empty answer that
said nothing (httpx and curl do not follow it unasked), or, following it, re-sent its body to
whatever host its `Host` header named, over plain HTTP behind a TLS-terminating proxy. Here a
`GET` or `HEAD` (a browser at `/ui/`) is still redirected, to the path alone (a relative
`Location`: same host, same scheme, and the same path prefix where a proxy serves the service
under one); any other method gets a 404 in the JSON error shape
naming the route meant, as the original container's Flask answered.
"""

from __future__ import annotations

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from clip_runner.errors import quoted
from clip_runner.web.traffic import send_error

REDIRECTS = (307, 308)


def slash_redirect(scope: Scope, start: Message) -> bool:
    """Whether `start` is Starlette's redirect of this request's path without its final `/`."""
    path = scope["path"]
    return start["status"] in REDIRECTS and len(path) > 1 and path.endswith("/")


def relative_location(scope: Scope) -> bytes:
    """The route's path and the request's query, relative to the request's own path
    (`/ui/` -> `../ui`): no scheme or host, and no path from the root, which had sent a browser
    at a proxy's `/clip/ui/` to `/ui`, outside the proxy's prefix."""
    path = scope["path"]
    route = path.rstrip("/")
    if not route:
        location = "/"
    else:
        location = "../" * (len(path) - len(route)) + route.rsplit("/", 1)[-1]
    query = scope.get("query_string", b"")
    return location.encode("latin-1") + (b"?" + query if query else b"")


class TrailingSlashMiddleware:
    """See the module docstring."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not scope["path"].endswith("/") or scope["path"] == "/":
            await self.app(scope, receive, send)
            return
        redirect: Message | None = None

        async def rewriting_send(message: Message) -> None:
            nonlocal redirect
            if message["type"] == "http.response.start" and slash_redirect(scope, message):
                redirect = message
                return
            if redirect is None:
                await send(message)
                return
            if message.get("more_body", False):  # the redirect's own (empty) body
                return
            if scope["method"] in ("GET", "HEAD"):
                headers = [(k, v) for k, v in redirect["headers"] if k.lower() != b"location"]
                headers.append((b"location", relative_location(scope)))
                await send({**redirect, "headers": headers})
                await send({"type": "http.response.body", "body": b""})
                return
            route = scope["path"].rstrip("/")
            await send_error(
                send,
                404,
                "not_found",
                f"{scope['method']} {quoted(scope['path'])}: no such route; "
                f"did you mean {quoted(route)} (without the final '/')?",
            )

        await self.app(scope, receive, rewriting_send)
