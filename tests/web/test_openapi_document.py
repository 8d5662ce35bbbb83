"""/docs.json: the OpenAPI 3.0 dialect, then the real server's document checked against its real
answers (each status an answer has is declared, and each body fits the schema declared for it)
and its examples sent back to it."""

from __future__ import annotations

import json
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest
from openapi_schema_validator import OAS30Validator
from openapi_spec_validator import OpenAPIV30SpecValidator

from clip_runner.web.openapi_document import as_openapi_30
from tests.helpers import GUARD_AUTH, as_base64, encode, photo_like

IMAGE = as_base64(photo_like(40, 30, seed=3))
SEED = {"images": [IMAGE], "classes": [["cat", 1], ["dog", 0]]}


def test_pydantics_json_schema_is_put_in_openapi_30s_dialect():
    assert as_openapi_30({"anyOf": [{"type": "integer", "minimum": 1}, {"type": "null"}]}) == {
        "type": "integer",
        "minimum": 1,
        "nullable": True,
    }
    either = as_openapi_30({"anyOf": [{"type": "string"}, {"type": "array"}, {"type": "null"}]})
    assert either == {"anyOf": [{"type": "string"}, {"type": "array"}], "nullable": True}
    pair = {"type": "array", "prefixItems": [{"type": "string"}, {"type": "integer"}]}
    assert as_openapi_30(pair)["items"] == {"anyOf": [{"type": "string"}, {"type": "integer"}]}
    assert as_openapi_30({"type": "array", "examples": [[1], [2]]})["example"] == [1]
    referred = as_openapi_30({"$ref": "#/components/schemas/X", "default": None})
    assert referred == {
        "allOf": [{"$ref": "#/components/schemas/X"}],
        "default": None,
        "nullable": True,
    }


def thirty_one_keywords(node: Any) -> set[str]:
    """The OpenAPI 3.1 (JSON Schema 2020-12) keywords a 3.0 document must not hold."""
    found: set[str] = set()
    if isinstance(node, list):
        for item in node:
            found |= thirty_one_keywords(item)
    elif isinstance(node, dict):
        found |= {"prefixItems", "$defs", "const"} & node.keys()
        if node.get("type") == "null" or isinstance(node.get("type"), list):
            found.add("type null")
        if isinstance(node.get("examples"), list):
            found.add("examples")
        for value in node.values():
            found |= thirty_one_keywords(value)
    return found


@pytest.fixture(scope="module")
def document(served) -> dict[str, Any]:
    return httpx.get(f"{served.url}/docs.json", timeout=10).json()


def test_the_document_is_valid_openapi_30(document):
    """It said 3.0.2 and wrote 3.1's schemas: Swagger UI showed none of the examples."""
    OpenAPIV30SpecValidator(document).validate()
    assert thirty_one_keywords(document) == set()
    assert document["info"]["title"] == "CLIP zero-shot image classification"
    assert "shields.io" not in json.dumps(document)  # BentoML's badges, loaded from elsewhere
    for path in ("/invocations", "/classify", "/embed_images", "/embed_texts", "/ping"):
        assert path in document["paths"], sorted(document["paths"])
    assert "/execution-parameters" in document["paths"] and "/readyz" in document["paths"]


def resolved(node: Any, document: dict[str, Any]) -> Any:
    """`node` with every `$ref` into the document's components replaced by what it names."""
    if isinstance(node, list):
        return [resolved(item, document) for item in node]
    if not isinstance(node, dict):
        return node
    if "$ref" in node:
        name = node["$ref"].removeprefix("#/components/schemas/")
        return resolved(document["components"]["schemas"][name], document)
    return {key: resolved(value, document) for key, value in node.items()}


def assert_declared(document: dict[str, Any], method: str, path: str, response: httpx.Response):
    """The answer's status is declared for the route, and its JSON body fits the schema."""
    responses = document["paths"][path][method.lower()]["responses"]
    status = str(response.status_code)
    assert status in responses, (path, status, sorted(responses))
    content = responses[status].get("content", {})
    if response.status_code == 200 and not response.content:
        return  # /ping's empty body
    schema = resolved(content["application/json"]["schema"], document)
    OAS30Validator(schema).validate(response.json())


JPEG = encode(photo_like(40, 30, seed=4), "JPEG")
EXCHANGES = [
    ("POST", "/invocations", {"json": SEED}),
    (
        "POST",
        "/invocations",
        {"json": {"inputs": IMAGE, "parameters": {"candidate_labels": "a,b"}}},
    ),
    (
        "POST",
        "/invocations",
        {"json": {"inputs": [IMAGE], "parameters": {"candidate_labels": "a"}}},
    ),
    (
        "POST",
        "/invocations",
        {
            "content": JPEG,
            "headers": {
                "Content-Type": "image/jpeg",
                "X-Amzn-SageMaker-Custom-Attributes": "labels=cat,dog",
            },
        },
    ),
    ("POST", "/invocations", {"content": JPEG, "headers": {"Content-Type": "image/jpeg"}}),
    ("POST", "/invocations", {"json": {**SEED, "images": ["not an image"]}}),
    ("POST", "/invocations", {"content": b"{", "headers": {"Content-Type": "application/json"}}),
    ("POST", "/invocations", {"content": b"x", "headers": {"Content-Type": "text/plain"}}),
    ("POST", "/invocations", {"json": SEED, "headers": {"Accept": "text/csv"}}),
    ("POST", "/classify", {"json": {"images": [IMAGE], "labels": ["cat", "dog"], "top_k": 1}}),
    ("POST", "/classify", {"json": {"images": [IMAGE], "labels": []}}),
    ("POST", "/classify", {"json": {}, "headers": {"X-Big": "a" * 70_000}}),
    ("POST", "/embed_images", {"json": {"images": [IMAGE], "encoding_format": "base64"}}),
    ("POST", "/embed_texts", {"json": {"texts": ["a cat"]}}),
    ("GET", "/ping", {}),
    ("GET", "/readyz", {}),
    ("GET", "/execution-parameters", {}),
]


def test_every_answer_is_declared_and_fits_its_schema(served, document):
    """The errors had been declared as BentoML's `{"error": string}` under 400/404/500, the
    toolkit's answers not at all: a generated client failed on every one of them."""
    statuses = set()
    for method, path, arguments in EXCHANGES:
        response = httpx.request(method, f"{served.url}{path}", timeout=30, **arguments)
        statuses.add(response.status_code)
        assert_declared(document, method, path, response)
    assert statuses == {200, 400, 406, 415, 422, 431}


def test_swagger_uis_examples_are_requests_the_server_answers(served, document):
    """Swagger UI's "Try it out" had sent `"string"` in every field, or for /invocations a
    toolkit request beside the original's fields: refused. The examples' image URL is swapped
    for an inline image (only loopback is reached here)."""
    for path in ("/invocations", "/classify", "/embed_images", "/embed_texts"):
        body = document["paths"][path]["post"]["requestBody"]["content"]["application/json"]
        example = body["example"]
        if "images" in example:
            assert example["images"][0].startswith("https://")
            example["images"] = [IMAGE]
        response = httpx.post(f"{served.url}{path}", json=example, timeout=30)
        assert response.status_code == 200, (path, example, response.text)


def test_the_invocations_route_declares_its_other_bodies_and_answers(document):
    operation = document["paths"]["/invocations"]["post"]
    assert {"application/json", "image/*", "application/x-image", "application/jsonlines"} <= set(
        operation["requestBody"]["content"]
    )
    assert operation["parameters"][0]["name"] == "X-Amzn-SageMaker-Custom-Attributes"
    inputs = operation["requestBody"]["content"]["application/json"]["schema"]["properties"]
    assert {"type": "array", "items": {"type": "string"}} in inputs["inputs"]["anyOf"]
    lines = operation["responses"]["200"]["content"]["application/jsonlines"]["schema"]
    assert "answer" in lines["description"]  # not the request's "one JSON request per line"
    assert "bearer" not in json.dumps(document.get("components", {}))  # no key on this server


def test_with_an_api_key_the_document_is_open_and_declares_the_bearer_scheme(guarded):
    """The document and Swagger UI had answered 401 to a browser, which cannot send the key;
    now Swagger UI's Authorize button takes it, as the document declares."""
    document = httpx.get(f"{guarded.url}/docs.json", timeout=10).json()
    OpenAPIV30SpecValidator(document).validate()
    assert document["components"]["securitySchemes"] == {
        "bearer": {"type": "http", "scheme": "bearer"}
    }
    operation = document["paths"]["/classify"]["post"]
    assert operation["security"] == [{"bearer": []}] and "401" in operation["responses"]
    refused = httpx.post(f"{guarded.url}/classify", json={}, timeout=10)
    assert_declared(document, "POST", "/classify", refused)
    body = {"images": [IMAGE], "labels": ["cat"]}
    keyed = httpx.post(f"{guarded.url}/classify", json=body, headers=GUARD_AUTH, timeout=30)
    assert_declared(document, "POST", "/classify", keyed)


def test_swagger_ui_renders_the_document_and_reaches_nothing_else(browser, served):
    """BentoML's page loaded Google Tag Manager, and Swagger UI's default sends the document's
    address to swagger.io for a validator badge. The page, under its Content-Security-Policy,
    shows every route and the seed's example, and asks nothing of any other host."""
    context = browser.new_context()
    outside: list[str] = []
    blocked: list[str] = []

    def only_loopback(route) -> None:
        if urlsplit(route.request.url).hostname == "127.0.0.1" or route.request.url.startswith(
            "data:"
        ):
            route.continue_()
        else:
            outside.append(route.request.url)
            route.abort()

    context.route("**/*", only_loopback)
    page = context.new_page()
    page.on("console", lambda m: blocked.append(m.text) if "Security Policy" in m.text else None)
    response = page.goto(f"{served.url}/")
    assert response is not None and response.status == 200
    policy = response.headers["content-security-policy"]
    assert "default-src 'none'" in policy and "img-src 'self' data:;" in policy
    routes = {
        "POST": ["/invocations", "/classify", "/embed_images", "/embed_texts"],
        "GET": ["/ping"],
    }
    for method, paths in routes.items():
        for path in paths:
            operation = page.get_by_role("button", name=f"{method} {path}", exact=True)
            operation.wait_for(timeout=30_000)
    page.get_by_role("button", name="POST /invocations", exact=True).click()
    page.get_by_text('"person with a bag"').first.wait_for(timeout=30_000)  # the seed example
    context.close()
    assert outside == [] and blocked == []
