"""Raw image bodies on /invocations become the toolkit's JSON request; everything else passes.

Unit tests on the ASGI layer with an app that echoes what reached it; tests/test_apis.py drives
the same bodies through a real server to the model's answer.
"""

from __future__ import annotations

import base64
import json

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route
from starlette.testclient import TestClient

from clip_runner.web.raw_images import RawImageBodyMiddleware, toolkit_body

ATTRIBUTES = "X-Amzn-SageMaker-Custom-Attributes"


async def echo(request: Request) -> JSONResponse:
    body = await request.body()
    return JSONResponse(
        {
            "content_type": request.headers.get("content-type"),
            "content_length": request.headers.get("content-length"),
            "length": len(body),
            "body": body.decode("latin-1"),
        }
    )


def client() -> TestClient:
    app = Starlette(routes=[Route("/invocations", echo, methods=["POST"])])
    app.add_route("/other", echo, methods=["POST"])
    return TestClient(RawImageBodyMiddleware(app))


def test_toolkit_body_carries_the_image_labels_and_template():
    body = json.loads(toolkit_body(b"\xff\xd8jpeg", ["cat", "dog"], "art of a {}"))
    assert base64.b64decode(body["inputs"]) == b"\xff\xd8jpeg"
    assert body["parameters"] == {
        "candidate_labels": ["cat", "dog"],
        "hypothesis_template": "art of a {}",
    }
    assert "hypothesis_template" not in json.loads(toolkit_body(b"x", ["a"], None))["parameters"]


def test_an_image_body_reaches_the_app_as_json_with_matching_length():
    image = bytes(range(256)) * 40
    seen = (
        client()
        .post(
            "/invocations",
            content=image,
            headers={"Content-Type": "image/jpeg", ATTRIBUTES: "labels=cat,a%20dog;template=a {}"},
        )
        .json()
    )
    assert seen["content_type"] == "application/json"
    assert int(seen["content_length"]) == seen["length"]
    request = json.loads(seen["body"])
    assert base64.b64decode(request["inputs"]) == image
    assert request["parameters"]["candidate_labels"] == ["cat", "a dog"]
    assert request["parameters"]["hypothesis_template"] == "a {}"


def test_json_bodies_and_other_paths_pass_untouched():
    raw = client()
    sent = json.dumps({"images": ["x"], "classes": [["a", 0]]})
    seen = raw.post("/invocations", content=sent, headers={"Content-Type": "application/json"})
    assert seen.json()["body"] == sent
    other = raw.post(
        "/other",
        content=b"\xff\xd8",
        headers={"Content-Type": "image/jpeg", ATTRIBUTES: "labels=a"},
    )
    assert other.json()["body"] == "\xff\xd8" and other.json()["content_type"] == "image/jpeg"


def test_missing_labels_or_an_empty_image_are_json_400s_naming_the_fault():
    raw = client()
    unlabelled = raw.post(
        "/invocations", content=b"\xff\xd8", headers={"Content-Type": "image/png"}
    )
    assert unlabelled.status_code == 400
    assert unlabelled.json()["error"]["type"] == "missing_labels"
    assert ATTRIBUTES in unlabelled.json()["error"]["message"]
    empty = raw.post(
        "/invocations", content=b"", headers={"Content-Type": "image/webp", ATTRIBUTES: "labels=a"}
    )
    assert empty.status_code == 400
    assert empty.json()["error"] == {
        "type": "invalid_image",
        "message": "the image/webp body is empty",
        "index": 0,  # as every other error about the image has it
    }


def test_an_error_names_the_body_by_its_media_type_alone_and_quoted():
    """The empty and oversized bodies' messages had repeated the Content-Type whole, its
    parameters and all: 20 kB of answer for a 20-kB header (the 415's quotes it in 200)."""
    raw = TestClient(RawImageBodyMiddleware(Starlette(), max_image_bytes=10))
    long_type = "image/" + "j" * 20_000
    for content_type, content, name in [
        ("image/jpeg; x=" + "a" * 20_000, b"", "the image/jpeg body"),
        ("image/png; x=" + "a" * 20_000, b"x" * 11, "the image/png body"),
        (long_type, b"", f"the {long_type[:200]}... (20006 characters) body"),
    ]:
        headers = {"Content-Type": content_type, ATTRIBUTES: "labels=a"}
        refused = raw.post("/invocations", content=content, headers=headers)
        assert refused.json()["error"]["message"].startswith(name), content_type[:20]
        assert len(refused.content) < 1000


def test_an_image_over_the_limit_is_refused_before_it_is_rewritten(monkeypatch):
    """On an async endpoint (1 GiB bodies) a 256-MiB image was base64'd and dumped as JSON on the
    event loop before the image limit refused it: /ping waited 9-12 s."""
    rewritten: list[int] = []
    monkeypatch.setattr(
        "clip_runner.web.raw_images.toolkit_body",
        lambda image, *args: rewritten.append(len(image)) or b"{}",
    )
    app = Starlette(routes=[Route("/invocations", echo, methods=["POST"])])
    raw = TestClient(RawImageBodyMiddleware(app, max_image_bytes=1000))
    headers = {"Content-Type": "image/jpeg", ATTRIBUTES: "labels=a"}
    refused = raw.post("/invocations", content=b"x" * 1001, headers=headers)
    assert refused.status_code == 422 and rewritten == []
    assert refused.json()["error"] == {
        "type": "invalid_image",
        "message": "the image/jpeg body: image is larger than the 1000-byte limit",
        "index": 0,  # as the same image sent in JSON has it
    }
    assert raw.post("/invocations", content=b"x" * 1000, headers=headers).status_code == 200


def test_the_attributes_header_sent_twice_is_refused():
    """The last header line had been read and the others dropped: labels sent in the first line
    were 'missing', or another line's labels classified against."""
    headers = [
        ("Content-Type", "image/jpeg"),
        (ATTRIBUTES, "labels=cat,dog"),
        (ATTRIBUTES, "template=a photo of {}"),
    ]
    refused = client().post("/invocations", content=b"\xff\xd8", headers=headers)
    assert refused.status_code == 400
    assert refused.json()["error"]["message"] == f"{ATTRIBUTES} is sent twice"
