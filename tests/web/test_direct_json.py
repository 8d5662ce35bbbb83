"""`POST` of `application/json` to the APIs, answered by DirectJsonMiddleware: in process around
a stand-in for BentoML's app, and through a real `bentoml serve` against BentoML's own endpoint
(which still answers `text/json`), on every API."""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Any

import httpx
import pytest
from pydantic import BaseModel, ConfigDict, ValidationError
from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from clip_runner.config import DEFAULT_TOP_K
from clip_runner.errors import RequestError
from clip_runner.web.direct_json import DirectJsonMiddleware, DirectRoute, first_problems, parsed
from clip_runner.web.error_responses import from_validation_detail, validation_problems
from clip_runner.web.jsonlines import InvocationLine
from clip_runner.web.traffic import UTF8_BOM, is_application_json
from tests.helpers import SEED_CLASSES, as_base64, assert_same_answer, photo_like

# ---- in process ----


def test_media_types():
    assert is_application_json("application/json")
    assert is_application_json("Application/JSON; charset=utf-8")
    for other in ("", "text/json", "application/vnd.api+json", "application/jsonlines"):
        assert not is_application_json(other), other


async def bentoml_stand_in(scope: Scope, receive: Receive, send: Send) -> None:
    """What BentoML's app would answer: here a 299, so a test sees who answered."""
    await Response(b"bentoml", status_code=299)(scope, receive, send)


class TextsOnly(BaseModel):
    """A second route's model: what each route's body is validated with is its own."""

    texts: list[str]


async def echo_texts(request: TextsOnly) -> Any:
    return {"texts": request.texts}


def client_around(handler) -> httpx.AsyncClient:
    routes = {
        "/invocations": DirectRoute(InvocationLine, handler),
        "/embed_texts": DirectRoute(TextsOnly, echo_texts),
    }
    app = DirectJsonMiddleware(bentoml_stand_in, routes=routes, service_name="clip_service")
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test")


async def answer_images(request: InvocationLine) -> Any:
    return {"images": request.images, "top_k": request.top_k}


def test_application_json_on_the_route_is_answered_here_the_rest_passes_through():
    asyncio.run(_test_application_json_on_the_route_is_answered_here_the_rest_passes_through())


async def _test_application_json_on_the_route_is_answered_here_the_rest_passes_through():
    async with client_around(answer_images) as client:
        body = {"images": ["a", "b"], "classes": SEED_CLASSES, "top_k": 2}
        here = await client.post("/invocations", json=body)
        assert here.status_code == 200
        assert here.json() == {"images": ["a", "b"], "top_k": 2}
        assert here.headers["server"] == "BentoML Service/clip_service"
        for content_type in ("text/json", ""):
            passed = await client.post(
                "/invocations", content=json.dumps(body), headers={"content-type": content_type}
            )
            assert passed.status_code == 299, content_type
        assert (await client.post("/classify", json=body)).status_code == 299  # not routed
        assert (await client.get("/invocations")).status_code == 299
        texts = await client.post("/embed_texts", json={"texts": ["a", "b"]})
        assert texts.status_code == 200 and texts.json() == {"texts": ["a", "b"]}
        # Each route's own model: /invocations' fields are no /embed_texts body.
        wrong = await client.post("/embed_texts", json=body)
        assert wrong.status_code == 422
        assert wrong.json()["error"]["message"].startswith("texts: ")


def test_bad_bodies_get_the_request_errors_and_an_empty_one_means_no_fields(caplog):
    with caplog.at_level(logging.WARNING, logger="clip_runner.web.direct_json"):
        asyncio.run(_test_bad_bodies_get_the_request_errors_and_an_empty_one_means_no_fields())
    # One warning line per rejected body, as BentoML's endpoint logs them (CallerErrorLogFilter).
    rejections = [r.getMessage() for r in caplog.records if "rejected request" in r.getMessage()]
    assert len(rejections) == 2 and "first at images: " in rejections[1]


async def _test_bad_bodies_get_the_request_errors_and_an_empty_one_means_no_fields():
    async with client_around(answer_images) as client:
        broken = await client.post(
            "/invocations", content=b'{"images": [', headers={"content-type": "application/json"}
        )
        assert broken.status_code == 400
        assert broken.json()["error"]["type"] == "malformed_json"
        wrong = await client.post("/invocations", json={"images": "x", "classes": SEED_CLASSES})
        assert wrong.status_code == 422
        assert wrong.json()["error"]["message"].startswith("images: ")
        empty = await client.post(
            "/invocations", content=b"", headers={"content-type": "application/json"}
        )
        assert empty.status_code == 200
        assert empty.json() == {"images": None, "top_k": DEFAULT_TOP_K}


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")
    labels: list[str]


def test_a_body_of_thousands_of_unknown_fields_names_the_first_and_counts_them(monkeypatch):
    """pydantic builds every error as a Python dict: 400,000 unknown keys held the event loop
    0.7 s doing so. Past MANY_PROBLEMS the body is validated again with its first unknown keys
    only; the answer names the same first problems and counts them all."""
    body = json.dumps({"labels": [1]} | {f"k{i}": i for i in range(500)}).encode()
    problems = first_problems(_raised(body), body, Strict)
    assert problems.total == 501 and len(problems.first) == 11
    assert [p["loc"] for p in problems.first] == [("labels", 0), *[(f"k{i}",) for i in range(10)]]
    with pytest.raises(RequestError) as refused:
        parsed(body, Strict)
    whole = from_validation_detail(validation_problems(_raised(body)).first)[1]["error"]["message"]
    assert refused.value.message == whole  # as if every error had been built
    assert refused.value.message.endswith("; and 491 more problems")
    few = json.dumps({"labels": [1], "k": 1}).encode()
    assert first_problems(_raised(few), few, Strict).total == 2


def _raised(body: bytes) -> ValidationError:
    with pytest.raises(ValidationError) as raised:
        Strict.model_validate_json(body)
    return raised.value


def test_handler_errors_answer_json_and_a_bug_is_a_logged_500(caplog):
    async def overloaded(_: InvocationLine) -> Any:
        raise RequestError(503, "overloaded", "the model's queue is full; retry shortly")

    async def buggy(_: InvocationLine) -> Any:
        raise KeyError("oops")

    async def post_empty(handler) -> httpx.Response:
        async with client_around(handler) as client:
            return await client.post("/invocations", json={})

    answer = asyncio.run(post_empty(overloaded))
    assert answer.status_code == 503 and answer.json()["error"]["type"] == "overloaded"
    with caplog.at_level(logging.ERROR, logger="clip_runner.web.direct_json"):
        answer = asyncio.run(post_empty(buggy))
    assert answer.status_code == 500
    assert answer.json()["error"]["type"] == "internal_error"
    assert "oops" not in answer.text  # no traceback for the caller
    assert any("KeyError" in (record.exc_text or "") for record in caplog.records)


# ---- served: the same answers as BentoML's endpoint ----


def photo(seed: int) -> str:
    return as_base64(photo_like(120, 90, seed=seed), "JPEG")


def post(served, route: str, body: bytes, content_type: str) -> httpx.Response:
    return httpx.post(
        f"{served.url}{route}", content=body, headers={"Content-Type": content_type}, timeout=30
    )


def requests_to_compare() -> list[tuple[str, str, bytes]]:
    """(route, name, body as sent): good and bad bodies for every API, what a caller may get
    wrong."""
    good = {"images": [photo(1), photo(2)], "classes": SEED_CLASSES, "top_k": 3}
    toolkit = {"inputs": photo(3), "parameters": {"candidate_labels": ["a cat", "a dog"]}}
    labels = {"images": [photo(8)], "labels": ["a cat", "a dog"]}
    invocations: list[tuple[str, Any]] = [
        ("the seed's shape", good),
        ("the toolkit's shape", toolkit),
        ("an unknown field too", {**good, "colour": "blue"}),
        ("empty", b""),
        ("broken JSON", b'{"images": ['),
        ("not UTF-8", b'{"images": ["\xff"]}'),
        ("an array", []),
        ("null", None),
        ("images not a list", {"images": "x", "classes": SEED_CLASSES}),
        ("no classes", {"images": [photo(4)]}),
        ("bad base64", {"images": [photo(5), "not base64!"], "classes": SEED_CLASSES}),
        ("top_k zero", {**good, "top_k": 0}),
        ("a bad class entry", {"images": [photo(6)], "classes": [["cat"], ["dog", 1]]}),
        ("a prompt too long", {"images": [photo(7)], "classes": [["word " * 90, 1]]}),
        ("both shapes", {**good, **toolkit}),
    ]
    classify: list[tuple[str, Any]] = [
        ("labels", labels),
        ("templates and top_k", {**labels, "templates": ["a photo of {}", "{}"], "top_k": 1}),
        ("an unknown field too", {**labels, "colour": "blue"}),
        ("empty", b""),
        ("broken JSON", b'{"labels": ['),
        ("no labels", {"images": [photo(9)]}),
        ("no images", {"labels": ["a cat"]}),
        ("a template without {}", {**labels, "templates": ["a photo"]}),
        ("bad base64", {"images": ["not base64!"], "labels": ["a cat"]}),
        ("a label too long", {"images": [photo(10)], "labels": ["word " * 90]}),
        ("a byte order mark", UTF8_BOM + json.dumps(labels).encode()),
        ("two byte order marks", UTF8_BOM * 2 + json.dumps(labels).encode()),
    ]
    embed_images: list[tuple[str, Any]] = [
        ("floats", {"images": [photo(11), photo(12)]}),
        ("base64", {"images": [photo(13)], "encoding_format": "base64"}),
        ("an unknown format", {"images": [photo(14)], "encoding_format": "int8"}),
        ("empty", b""),
        ("an array", []),
        ("images empty", {"images": []}),
        ("bad base64", {"images": [photo(15), "not base64!"]}),
    ]
    embed_texts: list[tuple[str, Any]] = [
        ("floats", {"texts": ["a cat", "a dog"]}),
        ("base64", {"texts": ["a bird"], "encoding_format": "base64"}),
        ("empty", b""),
        ("broken JSON", b'{"texts": '),
        ("texts not a list", {"texts": "a cat"}),
        ("a number among them", {"texts": ["a cat", 3]}),
        ("a text too long", {"texts": ["word " * 90]}),
        ("an unknown field", {"texts": ["a cat"], "encoding": "base64"}),
    ]
    return [
        (route, name, body if isinstance(body, bytes) else json.dumps(body).encode())
        for route, bodies in (
            ("/invocations", invocations),
            ("/classify", classify),
            ("/embed_images", embed_images),
            ("/embed_texts", embed_texts),
        )
        for name, body in bodies
    ]


@pytest.mark.parametrize(
    ("route", "name", "body"), requests_to_compare(), ids=lambda v: str(v)[:24]
)
def test_direct_answers_equal_bentomls(served, route: str, name: str, body: bytes):
    direct = post(served, route, body, "application/json")
    bentoml_endpoint = post(served, route, body, "text/json")
    assert direct.status_code == bentoml_endpoint.status_code, (route, name, direct.text)
    assert direct.headers["content-type"] == bentoml_endpoint.headers["content-type"]
    assert direct.headers["server"] == bentoml_endpoint.headers["server"]
    assert "x-bentoml-request-id" in direct.headers
    if direct.status_code == 200:
        assert_same_answer(direct.json(), bentoml_endpoint.json())
    else:
        assert direct.json() == bentoml_endpoint.json(), (route, name)


def test_every_api_is_answered_directly():
    """The service routes every JSON API here, each validated by the model BentoML's endpoint
    uses for it (so the comparisons above hold by construction, and they check it)."""
    import service

    routes = service.DIRECT_ROUTES
    apis = {api.route: api for api in service.ClipService.apis.values()}
    assert routes.keys() == apis.keys()
    for route, api in apis.items():
        assert routes[route].model is api.input_spec, route
    # And the service runs them through it: unwired, both sides of the comparisons above were
    # BentoML's, and they still passed.
    wired = [kw for cls, kw in service.ClipService.middlewares if cls is DirectJsonMiddleware]
    assert len(wired) == 1 and wired[0]["routes"] is routes
