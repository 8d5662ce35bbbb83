"""Starlette's trailing-slash redirects: on a Starlette app through httpx's ASGI transport, then
against the real servers (with and without the API key)."""

from __future__ import annotations

import asyncio
from urllib.parse import urljoin

import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from clip_runner.web.trailing_slash import TrailingSlashMiddleware
from tests.helpers import GUARD_AUTH


async def answer(request: Request) -> Response:
    return JSONResponse({"path": request.url.path})


APP = TrailingSlashMiddleware(
    Starlette(
        routes=[
            Route("/classify", answer, methods=["POST"]),
            Route("/ui", answer, methods=["GET", "HEAD"]),
            Route("/docs/", answer),  # a route of its own with the slash: served, not rewritten
        ]
    )
)


def exchange(method: str, path: str, headers: dict[str, str] | None = None) -> httpx.Response:
    async def go() -> httpx.Response:
        transport = httpx.ASGITransport(app=APP)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            return await client.request(
                method, path, json={} if method == "POST" else None, headers=headers
            )

    return asyncio.run(go())


def test_a_post_to_a_route_plus_slash_is_a_json_404_naming_the_route():
    response = exchange("POST", "/classify/", {"host": "evil.example"})
    assert response.status_code == 404 and "location" not in response.headers
    assert response.json()["error"] == {
        "type": "not_found",
        "message": "POST /classify/: no such route; "
        "did you mean /classify (without the final '/')?",
    }


@pytest.mark.parametrize(
    ("method", "path", "location"),
    [
        ("GET", "/ui/", "../ui"),
        ("HEAD", "/ui/", "../ui"),
        ("GET", "/ui/?lang=fr", "../ui?lang=fr"),
    ],
)
def test_a_browser_is_sent_on_to_the_route_on_the_same_host(method, path, location):
    response = exchange(method, path, {"host": "evil.example"})
    assert response.status_code == 307
    assert response.headers["location"] == location  # relative: no host taken from the request
    # and relative to the path, so that behind a proxy's prefix the browser stays under it
    for prefix in ("", "/clip", "/a/b"):
        base = f"https://proxy.example{prefix}{path}"
        query = path.partition("?")[1] + path.partition("?")[2]
        assert urljoin(base, location) == f"https://proxy.example{prefix}/ui{query}"


def test_routes_and_unknown_paths_are_untouched():
    assert exchange("POST", "/classify").json() == {"path": "/classify"}
    assert exchange("GET", "/docs/").json() == {"path": "/docs/"}
    assert exchange("GET", "/nothing/").status_code == 404


@pytest.mark.parametrize("server", ["served", "guarded"])
def test_served_routes_plus_slash(request, server):
    url = request.getfixturevalue(server).url
    with httpx.Client(base_url=url, timeout=30, headers=GUARD_AUTH) as client:
        posted = client.post("/invocations/", json={}, headers={"host": "evil.example"})
        browsed = client.get("/ui/", headers={"authorization": ""})  # open, as /ui is
        page = client.get("/ui/", follow_redirects=True, headers={"authorization": ""})
    assert posted.status_code == 404 and posted.json()["error"]["type"] == "not_found"
    assert "did you mean /invocations" in posted.json()["error"]["message"]
    assert (browsed.status_code, browsed.headers["location"]) == (307, "../ui")
    assert page.status_code == 200 and page.url.path == "/ui"
