"""Batch Transform's JSON Lines on /invocations and GET /execution-parameters, and s3:// images
through a real `bentoml serve` (reading moto's S3 on 127.0.0.1)."""

from __future__ import annotations

import asyncio
import dataclasses
import json
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from clip_runner.config import get_settings
from clip_runner.errors import RequestError
from clip_runner.metrics import SERVICE_ERRORS
from clip_runner.web.jsonlines import (
    InvocationLine,
    LineAnswerer,
    encode_lines,
    execution_parameters,
    is_jsonlines_media_type,
    is_lines_of_json,
    line_count,
    parse_line,
    records,
)
from clip_runner.web.traffic import UTF8_BOM
from tests.helpers import (
    S3_PRIVATE_BUCKET,
    SEED_CLASSES,
    ServedBento,
    as_base64,
    assert_same_answer,
    encode,
    photo_like,
    serve_tiny,
)
from tests.reference import assert_matches_reference, reference_probabilities
from tests.test_service import SEED_NAMES, SEED_PROMPTS, histogram, post

JSONLINES = "application/jsonlines"


# ---- pure parts ----


def test_media_types():
    for ok in (
        "application/jsonlines",
        "Application/JSONLines; charset=utf-8",
        "application/jsonl",
        "application/x-ndjson",  # NDJSON: the same format (it had been a 415)
        "application/ndjson",
    ):
        assert is_jsonlines_media_type(ok)
    for other in ("application/json", "text/plain", ""):
        assert not is_jsonlines_media_type(other)


@pytest.mark.parametrize(
    ("body", "lines"),
    [
        (b'{"a":1}\r\n\n{"b":2}\n\n', [b'{"a":1}', b"", b'{"b":2}']),
        (b"\n{}", [b"", b"{}"]),  # a blank line before a record is one, answered
        (b"{} \n \n{}\r\n", [b"{} ", b" ", b"{}"]),
        (b"{}", [b"{}"]),
        (b"", []),
        (b"\n \r\n\t", []),
    ],
)
def test_records_keep_positions_and_drop_only_the_blank_end(body, lines):
    assert list(records(body)) == lines
    assert line_count(body) == len(lines)


def answer_lines(body: bytes, handle, max_in_flight: int, max_lines: int = 1000) -> list[Any]:
    lines = asyncio.run(LineAnswerer(handle, max_in_flight, max_lines).answer(body))
    return [json.loads(line) for line in lines]


@pytest.mark.parametrize(
    ("line", "status", "error_type", "words"),
    [
        (b"", 400, "malformed_json", "the line is empty"),
        (b"{nope", 400, "malformed_json", "not valid JSON"),
        (b"[1, 2]", 400, "malformed_json", "must be a JSON object"),
        (b'{"images": [], "classes": [["a", 1]]}', 422, "invalid_request", "images:"),
        (b'{"images": ["x"], "classes": [["a", 7]]}', 422, "invalid_request", "classes[0][1]"),
    ],
)
def test_bad_lines_get_the_usual_errors(line, status, error_type, words):
    with pytest.raises(RequestError) as error:
        parse_line(line)
    assert (error.value.status, error.value.error_type) == (status, error_type)
    assert words in error.value.message


def test_a_line_may_start_with_a_byte_order_mark_as_each_windows_file_does():
    line = b'{"images": ["x"], "classes": [["a", 1]]}'
    assert parse_line(UTF8_BOM + line) == parse_line(line)
    with pytest.raises(RequestError, match="not valid JSON"):
        parse_line(line + UTF8_BOM)  # only at the start


def test_answers_are_in_order_and_bad_lines_do_not_stop_the_others():
    async def handle(line: InvocationLine) -> Any:
        await asyncio.sleep(0.01 * (3 - len(line.images or [])))  # later lines finish first
        if line.images == ["boom"]:
            raise RequestError(422, "invalid_image", "images[0]: boom", 0)
        return {"n": len(line.images or [])}

    lines = [
        {"images": ["a"], "classes": [["x", 1]]},
        "not json",
        {"images": ["boom"], "classes": [["x", 1]]},
        {"images": ["a", "b", "c"], "classes": [["x", 1]]},
    ]
    body = "\n".join(line if isinstance(line, str) else json.dumps(line) for line in lines)
    answers = answer_lines(body.encode(), handle, max_in_flight=2)
    assert answers[0] == {"n": 1} and answers[3] == {"n": 3}
    assert answers[1]["error"]["type"] == "malformed_json"
    assert answers[1]["error"]["message"].startswith("line 2: ")
    assert answers[2] == {
        "error": {"type": "invalid_image", "message": "line 3: images[0]: boom", "index": 0}
    }
    assert encode_lines([b"{}"] * 4) == b"{}\n{}\n{}\n{}"
    with pytest.raises(RequestError, match="no lines"):
        answer_lines(b"\n", handle, 2)


def test_a_server_failure_fails_the_whole_mini_batch_for_sagemaker_to_retry():
    cancelled = []

    async def handle(line: InvocationLine) -> Any:
        if line.images == ["down"]:
            raise RequestError(503, "runner_unavailable", "the model runner is not answering")
        try:
            await asyncio.sleep(5)
        except asyncio.CancelledError:
            cancelled.append(line.images)
            raise

    body = b'{"images": ["slow"]}\n{"images": ["down"]}\n{nope'
    with pytest.raises(RequestError) as error:
        answer_lines(body, handle, max_in_flight=4)
    assert (error.value.status, error.value.error_type) == (503, "runner_unavailable")
    assert error.value.message == "line 2: the model runner is not answering"  # which line met it
    assert cancelled == [["slow"]]  # the other lines stop at once


def errors_counted(error_type: str) -> float:
    return SERVICE_ERRORS.labels(error_type)._value.get()


def test_failed_lines_are_counted_once_their_answer_is_ready_and_only_then():
    """A mini-batch answered 503 (or cut off by its deadline, or by its client leaving) had its
    bad lines counted as errors though no line was ever sent."""

    async def handle(line: InvocationLine) -> Any:
        if line.images == ["down"]:
            await asyncio.sleep(0.05)  # after the bad lines were answered
            raise RequestError(503, "runner_unavailable", "the model runner is not answering")
        raise RequestError(422, "invalid_image", "images[0]: bad", 0)

    before = errors_counted("invalid_image")
    with pytest.raises(RequestError):
        answer_lines(b'{"images": ["down"]}\n{"images": ["x"]}\n{"images": ["y"]}', handle, 4)
    assert errors_counted("invalid_image") == before
    answer_lines(b'{"images": ["x"]}\n{"images": ["y"]}', handle, 4)
    assert errors_counted("invalid_image") == before + 2


def test_a_bug_in_a_line_fails_the_mini_batch_at_once_as_a_500(caplog):
    """Not an exception out of the middleware: BentoML's timeout layer answered nothing to one
    until its timer (70 s real-time, an hour in batch), past SageMaker's invocation timeout."""

    async def handle(line: InvocationLine) -> Any:
        if line.images == ["bug"]:
            raise AttributeError("'str' object has no attribute 'x'")
        await asyncio.sleep(5)

    body = b'{"images": ["slow"]}\n{"images": ["bug"]}'
    with pytest.raises(RequestError) as error:
        answer_lines(body, handle, max_in_flight=4)
    assert (error.value.status, error.value.error_type) == (500, "internal_error")
    assert "unexpected error answering line 2" in caplog.text


def test_a_template_str_format_would_evaluate_is_that_lines_422(served):
    """`{0.x}` raised AttributeError in the template's reading: a 500 alone, and in JSON Lines
    a mini-batch left without an answer."""
    picture = as_base64(photo_like(64, 48, seed=5))
    lines = [
        {"inputs": picture, "parameters": {"candidate_labels": ["a"], "hypothesis_template": t}}
        for t in ("{0.x}", "a photo of {0}")
    ]
    response = post_lines(served, "\n".join(json.dumps(line) for line in lines).encode())
    assert response.status_code == 200, response.text
    bad, good = (json.loads(line) for line in response.text.split("\n"))
    assert bad["error"]["type"] == "invalid_request"
    assert bad["error"]["message"].startswith("line 1: parameters.hypothesis_template: ")
    assert good[0]["label"] == "a"


def test_lines_past_the_limit_are_refused_whole_before_any_is_answered():
    answered = []

    async def handle(line: InvocationLine) -> Any:
        answered.append(line)
        return {}

    with pytest.raises(RequestError) as refused:
        answer_lines(b"{}\n" * 11, handle, max_in_flight=4, max_lines=10)
    assert (refused.value.status, refused.value.error_type) == (413, "too_many_lines")
    assert refused.value.message.startswith("the body has 11 lines, more than the 10 answered")
    assert "CLIP_MAX_LINES" in refused.value.message and answered == []
    assert len(answer_lines(b"{}\n" * 10 + b"\n\n", handle, 4, max_lines=10)) == 10


def test_the_lines_of_all_bodies_share_the_workers_slots():
    """Two bodies of eight lines each at once, four slots: never more than four lines in the
    handler (each body's own four would have let eight in)."""
    in_handler, peak = 0, 0

    async def handle(line: InvocationLine) -> Any:
        nonlocal in_handler, peak
        in_handler += 1
        peak = max(peak, in_handler)
        await asyncio.sleep(0.01)
        in_handler -= 1
        return {"ok": True}

    async def two_bodies() -> list[list[bytes]]:
        lines = LineAnswerer(handle, max_in_flight=4, max_lines=100)
        body = b'{"images": ["x"]}\n' * 8
        return list(await asyncio.gather(lines.answer(body), lines.answer(body)))

    answers = asyncio.run(two_bodies())
    assert peak == 4
    assert [len(body) for body in answers] == [8, 8]


def test_a_body_of_blank_lines_is_answered_without_stopping_the_event_loop():
    """Every blank line is an error answered without an await; the workers still let other
    tasks run between lines (all parsed at once, six million of them stopped a worker's loop
    for over a minute)."""

    handled = []

    async def handle(line: InvocationLine) -> Any:
        handled.append(line)  # only the last line, "{}", is not blank
        return {}

    async def ticks_while_answering() -> tuple[int, list[bytes]]:
        ticks = 0

        async def ticker() -> None:
            nonlocal ticks
            while True:
                ticks += 1
                await asyncio.sleep(0)

        ticking = asyncio.ensure_future(ticker())
        await asyncio.sleep(0)
        answers = await LineAnswerer(handle, 4, 100_000).answer(b"\n" * 20_000 + b"{}")
        ticking.cancel()
        return ticks, answers

    ticks, answers = asyncio.run(ticks_while_answering())
    assert len(answers) == 20_001 and len(handled) == 1 and ticks > 1000
    assert json.loads(answers[0])["error"]["message"] == "line 1: the line is empty"


def test_execution_parameters_follow_the_settings():
    settings = dataclasses.replace(get_settings(), api_workers=3, max_body_bytes=20 * 2**20)
    assert execution_parameters(settings) == {
        "MaxConcurrentTransforms": 5,  # 2 per worker, 6 x 20 MB, would pass 100 MB
        "BatchStrategy": "MULTI_RECORD",
        "MaxPayloadInMB": 20,
    }
    tiny = dataclasses.replace(settings, max_body_bytes=1000, max_concurrency=1)
    assert execution_parameters(tiny)["MaxPayloadInMB"] == 1
    assert execution_parameters(tiny)["MaxConcurrentTransforms"] == 1


@pytest.mark.parametrize(
    ("workers", "body_mb", "concurrent", "payload_mb"),
    [(2, 60, 1, 60), (4, 100, 1, 100), (4, 30, 3, 30), (8, 6, 16, 6), (60, 1, 64, 1)],
)
def test_execution_parameters_keep_within_sagemakers_100_mb(
    workers, body_mb, concurrent, payload_mb
):
    """CreateTransformJob: MaxConcurrentTransforms x MaxPayloadInMB may not pass 100 MB."""
    settings = dataclasses.replace(
        get_settings(), api_workers=workers, max_body_bytes=body_mb * 2**20, max_concurrency=64
    )
    parameters = execution_parameters(settings)
    assert (parameters["MaxConcurrentTransforms"], parameters["MaxPayloadInMB"]) == (
        concurrent,
        payload_mb,
    )
    assert concurrent * payload_mb <= 100 or concurrent == 1


# ---- against the served bento ----


def post_lines(served, content: bytes, content_type: str = JSONLINES) -> httpx.Response:
    return post(served, content=content, content_type=content_type)


def test_execution_parameters_endpoint(served):
    response = httpx.get(f"{served.url}/execution-parameters", timeout=10)
    assert response.status_code == 200
    assert response.json() == execution_parameters(get_settings())  # the suite's defaults


def test_a_body_past_the_line_limit_is_a_413_and_the_server_serves_on(served):
    response = post_lines(served, b"\n" * get_settings().max_lines + b"{}")
    assert response.status_code == 413
    assert response.json()["error"]["type"] == "too_many_lines"
    assert httpx.get(f"{served.url}/ping", timeout=10).status_code == 200


def test_jsonlines_answers_one_line_per_line_like_single_requests(served, s3_store):
    pictures = [photo_like(150 + 20 * i, 120, seed=40 + i) for i in range(3)]
    s3_image = s3_store.put("batch/line-4.png", encode(pictures[2]))
    requests: list[Any] = [
        {"images": [as_base64(pictures[0]), as_base64(pictures[1])], "classes": SEED_CLASSES},
        {"inputs": as_base64(pictures[1]), "parameters": {"candidate_labels": ["cat", "dog"]}},
        '{"images": [',
        {"images": ["not base64!"], "classes": SEED_CLASSES},
        {"images": [s3_image], "classes": SEED_CLASSES, "top_k": 2},
    ]
    lines = [r if isinstance(r, str) else json.dumps(r) for r in requests]
    response = post_lines(served, ("\n".join(lines) + "\n").encode())
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith(JSONLINES)
    answers = [json.loads(line) for line in response.text.split("\n")]
    assert len(answers) == len(requests)
    # Good lines answer exactly what the same request sent alone as JSON answers.
    for index in (0, 1, 4):
        alone = post(served, requests[index])
        assert alone.status_code == 200, alone.text
        assert_same_answer(answers[index], alone.json())
    assert len(answers[4][0]["prompts"][0]) == 2
    assert answers[2]["error"]["type"] == "malformed_json"
    assert answers[2]["error"]["message"].startswith("line 3: ")
    assert answers[3]["error"]["type"] == "invalid_image"
    assert answers[3]["error"]["message"].startswith("line 4: images[0]:")


@pytest.mark.parametrize(
    ("content_type", "accept", "answered"),
    [
        ("application/x-jsonlines", None, "application/x-jsonlines"),
        ("application/jsonl", "*/*", "application/jsonl"),
        ("application/jsonlines", "application/x-jsonlines", "application/x-jsonlines"),
        ("application/x-jsonlines", "application/json", "application/x-jsonlines"),
        ("application/jsonl", "application/jsonlines;q=0.9, application/json-lines", None),
        ("application/x-ndjson", None, "application/x-ndjson"),
    ],
)
def test_the_answers_json_lines_name_is_the_one_asked_for_else_the_one_sent(
    served, content_type, accept, answered
):
    """It was `application/jsonlines` whatever the client sent and asked for."""
    line = json.dumps({"images": [as_base64(photo_like(40, 30, seed=9))], "classes": SEED_CLASSES})
    headers = {"content-type": content_type, **({"accept": accept} if accept else {})}
    response = httpx.post(
        f"{served.url}/invocations", content=line.encode() + b"\n", headers=headers, timeout=30
    )
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == (answered or "application/json-lines")
    assert "error" not in json.loads(response.text)


@pytest.fixture(scope="module")
def batch_served(tiny_stored_model, bentoml_home, tmp_path_factory) -> Iterator[ServedBento]:
    """A server as a Batch Transform job runs it (`CLIP_ENDPOINT_KIND=batch`)."""
    with serve_tiny(
        tiny_stored_model, bentoml_home, tmp_path_factory, "batch", CLIP_ENDPOINT_KIND="batch"
    ) as server:
        yield server


@pytest.mark.parametrize("content_type", ["application/json", "text/json", None])
def test_lines_sent_as_json_to_a_batch_endpoint_are_answered_as_json_lines(
    batch_served, served, content_type
):
    """A Batch Transform job with ContentType=application/json, SplitType=Line and MultiRecord
    sends its records so: each line answered, as sent as JSON Lines (it was a 400). A
    real-time endpoint does not look into JSON bodies for lines."""
    pictures = [photo_like(120 + 10 * i, 100, seed=70 + i) for i in range(2)]
    lines = [json.dumps({"images": [as_base64(p)], "classes": SEED_CLASSES}) for p in pictures]
    body = ("\n".join(lines) + "\n").encode()
    headers = {"content-type": content_type} if content_type else {}
    url = f"{batch_served.url}/invocations"
    as_json = httpx.post(url, content=body, headers=headers, timeout=60)
    as_lines = post_lines(batch_served, body)
    assert as_json.status_code == 200, as_json.text
    assert as_json.headers["content-type"].startswith(JSONLINES)
    got = [json.loads(line) for line in as_json.text.split("\n")]
    want = [json.loads(line) for line in as_lines.text.split("\n")]
    assert len(got) == 2
    for answer, expected in zip(got, want, strict=True):
        assert_same_answer(answer, expected)
    # one JSON document over several lines is still one request
    pretty = json.dumps({"images": [as_base64(pictures[0])], "classes": SEED_CLASSES}, indent=2)
    single = post(batch_served, content=pretty.encode(), content_type="application/json")
    assert single.status_code == 200 and single.headers["content-type"] == "application/json"
    assert_same_answer(single.json(), got[0])
    realtime = httpx.post(f"{served.url}/invocations", content=body, headers=headers, timeout=60)
    assert realtime.status_code == 400
    assert realtime.json()["error"]["type"] == "malformed_json"
    # a broken first record costs its own line, as a broken later one does
    broken_first = httpx.post(url, content=b"{bad\n" + body, headers=headers, timeout=60)
    assert broken_first.status_code == 200, broken_first.text
    answers = [json.loads(line) for line in broken_first.text.split("\n")]
    assert answers[0]["error"]["type"] == "malformed_json" and len(answers) == 3
    for answer, expected in zip(answers[1:], got, strict=True):
        assert_same_answer(answer, expected)


@pytest.mark.parametrize(
    ("body", "lines"),
    [
        (b'{"a": 1}\n{"a": 2}', True),
        (b'{"a": 1}\r\n{"a": 2}\r\n', True),
        (b'{"a": 1}\n', False),  # one record and its newline: plain JSON
        (b'{\n  "a": 1\n}\n', False),  # a pretty-printed document
        (b'[\n  {"a": 1},\n  {"a": 2}\n]', False),
        (b'{"a": 1}', False),
        (b"{bad", False),  # one line: one (broken) request, a 400
        (b'{bad\n{"a": 2}\n{"a": 3}', True),  # a broken first record: each line answered
        (b'\n{"a": 1}\n{"a": 2}', True),
        (b"1\n2", True),  # no JSON document: lines, each answered (records are objects)
        (b"", False),
    ],
)
def test_a_json_body_is_lines_where_it_is_no_json_document_over_several_lines(body, lines):
    assert is_lines_of_json(body) is lines


def test_the_lines_images_share_the_runners_batches(served, tiny_clip):
    """A mini-batch of one-image lines: every image encoded, in fewer forward passes than
    images (batches spanned lines), and every line's answer matches transformers."""
    pictures = [photo_like(140 + 8 * i, 110, seed=200 + i) for i in range(24)]
    body = "\n".join(
        json.dumps({"images": [as_base64(p)], "classes": SEED_CLASSES}) for p in pictures
    )
    post_lines(served, body.encode().split(b"\n", 1)[0])  # prompts cached; then image-only work
    count_before, sum_before = histogram(served, "clip_runner_batch_images")
    response = post_lines(served, body.encode())
    count_after, sum_after = histogram(served, "clip_runner_batch_images")
    assert response.status_code == 200, response.text
    answers = [json.loads(line) for line in response.text.split("\n")]
    encoded, batches = sum_after - sum_before, count_after - count_before
    assert encoded >= len(pictures)  # ">=": a retried runner call may be encoded twice
    assert batches < encoded, "the lines' images were not batched together"
    reference = reference_probabilities(tiny_clip, pictures, SEED_PROMPTS)
    for answer, row in zip(answers, reference, strict=True):
        assert_matches_reference(answer, row[None, :], SEED_NAMES)


def test_a_windows_made_file_with_its_byte_order_mark_is_answered_as_any_other(served):
    line = json.dumps({"images": [as_base64(photo_like(64, 48, seed=3))], "classes": SEED_CLASSES})
    plain = post_lines(served, (line + "\n" + line).encode())
    marked = post_lines(served, UTF8_BOM + (line + "\r\n" + line + "\r\n").encode())
    assert plain.status_code == marked.status_code == 200, marked.text
    for ours, theirs in zip(marked.text.split("\n"), plain.text.split("\n"), strict=True):
        assert_same_answer(json.loads(ours), json.loads(theirs))


def test_jsonlines_body_limits_and_other_types_still_apply(served):
    assert post_lines(served, b"\n\n").status_code == 400
    too_big = post_lines(served, b'{"images": ["' + b"A" * (7 * 2**20) + b'"]}')
    assert too_big.status_code == 413 and too_big.json()["error"]["type"] == "payload_too_large"
    refused = post_lines(served, b"{}", content_type="text/csv")
    assert refused.status_code == 415
    assert "application/jsonlines" in refused.json()["error"]["message"]
    assert httpx.get(f"{served.url}/ping", timeout=5).status_code == 200


def test_s3_images_in_a_json_request(served, s3_store):
    picture = photo_like(300, 200, seed=77)
    url = s3_store.put("service/photo.jpg", encode(picture, "JPEG"))
    inline = "data:image/jpeg;base64," + as_base64(picture, "JPEG")
    body = {"images": [url, inline], "classes": SEED_CLASSES}
    response = post(served, body)
    assert response.status_code == 200, response.text
    first, second = response.json()
    assert first == second  # the same bytes from S3 and inline

    missing = {"images": [inline, "s3://clip-images/service/absent.jpg"], "classes": SEED_CLASSES}
    response = post(served, missing)
    assert response.status_code == 422
    assert response.json()["error"] == {
        "type": "image_not_found",
        "message": "images[1]: s3://clip-images/service/absent.jpg does not exist (NoSuchKey)",
        "index": 1,
    }


def test_s3_access_denied_by_the_servers_role(served, s3_store):
    denied = s3_store.put("service/secret.jpg", b"jpeg", bucket=S3_PRIVATE_BUCKET)
    body = {"inputs": [denied], "parameters": {"candidate_labels": ["cat", "dog"]}}
    with s3_store.enforced_auth():
        response = post(served, body)
    assert response.status_code == 422
    error = response.json()["error"]
    assert error["type"] == "forbidden_url" and error["message"].startswith("inputs[0]: access to")
