"""BentoML's request metrics counted per route, not per path sent: which paths are routed, then
made-up paths against the real servers (with and without the API key)."""

from __future__ import annotations

import socket
import uuid
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import pytest
from _bentoml_impl.server.mount import PassiveMount
from starlette.applications import Starlette
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from clip_runner.web.route_metrics import fixed_paths, is_routed, matches_a_route
from tests.helpers import GUARD_AUTH

ROUTES = [
    Route("/invocations", lambda _: None, methods=["POST"]),
    Route("/items/{item_id:int}", lambda _: None),
    Mount("/static_content", app=StaticFiles(directory=Path(__file__).parent)),
    Mount("/admin", routes=[Route("/stats", lambda _: None)]),
    # the service's own app (/ping, /ui, ...), which BentoML mounts at "/"
    PassiveMount("/", Starlette(routes=[Route("/ping", lambda _: None)])),
]


def test_fixed_paths_include_the_mounted_apps_routes():
    assert fixed_paths(ROUTES) == {"/invocations", "/admin/stats", "/ping"}


@pytest.mark.parametrize(
    ("path", "routed"),
    [
        ("/invocations", True),
        ("/ping", True),
        ("/items/7", True),
        ("/items/seven", False),
        ("/invocations/", False),
        ("/static_content/swagger-ui.css", False),  # a mount matches any path under it
        ("/admin/stats", True),
        ("/admin/made-up", False),
        ("/ping/", False),
        ("/made-up", False),
    ],
)
def test_only_routes_count_as_routed(path, routed):
    scope = {"type": "http", "path": path, "method": "GET", "root_path": ""}
    assert is_routed(scope, ROUTES, fixed_paths(ROUTES)) is routed
    assert matches_a_route(scope, ROUTES) is routed  # the quick check agrees


def websocket_upgrade(server_url: str, path: str) -> bytes:
    """The status line a WebSocket handshake to `path` is answered with (the service has no
    WebSocket route)."""
    request = (
        f"GET {path} HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
    )
    with socket.create_connection(("127.0.0.1", urlsplit(server_url).port), timeout=10) as sock:
        sock.sendall(request.encode())
        return sock.recv(65536).split(b"\r\n", 1)[0]


def made_up_paths_leave_no_series(server_url: str, headers: dict[str, str]) -> None:
    with httpx.Client(base_url=server_url, timeout=30) as client:
        tag = uuid.uuid4().hex[:12]
        statuses = {client.get(f"/made-up-{tag}-{n}").status_code for n in range(20)} | {
            client.post(f"/classify/{tag}", json={}).status_code,
            client.get(f"/static_content/{tag}.css").status_code,
        }
        # WebSocket handshakes had been counted per path (and a route's gauge left at -1)
        refused = {websocket_upgrade(server_url, path) for path in (f"/ws-{tag}", "/embed_texts")}
        assert {line.split()[1] for line in refused} == {b"403"}
        assert client.post("/classify", json={}, headers=headers).status_code == 422
        assert client.get("/classify", headers=headers).status_code == 405
        assert client.get("/ping").status_code == 200  # in the app BentoML mounts at "/"
        assert client.post("/ping").status_code == 405
        metrics = client.get("/metrics").text
    assert statuses <= {401, 404}
    assert tag not in metrics  # no series for any of them
    assert "websocket_connections{" not in metrics
    # routes are still counted, whatever their answer
    assert 'endpoint="/classify",http_response_code="422"' in metrics
    assert 'endpoint="/classify",http_response_code="405"' in metrics
    assert 'endpoint="/ping",http_response_code="200"' in metrics
    assert 'endpoint="/ping",http_response_code="405"' in metrics


def test_made_up_paths_are_not_counted(served):
    made_up_paths_leave_no_series(served.url, {})


def test_made_up_paths_without_the_api_key_are_not_counted(guarded):
    made_up_paths_leave_no_series(guarded.url, GUARD_AUTH)
