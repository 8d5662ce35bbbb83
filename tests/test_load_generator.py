"""scripts/load_generator.py as bench.py runs it: a subprocess that waits for its go, loads a
real loopback HTTP server for its window, and reports every answer and every non-200 one, and
how far the answers it checks moved from their references."""

from __future__ import annotations

import json
import pickle
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from scripts import load_generator
from scripts.load_generator import classification_changes, top_probability_change
from tests.helpers import REPO_ROOT


class CountingHandler(BaseHTTPRequestHandler):
    """Answers 200, or 500 to a body that asks for it; counts what it answered. A body with
    `answer` is answered with that (JSON), else with `{}`."""

    protocol_version = "HTTP/1.1"  # keep-alive, as the service
    answered: list[bytes] = []

    def do_POST(self) -> None:  # noqa: N802 - http.server's name
        body = self.rfile.read(int(self.headers["Content-Length"]))
        self.answered.append(body)
        status = 500 if body == b'{"fail": true}' else 200
        answer = json.dumps(json.loads(body).get("answer", {})).encode()
        self.send_response(status)
        self.send_header("Content-Length", str(len(answer)))
        self.end_headers()
        self.wfile.write(answer)

    def log_message(self, *args) -> None:  # quiet
        pass


def start_load_process(
    url: str, bodies: Path, concurrency: int, offset: int, stride: int
) -> subprocess.Popen:
    """One load process for one second, as bench.py's drive_parallel starts it."""
    return subprocess.Popen(
        [sys.executable, "scripts/load_generator.py", url, "/invocations", str(bodies)]
        + [str(concurrency), "1", str(offset), str(stride), "0"],
        cwd=REPO_ROOT,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )


def run_window(
    process: subprocess.Popen,
    server: ThreadingHTTPServer,
    before_go: Callable[[], None] = lambda: None,
) -> tuple[dict, float]:
    """Once the load process is ready, `before_go`, then its go: (its outcome, when the go was
    given); the process and the server stopped either way."""
    try:
        assert process.stdout.readline().strip() == "ready"
        before_go()
        started = time.monotonic()
        process.stdin.write("go\n")
        process.stdin.flush()
        return json.loads(process.communicate(timeout=60)[0]), started
    finally:
        process.kill()
        server.shutdown()


def start_counting_server() -> tuple[ThreadingHTTPServer, str]:
    CountingHandler.answered = []
    server = ThreadingHTTPServer(("127.0.0.1", 0), CountingHandler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, f"http://127.0.0.1:{server.server_address[1]}"


def test_a_load_process_waits_for_its_go_then_reports_its_window(tmp_path):
    server, url = start_counting_server()
    bodies = [b'{"ok": 1}', b'{"fail": true}', b'{"ok": 2}']
    (tmp_path / "bodies.pickle").write_bytes(pickle.dumps((bodies, None)))
    process = start_load_process(url, tmp_path / "bodies.pickle", 3, offset=0, stride=3)

    def nothing_sent_yet() -> None:
        time.sleep(0.3)
        assert CountingHandler.answered == []  # nothing is sent before the go

    outcome, started = run_window(process, server, nothing_sent_yet)
    answered = len(CountingHandler.answered)
    # Three clients from offset 0, each every third body: one of them sends only the failing one.
    failed = CountingHandler.answered.count(b'{"fail": true}')
    assert outcome["errors"] == failed > 0
    # An error is no answer: the latencies (so the rates) are of the 200 answers only.
    assert len(outcome["latencies"]) == answered - failed > 3
    assert started + 1 <= outcome["ended"] <= time.monotonic()  # one clock with the parent's
    assert outcome["cpu_s"] > 0
    assert "answers_checked" not in outcome  # no references: nothing checked


def test_the_load_processes_of_a_run_never_send_the_same_body_twice(tmp_path):
    """Two processes of two clients each, as drive_parallel splits four clients: every body
    goes out once (uncached prompts must stay uncached), and both processes' clients send."""
    server, url = start_counting_server()
    bodies = [json.dumps({"n": n}).encode() for n in range(200_000)]
    (tmp_path / "bodies.pickle").write_bytes(pickle.dumps((bodies, None)))
    processes = [
        start_load_process(url, tmp_path / "bodies.pickle", 2, offset, stride=4)
        for offset in (0, 2)
    ]
    try:
        for process in processes:
            assert process.stdout.readline().strip() == "ready"
        for process in processes:
            process.stdin.write("go\n")
            process.stdin.flush()
        sent = sum(len(json.loads(p.communicate(timeout=60)[0])["latencies"]) for p in processes)
    finally:
        for process in processes:
            process.kill()
        server.shutdown()
    answered = [json.loads(body)["n"] for body in CountingHandler.answered]
    assert len(answered) == sent < len(bodies)
    assert len(set(answered)) == len(answered)
    assert {n % 4 for n in answered} == {0, 1, 2, 3}  # every client sent


def seed_answer(top: list[float], classification: int = 1) -> list[dict]:
    """An `/invocations` answer of the seed's shape for one image."""
    return [
        {
            "classification": classification,
            "confidence": top[0],
            "prompts": [[0, 1, 2], ["cat", "dog", "car"], top],
        }
    ]


def test_top_probability_change_compares_sorted_probabilities_and_any_other_shape_is_whole():
    reference = seed_answer([0.5, 0.3, 0.2])
    assert top_probability_change(seed_answer([0.5, 0.3, 0.2]), reference) == 0.0
    assert top_probability_change(seed_answer([0.5, 0.296, 0.204]), reference) == pytest.approx(
        0.004
    )
    # Two prompts that nearly tie swap places: their indices and names move, the sorted
    # probabilities hardly.
    swapped = seed_answer([0.5, 0.25, 0.2499])
    swapped[0]["prompts"][:2] = [[0, 2, 1], ["cat", "car", "dog"]]
    assert top_probability_change(swapped, seed_answer([0.5, 0.2499, 0.2499])) == pytest.approx(
        1e-4
    )
    not_numbers = [{"prompts": [[0, 1, 2], ["cat", "dog", "car"], ["x", "y", "z"]]}]
    for other in (
        {},
        [],
        seed_answer([0.5, 0.5]),
        [{"error": "x"}],
        reference * 2,
        None,
        not_numbers,
    ):
        assert top_probability_change(other, reference) == load_generator.WHOLLY_CHANGED
    assert classification_changes(seed_answer([0.5, 0.3, 0.2], 0), reference) == 1
    assert classification_changes(seed_answer([0.4, 0.3, 0.2]), reference) == 0
    assert classification_changes({}, reference * 2) == 2


def test_a_load_process_checks_each_answer_against_its_bodys_reference(tmp_path):
    """Three bodies, each answered as it asks: the first as its reference, the second with a
    probability 0.004 off and its classification flipped, the third unchecked (no reference)."""
    server, url = start_counting_server()
    reference = seed_answer([0.5, 0.3, 0.2])
    bodies = [
        json.dumps({"answer": reference}).encode(),
        json.dumps({"answer": seed_answer([0.5, 0.304, 0.196], 0)}).encode(),
        json.dumps({"answer": seed_answer([0.9, 0.05, 0.05])}).encode(),
    ]
    references = [reference, reference, None]
    (tmp_path / "bodies.pickle").write_bytes(pickle.dumps((bodies, references)))
    process = start_load_process(url, tmp_path / "bodies.pickle", 3, offset=0, stride=3)
    outcome, _ = run_window(process, server)
    sent = [bodies.index(body) for body in CountingHandler.answered]
    assert outcome["answers_checked"] == sent.count(0) + sent.count(1) > 0
    assert outcome["largest_probability_change"] == pytest.approx(0.004)
    assert outcome["classification_changes"] == sent.count(1) > 0
    assert outcome["errors"] == 0
