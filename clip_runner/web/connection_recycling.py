"""Keep-alive connections spread over the API workers: each answer closes its connection with
probability 1/N (`CLIP_KEEPALIVE_REQUESTS`), so a client reconnects about every N requests.

The API workers share one listening socket, and a worker's event loop accepts every pending
connection at once: 32 clients that connect together all landed on one of two workers in some
runs, leaving the other idle for as long as the connections lived (keep-alive clients keep
them for good). A reconnect is accepted by whichever worker gets to it first, usually one with
spare time, so recycled connections drift from busy workers to idle ones. nginx bounds
requests per connection the same way (`keepalive_requests`). A coin per answer needs no
per-connection state.
"""

from __future__ import annotations

import random
from collections.abc import Callable

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from clip_runner.web.traffic import CLOSE


class ConnectionRecyclingMiddleware:
    """Adds `Connection: close` to about one answer in `every` (0: never)."""

    def __init__(self, app: ASGIApp, every: int, draw: Callable[[], float] = random.random):
        self.app = app
        self.every = every
        self.draw = draw

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or self.every <= 0 or self.draw() * self.every >= 1:
            await self.app(scope, receive, send)
            return

        async def closing(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = [h for h in message.get("headers", []) if h[0].lower() != b"connection"]
                message = {**message, "headers": [*headers, CLOSE]}
            await send(message)

        await self.app(scope, receive, closing)
