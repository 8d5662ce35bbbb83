"""BentoML's request metrics counted for the app's routes only, not for every path sent.

BentoML labels its request metrics (requests, durations, requests in progress) with the
request's raw path, whatever it is: each distinct path a client sends, routed or not, answered
404 or 401, became some twenty new series in `/metrics` (300 requests to made-up paths grew it
from 50 kB to 1.4 MB), kept for the process's life and read at every Prometheus scrape. Anyone
who can reach the port could grow it without bound, with or without the API key. Requests to a
path no route serves are still answered as before (404, 405, 401) but not counted per path. A
mount (BentoML's Swagger assets) counts as no route: every path under it would match.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from bentoml._internal.server.http import instruments
from starlette.routing import BaseRoute, Match, Mount, Route
from starlette.types import Receive, Scope, Send


def fixed_paths(routes: Sequence[BaseRoute]) -> frozenset[str]:
    """The paths of routes without parameters: the quick check of almost every request."""
    return frozenset(
        route.path for route in routes if isinstance(route, Route) and not route.param_convertors
    )


def is_routed(scope: Scope, routes: Sequence[BaseRoute], paths: frozenset[str]) -> bool:
    """Whether a route (not a mount) serves the request's path, for any method (a 405 is a
    route's answer)."""
    if scope["path"] in paths:
        return True
    return any(
        route.matches(scope)[0] is not Match.NONE
        for route in routes
        if not isinstance(route, Mount)
    )


class RoutedTrafficMetricsMiddleware(instruments.RunnerTrafficMetricsMiddleware):
    """BentoML's metrics middleware, passing requests to unrouted paths on uncounted."""

    _paths: frozenset[str] | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
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
