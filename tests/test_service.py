"""Integration: a real `bentoml serve` of the tiny model, spoken to over HTTP on 127.0.0.1."""

from __future__ import annotations

import asyncio
import io
import os
import re
import signal
import time
import uuid

import bentoml
import httpx
import numpy as np
import psutil
import pytest
from PIL import Image

from clip_runner.answers.runner_calls import text_call_passes
from tests.helpers import (
    GUARD_AUTH,
    SEED_CLASSES,
    as_base64,
    assert_same_answer,
    histogram,
    photo_like,
    serve_tiny,
    wait_for_ping,
)
from tests.reference import assert_matches_reference, reference_probabilities

SEED_NAMES = [name for name, _ in SEED_CLASSES]
SEED_PROMPTS = [f"a photo of a {name}" for name in SEED_NAMES]


def post(served, body=None, content=None, content_type="application/json") -> httpx.Response:
    return httpx.post(
        f"{served.url}/invocations",
        json=body,
        content=content,
        headers={"Content-Type": content_type},
        timeout=30,
    )


def assert_error(response: httpx.Response, status: int, *words: str) -> dict:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    error = response.json()["error"]
    assert set(error) <= {"type", "message", "index"} and error["type"] and error["message"]
    for word in words:
        assert word in error["message"], error
    return error


def test_ping_is_200_with_an_empty_body(served):
    response = httpx.get(f"{served.url}/ping", timeout=5)
    assert response.status_code == 200 and response.content == b""


def test_seed_request_with_local_urls_and_base64_matches_transformers(
    served, tiny_clip, image_dir, image_server
):
    pictures = [photo_like(1834 // 4, 2750 // 4, seed=21), photo_like(500, 300, seed=22)]
    pictures[0].save(image_dir / "seed-0.jpg", quality=90)
    served_jpeg = (image_dir / "seed-0.jpg").read_bytes()
    body = {
        "images": [f"{image_server}/seed-0.jpg", as_base64(pictures[1])],
        "classes": SEED_CLASSES,
    }
    response = post(served, body)
    assert response.status_code == 200, response.text
    answer = response.json()
    assert [list(prediction) for prediction in answer] == [
        ["classification", "confidence", "prompts"]
    ] * 2
    decoded = [Image.open(io.BytesIO(served_jpeg)).convert("RGB"), pictures[1]]
    reference = reference_probabilities(tiny_clip, decoded, SEED_PROMPTS)
    assert_matches_reference(answer, reference, SEED_NAMES)
    for prediction, row in zip(answer, reference, strict=True):
        indices = prediction["prompts"][0]
        top = [row[i] for i in indices]
        flags = [SEED_CLASSES[i][1] for i in indices]
        expected = int(
            any(f and top[0] - p <= 0.02 + 1e-6 for p, f in zip(top, flags, strict=True))
        )
        assert prediction["classification"] == expected


def test_data_uris_and_charset_content_type_are_accepted(served):
    picture = photo_like(120, 90, seed=5)
    body = {
        "images": ["data:image/png;base64," + as_base64(picture), as_base64(picture)],
        "classes": [["cat", True], ["dog", 0]],
    }
    response = post(served, body, content_type="application/json; charset=utf-8")
    assert response.status_code == 200, response.text
    first, second = response.json()
    assert first == second and len(first["prompts"][0]) == 2


def test_template_and_top_k_overrides(served, tiny_clip):
    picture = photo_like(200, 200, seed=6)
    names = ["cat", "dog", "bird", "car", "tree"]
    body = {
        "images": [as_base64(picture)],
        "classes": [[name, 0] for name in names],
        "template": "a drawing of a {name}",
        "top_k": 5,
    }
    response = post(served, body)
    assert response.status_code == 200, response.text
    prediction = response.json()[0]
    reference = reference_probabilities(
        tiny_clip, [picture], [f"a drawing of a {n}" for n in names]
    )
    indices, _, probabilities = prediction["prompts"]
    assert len(indices) == 5 and prediction["classification"] == 0
    np.testing.assert_allclose(probabilities, reference[0][indices], atol=1e-5)


def test_empty_and_blank_class_names_are_answered_as_the_original_answered_them(served, tiny_clip):
    """Their prompts are the template's text alone: the original scored `["", 1]` as
    "a photo of a "; it had been a 422 here."""
    picture = photo_like(160, 120, seed=8)
    names = ["", "dog", "  "]
    body = {"images": [as_base64(picture)], "classes": [[name, 1] for name in names]}
    response = post(served, body)
    assert response.status_code == 200, response.text
    reference = reference_probabilities(tiny_clip, [picture], [f"a photo of a {n}" for n in names])
    assert_matches_reference(response.json(), reference, names)


@pytest.mark.parametrize(
    ("content", "status", "words"),
    [
        (b"{not json", 400, ["not valid JSON"]),
        (b"[1, 2]", 400, ["JSON object"]),
        (b'{"classes": [["a", 1]]}', 422, ["images", "required"]),
        (b'{"images": ["aGk="]}', 422, ["classes", "required"]),
        (b'{"images": [], "classes": [["a", 1]]}', 422, ["images"]),
        (b'{"images": ["aGk="], "classes": []}', 422, ["classes"]),
        (
            b'{"images": ["aGk="], "classes": [["a", 2]]}',
            422,
            ["classes[0][1]", "0, 1, true or false"],
        ),
        (b'{"images": ["aGk="], "classes": [["a", "yes"]]}', 422, ["classes[0][1]"]),
        (b'{"images": ["aGk="], "classes": [["a", 1]], "top_k": 0}', 422, ["top_k"]),
        (b'{"images": ["aGk="], "classes": [["a", 1]], "template": "x"}', 422, ["{name}"]),
    ],
)
def test_malformed_requests_get_json_errors_naming_the_field(served, content, status, words):
    assert_error(post(served, content=content), status, *words)


def test_image_errors_name_the_index(served, image_server):
    good = as_base64(photo_like(40, 40, seed=1))
    cases = [
        ([good, "bm90IGFuIGltYWdl"], 1, "recognised image format"),
        ([good, good, "file:///etc/passwd"], 2, "unsupported URL scheme"),
        ([f"{image_server}/status/404", good], 0, "HTTP 404"),
        ([good, f"{image_server}/status/503"], 1, "HTTP 503"),
        (["%%%"], 0, "valid base64"),
    ]
    for images, index, reason in cases:
        error = assert_error(post(served, {"images": images, "classes": [["a", 1]]}), 422, reason)
        assert error["index"] == index and f"images[{index}]" in error["message"]


def test_wrong_routes_and_methods_are_json_too(served):
    assert_error(httpx.get(f"{served.url}/nothing-here"), 404)
    assert_error(httpx.get(f"{served.url}/invocations"), 405)


def test_server_keeps_serving_after_errors(served):
    for _ in range(5):
        post(served, content=b"{broken")
        post(served, {"images": ["%%%"], "classes": [["a", 1]]})
    response = post(served, {"images": [as_base64(photo_like(30, 30, 2))], "classes": [["a", 1]]})
    assert response.status_code == 200
    assert "Traceback" not in response.text
    assert "rejected request: 1 validation error(s), first at body" in served.log()
    assert "pydantic_core._pydantic_core.ValidationError" not in served.log()


def test_concurrent_requests_are_batched_across_requests_and_stay_correct(served, tiny_clip):
    pictures = [photo_like(160 + 8 * i, 120, seed=100 + i) for i in range(24)]
    bodies = [{"images": [as_base64(p)], "classes": SEED_CLASSES} for p in pictures]
    post(served, bodies[0])  # prompts cached; the burst below is image-only work
    count_before, sum_before = histogram(served, "clip_runner_batch_images")
    calls_before, sent_before = histogram(served, "clip_service_runner_call_images")

    async def burst() -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=served.url, timeout=60) as client:
            return await asyncio.gather(*(client.post("/invocations", json=b) for b in bodies))

    responses = asyncio.run(burst())
    count_after, sum_after = histogram(served, "clip_runner_batch_images")
    calls_after, sent_after = histogram(served, "clip_service_runner_call_images")
    assert [r.status_code for r in responses] == [200] * len(bodies)
    # The API worker merged concurrent requests: fewer runner calls than images sent.
    assert sent_after - sent_before == len(bodies)
    assert calls_after - calls_before < len(bodies), "no runner call carried two requests"
    # Every image was encoded. A runner call that lost its connection is retried once (see
    # runner_calls.py), and the runner may have encoded the first attempt too, so ">=".
    encoded = sum_after - sum_before
    assert encoded >= len(bodies)
    batches = count_after - count_before
    # One image per request, so fewer forward passes than images means batches spanned requests.
    assert batches < encoded, "no cross-request batching happened"
    reference = reference_probabilities(tiny_clip, pictures, SEED_PROMPTS)
    for response, row in zip(responses, reference, strict=True):
        assert_matches_reference(response.json(), row[None, :], SEED_NAMES)


def test_bentoml_python_client(served):
    picture = as_base64(photo_like(64, 64, seed=9))
    classes = [["person", 1], ["bag", 0]]
    with bentoml.SyncHTTPClient(served.url) as client:
        answer = client.invocations(images=[picture], classes=classes)
        with pytest.raises(bentoml.exceptions.BentoMLException) as raised:
            client.invocations(images=[picture], classes=[["person", 5]])
    assert_same_answer(answer, post(served, {"images": [picture], "classes": classes}).json())
    assert "classes[0][1]" in str(raised.value)


def test_random_weights_warning_is_logged(served):
    assert "RANDOM WEIGHTS" in served.log()


def test_the_log_says_what_each_process_serves_with(served):
    """The project's INFO lines show at BentoML's level: the runner's model, device and JPEG
    decoder, and each API worker's view of it (simplejpeg is installed here)."""
    log = served.log()
    runner_line = r"\[INFO\].*CLIP model clip:\w+ ready on cpu .*decoded by simplejpeg \(Pillow's"
    assert re.search(runner_line, log)
    api_line = (
        r"\[INFO\].*serving model clip:\w+ on cpu in float32; "
        r"JPEGs decoded in the API workers by simp"
    )
    assert re.search(api_line, log)
    # The text pass the runner timed, and the text calls each API worker sized by it.
    timed = re.findall(r"a full text pass ([\d.]+) ms", log)
    calls = re.findall(r"text calls of up to (\d+) pass\(es\) \(a pass ([\d.]+) ms\)", log)
    assert timed and calls and all(float(ms) > 0 for ms in timed)
    for passes, ms in calls:
        # The rule applied to the logged figure, either side of its rounding to 0.1 ms.
        rounded = {text_call_passes((float(ms) + error) / 1000) for error in (-0.05, 0.05)}
        assert ms in timed and int(passes) in rounded


def test_the_runner_logs_where_its_start_up_went(served):
    """One line per runner worker, each step timed, the whole no shorter than its steps: what
    scripts/bench.py reads from a GPU server's log."""
    line = re.search(
        r"\[INFO\].*runner start-up: ([\d.]+) s since the process began \((.*)\)", served.log()
    )
    assert line, "no start-up line in the runner's log"
    total, details = float(line[1]), line[2]
    before = re.match(r"before the runner: ([\d.]+); ", details)
    steps = dict(re.findall(r"([a-zA-Z -]+) ([\d.]+)(?:, |$)", details[before.end() :]))
    assert list(steps) == [
        "torch and transformers imported",
        "model read",
        "placed on the device",
        "JPEG decoder",
        "warm-up",
        "garbage collector settled",
    ]
    timed = float(before[1]) + sum(float(seconds) for seconds in steps.values())
    # Each figure is rounded to 0.1 s on its own.
    assert total >= timed - 0.05 * (len(steps) + 2)
    assert float(steps["torch and transformers imported"]) > 0


def test_the_access_log_has_a_line_per_request_unless_turned_off(served, guarded):
    """BentoML's access log by default; `guarded` runs with CLIP_ACCESS_LOG=off."""
    path = f"/access-log-probe-{uuid.uuid4().hex}"
    for server in (served, guarded):
        assert httpx.get(f"{server.url}{path}", headers=GUARD_AUTH).status_code == 404
    served.wait_for_log(f"path={path}")
    time.sleep(1)  # both lines would have been written by now
    assert path not in guarded.log()


def test_both_ways_of_calling_the_runner_give_the_same_numbers(served, guarded):
    """`served` calls the runner in its own wire format, `guarded` through BentoML's client
    (CLIP_DIRECT_RUNNER_CALLS=off): the same requests get the same answers. New prompts, so the
    texts go to the runner too."""
    prompts = [f"a photo of a {uuid.uuid4().hex[:8]}", f"a drawing of a {uuid.uuid4().hex[:8]}"]
    images = [as_base64(photo_like(64, 48, seed=11), "JPEG"), as_base64(photo_like(30, 70, 12))]
    requests = [
        ("/invocations", {"images": images, "classes": [[prompt, 1] for prompt in prompts]}),
        ("/embed_images", {"images": images}),
        ("/embed_texts", {"texts": prompts}),
    ]
    for path, body in requests:
        answers = [
            httpx.post(f"{server.url}{path}", json=body, headers=GUARD_AUTH, timeout=30)
            for server in (served, guarded)
        ]
        assert [answer.status_code for answer in answers] == [200, 200], path
        assert_same_answer(answers[0].json(), answers[1].json())
    assert "; runner called in its wire format" in served.log()
    assert "; runner called through BentoML's client" in guarded.log()


def test_each_process_keeps_what_it_loaded_out_of_garbage_collection(served):
    """The runner (model, torch) and every API worker freeze what they loaded (gc_tuning.py):
    hundreds of thousands of objects that full collections no longer walk."""
    log = served.wait_for_log("runner:", "API worker:")
    for process in ("runner", "API worker"):
        counts = re.findall(
            rf"{process}: (\d+) objects loaded at start kept out of garbage collection", log
        )
        assert counts, process
        assert all(int(count) > 100_000 for count in counts), (process, counts)


def mapped_by_role(served, library: str) -> dict[str, list[bool]]:
    """For each process of the server, by role (supervisor, clip_service for an API worker,
    clip_runner), whether it has a shared library whose path contains `library` mapped."""
    supervisor = psutil.Process(served.process.pid)
    mapped: dict[str, list[bool]] = {}
    for process in [supervisor, *supervisor.children(recursive=True)]:
        command = process.cmdline()
        role = command[command.index("--service-name") + 1] if "--service-name" in command else ""
        loaded = any(library in region.path for region in process.memory_maps())
        mapped.setdefault(role or "supervisor", []).append(loaded)
    return mapped


def test_only_the_runner_loads_torch(served):
    """The supervisor and the API workers import the service without torch and transformers
    (model/engine.py): a few seconds less to start each, a third of the memory. The runner,
    which holds the model, does load them."""
    loads_torch = mapped_by_role(served, "libtorch")
    api_workers = loads_torch.pop("clip_service")
    assert api_workers and not any(api_workers)
    assert loads_torch == {"supervisor": [False], "clip_runner": [True]}


def test_only_the_api_workers_load_numba(served):
    """Each API worker loads numba's compiled resize as it starts (images/loading.py) and says
    so; the supervisor and the runner, which never resize on the CPU, do not: 0.45 s and about
    110 MB less each."""
    loads_numba = mapped_by_role(served, "libllvmlite")
    api_workers = loads_numba.pop("clip_service")
    assert api_workers and all(api_workers)
    assert loads_numba == {"supervisor": [False], "clip_runner": [False]}
    said = "API worker: images resized on the CPU by numba's compiled loops"
    assert served.wait_for_log(said).count(said) == len(api_workers)


def test_once_ping_answers_200_every_api_worker_does(
    tiny_stored_model, bentoml_home, tmp_path_factory
):
    """The API workers start before the runner and each probes it on its own clock: right after
    the first 200, pings on fresh connections (spread over both workers) must be 200 too, as
    SageMaker's are. A worker that has not seen the runner yet asks it once more."""
    with serve_tiny(
        tiny_stored_model, bentoml_home, tmp_path_factory, "ping-together", CLIP_API_WORKERS="2"
    ) as server:
        statuses = [httpx.get(f"{server.url}/ping", timeout=5).status_code for _ in range(30)]
    assert statuses == [200] * 30


def test_ping_turns_503_fast_when_the_runner_stops_answering(served):
    runner = served.runner_processes()[0]
    os.kill(runner.pid, signal.SIGSTOP)
    try:
        # At most a probe's 1 s wait and two 1.5 s tries (about 4 s), with room for a busy machine.
        wait_for_ping(served.url, 503, within_s=8)
        # Its shape, while the runner is still stopped (after, a ping may already be 200).
        assert_error(httpx.get(f"{served.url}/ping", timeout=8), 503, "runner")
    finally:
        os.kill(runner.pid, signal.SIGCONT)
    wait_for_ping(served.url, 200, within_s=15)


def test_metrics_expose_cache_preprocessing_and_runner_timings(served):
    body = {"images": [as_base64(photo_like(50, 50, seed=3))], "classes": [["metric cat", 1]]}
    # Each API worker has its own text cache, and a new connection may reach any of them (at
    # most one per core): one request more than cores brings the prompt to one worker twice.
    ensemble = {"images": body["images"], "labels": ["metric dog"], "templates": ["a {}", "my {}"]}
    for _ in range(len(os.sched_getaffinity(0)) + 1):
        post(served, body)
        httpx.post(f"{served.url}/classify", json=ensemble, timeout=30).raise_for_status()
    text = httpx.get(f"{served.url}/metrics", timeout=10).text
    for name in (
        'clip_service_text_cache_lookups_total{result="hit"}',
        'clip_service_text_cache_lookups_total{result="miss"}',
        'clip_service_label_cache_lookups_total{result="hit"}',
        'clip_service_label_cache_lookups_total{result="miss"}',
        'clip_runner_text_cache_lookups_total{result="miss"}',
        "clip_service_preprocess_seconds_count",
        'clip_service_runner_call_seconds_count{encoder="image"}',
        'clip_runner_inference_seconds_count{encoder="image"}',
        "clip_runner_batch_texts_count",
        'clip_service_runner_call_images_count{sent_as="pixels"}',
        "clip_service_runner_call_texts_count",
    ):
        assert name in text, name
