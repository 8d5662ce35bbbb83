"""Overload, deadlines, abandoned requests and a dying runner, on a deliberately small server.

The server here allows 3 concurrent requests, answers 504 after 5 s, gives up on image hosts
after 4 s and on a runner call after two 2 s attempts. The runner is frozen (SIGSTOP) or
killed (SIGKILL) to make the faults real. Each test waits for the state it checks (a fetch
begun, a 503 seen), not a fixed time, so a busy machine slows it without failing it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import signal
import socket
import threading
import time
from collections.abc import Iterator

import httpx
import psutil
import pytest

from tests.helpers import (
    ServedBento,
    as_base64,
    in_progress,
    photo_like,
    serve_tiny,
    wait_for_ping,
)

GOOD = {"images": [as_base64(photo_like(40, 40, seed=1))], "classes": [["cat", 1], ["dog", 0]]}


@pytest.fixture(scope="module")
def fragile(tiny_stored_model, bentoml_home, tmp_path_factory) -> Iterator[ServedBento]:
    with serve_tiny(
        tiny_stored_model,
        bentoml_home,
        tmp_path_factory,
        "fragile",
        CLIP_API_WORKERS="1",  # CLIP_MAX_CONCURRENCY is per API worker: one makes it exact
        CLIP_MAX_CONCURRENCY="3",
        CLIP_REQUEST_TIMEOUT_S="5",
        CLIP_FETCH_TIMEOUT_S="4",
        CLIP_FETCH_CONNECT_TIMEOUT_S="2",
        CLIP_MAX_LATENCY_MS="2000",
        # As in the image `bentoml containerize` builds (its Dockerfile sets it), where BentoML's
        # supervisor would start no process again that ended.
        BENTOML_CONTAINERIZED="true",
    ) as server:
        yield server


def test_overload_is_refused_fast_and_stuck_requests_fail_cleanly(fragile):
    runner = fragile.runner_processes()[0]
    os.kill(runner.pid, signal.SIGSTOP)
    try:

        async def scenario():
            async with httpx.AsyncClient(base_url=fragile.url, timeout=30) as client:
                stuck = [
                    asyncio.ensure_future(client.post("/invocations", json=GOOD)) for _ in range(3)
                ]
                # Mid-way through the 4 s the stuck ones hold their slots (two 2 s attempts):
                # room both ways for a busy machine.
                await asyncio.sleep(1.5)
                extra = await client.post("/invocations", json=GOOD)
                ping = await client.get("/ping")
                return await asyncio.gather(*stuck), extra, ping

        stuck, extra, ping = asyncio.run(scenario())
        wait_for_ping(fragile.url, 503, within_s=5)  # the frozen runner is reported
        # ... by /readyz too: BentoML's had hung for its traffic timeout (here 20 s), then
        # answered a text/plain 500
        asked = time.monotonic()
        ready = httpx.get(f"{fragile.url}/readyz", timeout=30)
        readyz_s = time.monotonic() - asked
    finally:
        os.kill(runner.pid, signal.SIGCONT)
    assert extra.status_code == 429 and extra.json()["error"]["type"] == "too_many_requests"
    assert extra.headers["retry-after"] == "1"  # refused while the 3 slots are taken
    assert ping.status_code in (200, 503)  # /ping is exempt from the concurrency cap
    assert ready.status_code == 503 and ready.json()["error"]["type"] == "not_ready"
    assert readyz_s < 3
    for response in stuck:  # two 2 s attempts at the frozen runner, then a clear 503
        assert response.status_code == 503, response.text
        error = response.json()["error"]
        assert error["type"] == "runner_unavailable"
        assert "did not answer a second try within 2 s" in error["message"]
    assert httpx.post(f"{fragile.url}/invocations", json=GOOD, timeout=30).status_code == 200


def test_a_client_that_leaves_cancels_its_image_fetch(fragile, image_host_server):
    host = image_host_server.server
    closed_before = len(host.closed_at)
    body = json.dumps({"images": [f"{image_host_server.url}/hang?leaver"], "classes": [["cat", 1]]})
    request = (
        "POST /invocations HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n\r\n{body}"
    ).encode()
    port = int(fragile.url.rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port), timeout=10) as client:
        client.sendall(request)
        # The client leaves once the fetch has begun (a busy server may take a while to start it).
        started_by = time.monotonic() + 10
        while "/hang?leaver" not in host.access_log and time.monotonic() < started_by:
            time.sleep(0.02)
        assert "/hang?leaver" in host.access_log, "the image fetch never began"
    left_at = time.monotonic()
    deadline = left_at + 3.0  # the 4 s fetch timeout, counted from the fetch's start, is later
    while len(host.closed_at) == closed_before and time.monotonic() < deadline:
        time.sleep(0.05)
    assert len(host.closed_at) > closed_before, "the image fetch outlived its client"


def test_a_killed_runner_is_reported_then_restarted(fragile):
    runner = fragile.runner_processes()[0]
    # The supervisor (the `bentoml serve` process; the workers write their logs themselves) is
    # held while the 503 is awaited: otherwise a quick restart on a busy machine could end the
    # 503 before a ping saw it (CI once saw only 200s: reaping the killed runner took seconds).
    supervisor = psutil.Process(fragile.process.pid)
    supervisor.suspend()
    try:
        runner.kill()
        wait_for_ping(fragile.url, 503, within_s=8)  # a probe's 1 s wait and two 1.5 s tries
    finally:
        supervisor.resume()
    # The runner's listening socket outlives the process (the supervisor holds it), so a request
    # sent meanwhile waits for the restarted runner: answered, or a 504 at the deadline.
    during = httpx.post(f"{fragile.url}/invocations", json=GOOD, timeout=30)
    assert during.status_code in (200, 503, 504), during.text
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        if httpx.get(f"{fragile.url}/ping", timeout=5).status_code == 200:
            break
        time.sleep(0.5)
    else:
        pytest.fail("the runner was not restarted within 90 s")
    assert fragile.runner_processes()[0].pid != runner.pid
    assert httpx.post(f"{fragile.url}/invocations", json=GOOD, timeout=30).status_code == 200


def test_a_killed_api_workers_requests_leave_the_metrics(fragile, image_host_server):
    """A worker killed (SIGKILL, the OOM killer) never ran the destructor that marks its gauges
    dead: the request it was answering stayed in `bentoml_service_request_in_progress` for good,
    and its per-process series stayed on `/metrics`, one more each restart."""
    host = image_host_server
    body = {"images": [f"{host.url}/hang?killed-worker"], "labels": ["a cat"]}

    def call() -> None:
        with contextlib.suppress(httpx.HTTPError):  # its worker is killed under it
            httpx.post(f"{fragile.url}/classify", json=body, timeout=30)

    caller = threading.Thread(target=call, daemon=True)
    worker = fragile.api_processes()[0]
    caller.start()
    started_by = time.monotonic() + 15
    while "/hang?killed-worker" not in host.access_log and time.monotonic() < started_by:
        time.sleep(0.05)
    metrics = httpx.get(f"{fragile.url}/metrics", timeout=10).text
    assert in_progress(metrics, "/classify") == 1
    assert f'pid="{worker.pid}"' in metrics
    worker.kill()
    replaced_by = time.monotonic() + 90
    while time.monotonic() < replaced_by:
        with contextlib.suppress(psutil.Error):  # the killed one, a zombie until reaped
            if worker.pid not in [process.pid for process in fragile.api_processes()]:
                break
        time.sleep(0.2)
    # The supervisor holds the port meanwhile: a ping waits for the new worker, seconds where
    # the machine is busy (one took over 5 s on the GPU rehearsal's stack).
    deadline = time.monotonic() + 90
    while True:
        with contextlib.suppress(httpx.TimeoutException):
            if httpx.get(f"{fragile.url}/ping", timeout=5).status_code == 200:
                break
        assert time.monotonic() < deadline, "the API worker was not replaced within 90 s"
        time.sleep(0.2)
    answered = httpx.post(f"{fragile.url}/invocations", json=GOOD, timeout=30)
    assert answered.status_code == 200, answered.text
    metrics = httpx.get(f"{fragile.url}/metrics", timeout=10).text
    assert in_progress(metrics, "/classify") == 0
    assert f'pid="{worker.pid}"' not in metrics
    # The totals stay: the killed worker's requests are still counted.
    assert re.search(r'bentoml_service_request_total\{[^}]*endpoint="/classify"', metrics)
