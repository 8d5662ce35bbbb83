"""Attacks on a real `bentoml serve`: bad bodies, bad images, SSRF, oversize, wrong types.

Every answer must be a JSON 4xx in the project's error shape, never a 5xx, and the server must
keep answering good requests afterwards.
"""

from __future__ import annotations

import base64
import gzip
import io
import json
import time

import httpx
import numpy as np
import pytest
from PIL import Image

from tests.helpers import ConnectionCounter, as_base64, encode, photo_like, raw_exchange

GOOD_IMAGE = as_base64(photo_like(48, 32, seed=1))
CLASSES = [["cat", 1], ["dog", 0]]


def post_raw(
    served,
    content: bytes,
    content_type: str | None = "application/json",
    headers: dict[str, str] | None = None,
    **kw,
):
    headers = {**({"Content-Type": content_type} if content_type else {}), **(headers or {})}
    return httpx.post(
        f"{served.url}/invocations", content=content, headers=headers, timeout=30, **kw
    )


def post(served, body) -> httpx.Response:
    return post_raw(served, json.dumps(body).encode())


def assert_json_error(response: httpx.Response, status: int | None = None) -> dict:
    assert response.status_code < 500, response.text
    assert response.status_code >= 400, response.text
    if status is not None:
        assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    error = response.json()["error"]
    assert isinstance(error["type"], str) and isinstance(error["message"], str)
    assert set(error) <= {"type", "message", "index"}
    return error


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def sixteen_bit_png() -> bytes:
    return encode(Image.fromarray(np.full((30, 30), 50_000, dtype=np.uint16)))


def animated_gif() -> bytes:
    buffer = io.BytesIO()
    frames = [Image.new("RGB", (16, 16), c) for c in [(255, 0, 0), (0, 255, 0)]]
    frames[0].save(buffer, "GIF", save_all=True, append_images=frames[1:], loop=0)
    return buffer.getvalue()


ACCEPTED_ODD_IMAGES = {
    "1x1": encode(Image.new("RGB", (1, 1), (1, 2, 3))),
    "16-bit png": sixteen_bit_png(),
    "cmyk jpeg": encode(Image.new("CMYK", (20, 20), (0, 255, 255, 0)), "JPEG"),
    "animated gif": animated_gif(),
    "animated webp": encode(Image.new("RGB", (16, 16), (0, 0, 255)), "WEBP"),
    "rgba png": encode(Image.new("RGBA", (20, 20), (9, 9, 9, 0))),
    "panorama 4000x10": encode(photo_like(4000, 10, seed=2)),
    "strip 3x2000": encode(photo_like(3, 2000, seed=3)),
    "greyscale": encode(Image.new("L", (20, 20), 100)),
}


@pytest.mark.parametrize("name", sorted(ACCEPTED_ODD_IMAGES))
def test_odd_but_valid_images_are_classified(served, name):
    response = post(served, {"images": [b64(ACCEPTED_ODD_IMAGES[name])], "classes": CLASSES})
    assert response.status_code == 200, response.text
    assert len(response.json()[0]["prompts"][0]) == 2


REFUSED_IMAGES = {
    "empty": "",
    "zero bytes as data uri": "data:image/png;base64,",
    "svg": b64(b'<svg xmlns="http://www.w3.org/2000/svg" width="9" height="9"/>'),
    "html": b64(b"<!doctype html><title>x</title>"),
    "text": b64(b"just some text, honest"),
    "truncated jpeg": b64(encode(photo_like(200, 200, seed=4), "JPEG")[:700]),
    "pixel bomb": b64(encode(Image.new("1", (12_000, 12_000)))),
    "bad base64": "!!!!",
    "html data uri": "data:text/html;base64," + b64(b"<b>x</b>"),
    "file url": "file:///etc/passwd",
    "gopher url": "gopher://127.0.0.1:70/_stats",
    "ftp url": "ftp://127.0.0.1/cat.png",
    "javascript": "javascript:alert(1)",
    # URLs httpx or IDNA cannot take (each was a 500 once), and a scheme a megabyte long
    "url too long": "http://a" * 10_000,
    "url with a NUL": "http://a\x00b/cat.png",
    "url with a bad IDNA name": "http://xn--/cat.png",
    "url with an empty label": "http://a..b/cat.png",
    "megabyte scheme": "a" * 1_000_000 + ":x",
}


@pytest.mark.parametrize("name", sorted(REFUSED_IMAGES))
def test_bad_images_are_refused_naming_the_index(served, name):
    response = post(served, {"images": [GOOD_IMAGE, REFUSED_IMAGES[name]], "classes": CLASSES})
    error = assert_json_error(response, 422)
    assert error["index"] == 1 and error["message"].startswith("images[1]")
    assert len(error["message"]) < 600  # a long source is quoted by its start


def seed_body(**fields) -> bytes:
    """The seed's request with valid images and classes, but for `fields`."""
    return json.dumps({"images": [GOOD_IMAGE], "classes": CLASSES, **fields}).encode()


# Each bad in one way only, the rest valid: a refusal for another reason (an image "x" that does
# not decode) had let a case pass with its own check gone (the list limits were removed once and
# every case still passed). Each: (body, status, a fragment of the message naming what is wrong).
BAD_BODIES = {
    "deeply nested": (b'{"images": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", 400, "recursion"),
    "non-utf8": (b'{"images": ["\xff\xfe\xfa"], "classes": [["cat", 1]]}', 400, "invalid unicode"),
    "null": (b"null", 400, "object"),
    "string": (b'"images"', 400, "object"),
    "number": (b"12", 400, "object"),
    "empty": (b"", 422, "images"),
    "trailing garbage": (seed_body() + b" extra", 400, "column"),
    "images is a string": (seed_body(images=GOOD_IMAGE), 422, "images"),
    "classes is an object": (seed_body(classes={"a": 1}), 422, "classes"),
    "flag is null": (seed_body(classes=[["a", None]]), 422, "classes[0]"),
    "name is a number": (seed_body(classes=[[3, 1]]), 422, "classes[0]"),
    "top_k is fractional": (seed_body(top_k=1.5), 422, "top_k"),
    "template is a list": (seed_body(template=["{name}"]), 422, "template"),
    "33 images": (seed_body(images=[GOOD_IMAGE] * 33), 422, "at most 32"),
    "1001 classes": (seed_body(classes=[[f"c{i}", 0] for i in range(1001)]), 422, "at most 1000"),
    "class name of 301 characters": (seed_body(classes=[["n" * 301, 1]]), 422, "at most 300"),
    "prompt over 77 tokens": (seed_body(classes=[["word " * 50, 1]]), 422, "77"),
}


@pytest.mark.parametrize("name", sorted(BAD_BODIES))
def test_bad_bodies_get_a_json_4xx_naming_the_fault(served, name):
    body, status, fragment = BAD_BODIES[name]
    error = assert_json_error(post_raw(served, body), status)
    assert fragment in error["message"], error["message"]


@pytest.mark.parametrize(
    "content_type",
    [
        "text/plain",
        "multipart/form-data; boundary=x",
        "application/x-www-form-urlencoded",
        "video/mp4",  # raw image/* bodies are accepted (tests/test_apis.py)
        "application/xml",
    ],
)
def test_wrong_content_types_are_415(served, content_type):
    body = json.dumps({"images": [GOOD_IMAGE], "classes": CLASSES}).encode()
    error = assert_json_error(post_raw(served, body, content_type), 415)
    assert "application/json" in error["message"]


@pytest.mark.parametrize(
    ("route", "first"),
    [
        ("/classify", "multipart/form-data; boundary=x"),
        ("/embed_texts", "multipart/form-data"),
        ("/invocations", "image/png"),
    ],
)
def test_two_content_types_are_a_json_400_not_a_500(served, route, first):
    """Each layer once read its own one of them: a JSON body reached BentoML's form parser."""
    body = {
        "/classify": {"images": [GOOD_IMAGE], "labels": ["a cat"]},
        "/embed_texts": {"texts": ["a cat"]},
        "/invocations": {"images": [GOOD_IMAGE], "classes": CLASSES},
    }[route]
    response = httpx.post(
        f"{served.url}{route}",
        content=json.dumps(body).encode(),
        headers=[("content-type", first), ("content-type", "application/json")],
        timeout=30,
    )
    error = assert_json_error(response, 400)
    assert error["message"] == "the request has 2 Content-Type headers; send one"
    assert httpx.get(f"{served.url}/ping", timeout=10).status_code == 200


@pytest.mark.parametrize(
    ("route", "accept", "status"),
    [
        ("/invocations", "text/csv", 406),  # the SageMaker SDK's CSVDeserializer
        ("/invocations", "application/x-npy", 406),  # ... and its NumpyDeserializer
        ("/classify", "application/jsonlines", 406),
        ("/embed_texts", "application/json;q=0, text/html", 406),
        ("/invocations", "application/jsonlines", 200),  # JSON Lines are answered there
        ("/classify", "text/csv, application/json", 200),  # the PandasDeserializer's
        ("/embed_texts", "text/html,application/xhtml+xml,*/*;q=0.8", 200),  # a browser's
    ],
)
def test_an_accept_no_answer_can_meet_is_a_json_406(served, route, accept, status):
    body = {
        "/classify": {"images": [GOOD_IMAGE], "labels": ["a cat"]},
        "/embed_texts": {"texts": ["a cat"]},
        "/invocations": {"images": [GOOD_IMAGE], "classes": CLASSES},
    }[route]
    response = httpx.post(f"{served.url}{route}", json=body, headers={"accept": accept}, timeout=30)
    if status == 200:
        assert response.status_code == 200, response.text
        assert response.headers["content-type"] == "application/json"
        return
    error = assert_json_error(response, 406)
    assert error["type"] == "not_acceptable"
    assert error["message"].startswith(f"Accept {accept!r} allows none of the types")
    assert httpx.get(f"{served.url}/ping", timeout=10).status_code == 200


def test_a_request_the_http_parser_refuses_is_a_json_400(served):
    """Answered by uvicorn before any middleware (Content-Length beside Transfer-Encoding, a
    request-smuggling shape): in the JSON shape too (error_responses.py)."""
    port = int(served.url.rsplit(":", 1)[1])
    request = (
        b"POST /invocations HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"Transfer-Encoding: chunked\r\nContent-Length: 2\r\n\r\n{}"
    )
    head, _, body = raw_exchange(port, request).partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 400 ") and b"content-type: application/json" in head
    assert json.loads(body)["error"]["type"] == "bad_request"


def test_a_gzipped_body_is_415_not_malformed_json(served):
    body = gzip.compress(json.dumps({"images": [GOOD_IMAGE], "classes": CLASSES}).encode())
    response = post_raw(served, body, headers={"Content-Encoding": "gzip"})
    error = assert_json_error(response, 415)
    assert "Content-Encoding 'gzip'" in error["message"]
    assert response.headers["accept-encoding"] == "identity"


@pytest.mark.parametrize("content_type", [None, "application/json; charset=utf-8", "text/json"])
def test_json_content_types_and_none_are_accepted(served, content_type):
    body = json.dumps({"images": [GOOD_IMAGE], "classes": CLASSES}).encode()
    assert post_raw(served, body, content_type).status_code == 200


def test_oversize_bodies_are_413_declared_or_streamed(served):
    big = json.dumps({"images": ["A" * (7 * 1024 * 1024)], "classes": CLASSES}).encode()
    assert "6291456-byte" in assert_json_error(post_raw(served, big), 413)["message"]

    def chunks():
        for start in range(0, len(big), 256 * 1024):
            yield big[start : start + 256 * 1024]

    streamed = httpx.post(
        f"{served.url}/invocations",
        content=chunks(),
        headers={"Content-Type": "application/json"},
        timeout=30,
    )
    assert_json_error(streamed, 413)


def test_ssrf_through_the_service_never_connects(served, image_server):
    v4, v6 = ConnectionCounter("127.0.0.1"), ConnectionCounter("::1")
    try:
        targets = [
            f"http://127.0.0.1:{v4.port}/admin",
            f"http://localhost:{v4.port}/admin",
            f"http://[::1]:{v6.port}/admin",
            f"{image_server}/redirect?to=http://127.0.0.1:{v4.port}/admin",
        ]
        for target in targets:
            response = post(served, {"images": [GOOD_IMAGE, target], "classes": CLASSES})
            error = assert_json_error(response, 422)
            assert error["type"] == "forbidden_url" and error["index"] == 1, error
        time.sleep(0.3)
        assert (v4.accepted, v6.accepted) == (0, 0)
    finally:
        v4.close()
        v6.close()


def test_unicode_names_and_large_top_k_are_fine(served):
    classes = [["čerešňa 🍒", 1], ["مرحبا", 0], ["猫", 0]]
    response = post(served, {"images": [GOOD_IMAGE], "classes": classes, "top_k": 10**9})
    assert response.status_code == 200, response.text
    assert sorted(response.json()[0]["prompts"][1]) == sorted(name for name, _ in classes)


def test_still_serving_after_the_attacks(served):
    response = post(served, {"images": [GOOD_IMAGE], "classes": CLASSES})
    assert response.status_code == 200
    assert httpx.get(f"{served.url}/ping", timeout=5).status_code == 200
