"""The optional API key: header parsing, then every route of the real `guarded` server."""

from __future__ import annotations

import asyncio

import bentoml
import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from clip_runner.web.auth import ApiKeyMiddleware, bearer_token, key_matches
from tests.helpers import GUARD_AUTH, GUARD_KEY, as_base64, photo_like, uvicorn_on_loopback
from tests.web.test_traffic import (
    guarded_app,
    open_slow_upload,
    read_answer,
    three_uploads,
    whole_upload,
)

IMAGE = as_base64(photo_like(32, 32, seed=5))
# Every route the service answers, with a body each accepts.
PROTECTED = [
    ("POST", "/invocations", {"images": [IMAGE], "classes": [["cat", 1], ["dog", 0]]}),
    ("POST", "/classify", {"images": [IMAGE], "labels": ["cat", "dog"]}),
    ("POST", "/embed_images", {"images": [IMAGE]}),
    ("POST", "/embed_texts", {"texts": ["a cat"]}),
    ("GET", "/schema.json", None),  # what the BentoML client reads first
]
# The health checks, the demo page, and the API's documentation (Swagger UI and its files).
OPEN = [
    "/ping",
    "/livez",
    "/readyz",
    "/metrics",
    "/ui",
    "/",
    "/docs.json",
    "/static_content/swagger-ui-bundle.js",
]


@pytest.mark.parametrize(
    ("header", "token"),
    [
        (b"Bearer abc", b"abc"),
        (b"bearer  abc ", b"abc"),
        (b"BEARER abc", b"abc"),
        (b"Basic abc", None),
        (b"Bearer", None),
        (b"Bearer ", None),
        (b"", None),
        (b"abc", None),
    ],
)
def test_bearer_token_parsing(header, token):
    assert bearer_token(header) == token


def test_key_matches_only_the_exact_key():
    assert key_matches(b"Bearer s3cret", b"s3cret")
    assert not key_matches(b"Bearer s3cre", b"s3cret")
    assert not key_matches(b"Bearer s3cretX", b"s3cret")
    assert not key_matches(b"Basic s3cret", b"s3cret")
    assert not key_matches(b"Bearer s3creT", b"s3cret")  # as long, its last byte wrong


def test_without_a_key_every_request_passes():
    async def hello(_: Request) -> JSONResponse:
        return JSONResponse({"ok": True})

    app = ApiKeyMiddleware(Starlette(routes=[Route("/x", hello)]), key=None)

    async def go() -> httpx.Response:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            return await client.get("/x")

    assert asyncio.run(go()).json() == {"ok": True}


@pytest.mark.parametrize(("method", "path", "body"), PROTECTED)
def test_every_api_route_needs_the_key(guarded, method, path, body):
    url = f"{guarded.url}{path}"
    for headers, reason in (
        ({}, "is missing"),
        ({"Authorization": "Bearer wrong-key"}, "does not carry the API key"),
        ({"Authorization": f"Bearer {GUARD_KEY[:-1]}?"}, "does not carry the API key"),
        ({"Authorization": f"Basic {GUARD_KEY}"}, "does not carry the API key"),
    ):
        refused = httpx.request(method, url, json=body, headers=headers, timeout=30)
        assert refused.status_code == 401, (path, headers)
        assert refused.headers["www-authenticate"].startswith("Bearer")
        error = refused.json()["error"]
        assert error["type"] == "unauthorized" and reason in error["message"]
        assert GUARD_KEY not in refused.text
    allowed = httpx.request(method, url, json=body, headers=GUARD_AUTH, timeout=30)
    assert allowed.status_code == 200, allowed.text


@pytest.mark.parametrize("path", OPEN)
def test_health_metrics_the_demo_page_and_the_docs_need_no_key(guarded, path):
    assert httpx.get(f"{guarded.url}{path}", timeout=10).status_code == 200


@pytest.mark.parametrize("protocol", ["httptools", "h11"])
def test_an_upload_without_the_key_gets_its_401_while_still_uploading(protocol):
    """Answered with the upload unread, the connection reset, and httpx's async client lost
    the 401 (an empty ReadError, 5 tries in 5 with a 3-MB body)."""
    app = ApiKeyMiddleware(guarded_app({}, max_body_bytes=1024 * 1024), key="k")
    with uvicorn_on_loopback(app, protocol) as port:
        outcomes = asyncio.run(
            three_uploads(port, {"content-type": "application/json"}, whole_upload)
        )
    assert outcomes == [401] * 3


def test_a_slow_upload_without_the_key_is_refused_before_its_body(guarded):
    status, body, closed = read_answer(open_slow_upload(guarded.url, {}))
    assert status == 401 and closed and body["error"]["type"] == "unauthorized"


def test_the_bentoml_client_sends_the_key_as_token(guarded):
    with bentoml.SyncHTTPClient(guarded.url, token=GUARD_KEY) as client:
        answer = client.classify(images=[IMAGE], labels=["cat", "dog"])
    assert {item["label"] for item in answer["results"][0]} == {"cat", "dog"}
    # Without the token the client cannot even read the service's schema (401, tested above).
    with pytest.raises(bentoml.exceptions.BentoMLException, match="schema"):
        with bentoml.SyncHTTPClient(guarded.url) as client:
            client.classify(images=[IMAGE], labels=["cat", "dog"])
