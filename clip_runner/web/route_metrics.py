"""BentoML's request metrics counted for the app's routes only, not for every path sent.

BentoML labels its request metrics (requests, durations, requests in progress) with the
request's raw path, whatever it is: each distinct path a client sends, routed or not, answered
404 or 401, became some twenty new series in `/metrics` (300 requests to made-up paths grew it
from 50 kB to 1.4 MB), kept for the process's life and read at every Prometheus scrape. Anyone
who can reach the port could grow it without bound, with or without the API key. Requests to a
path no route serves are still answered as before (404, 401) but not counted per path. A mount
counts through its own routes (the app BentoML mounts at `/` holds `/ping`); one without routes
(BentoML's Swagger assets, static files) counts as none: every path under it would match.
WebSocket handshakes, which no route takes, are not counted either.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from bentoml._internal.server.http import instruments
from starlette.routing import BaseRoute, Match, Mount, Route
from starlette.types import Receive, Scope, Send


def fixed_paths(routes: Sequence[BaseRoute], prefix: str = "") -> frozenset[str]:
    """The paths of routes without parameters, mounted apps' routes included (the service's
    `/ping`, `/ui` and `/execution-parameters` are in an app BentoML mounts at `/`): the quick
    check of almost every request."""
    paths: set[str] = set()
    for route in routes:
        if isinstance(route, Mount):
            paths |= fixed_paths(route.routes, prefix + route.path)
        elif isinstance(route, Route) and not route.param_convertors:
            paths.add(prefix + route.path)
    return frozenset(paths)


def matches_a_route(scope: Scope, routes: Sequence[BaseRoute]) -> bool:
    """Whether one of `routes` serves the request's path, for any method (a 405 is a route's
    answer); a mount only through a route of its own, so static files (a mount without routes)
    are none: every path under them would match."""
    for route in routes:
        if isinstance(route, Mount):
            match, child_scope = route.matches(scope)
            if match is not Match.NONE and matches_a_route({**scope, **child_scope}, route.routes):
                return True
        elif route.matches(scope)[0] is not Match.NONE:
            return True
    return False


def is_routed(scope: Scope, routes: Sequence[BaseRoute], paths: frozenset[str]) -> bool:
    """`matches_a_route`, after the quick check of `paths` (`fixed_paths(routes)`)."""
    return scope["path"] in paths or matches_a_route(scope, routes)


class RoutedTrafficMetricsMiddleware(instruments.RunnerTrafficMetricsMiddleware):
    """BentoML's metrics middleware, passing requests to unrouted paths on uncounted."""

    _paths: frozenset[str] | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "websocket":
            # No route takes one (each is refused, 403); counted, every handshake's path had
            # added its series, and a route's connections gauge had gone to -1.
            await self.app(scope, receive, send)
            return
        router: Any = getattr(scope.get("app"), "router", None)
        if scope["type"] == "http" and router is not None:
            if self._paths is None:
                self._paths = fixed_paths(router.routes)
            if not is_routed(scope, router.routes, self._paths):
                await self.app(scope, receive, send)
                return
        await super().__call__(scope, receive, send)


def count_routed_requests_only() -> None:
    """Make the middleware BentoML builds (it imports the class from `instruments` when it
    builds the app, after this service module is loaded) the one above."""
    instruments.RunnerTrafficMetricsMiddleware = RoutedTrafficMetricsMiddleware
