"""scripts/broken_jpegs.py, the GPU run's last stage, checked on the CPU: there the runner's
decoder is Pillow, so every forwarded broken JPEG must get exactly the API path's answer, alone
and in a batch beside intact ones; and a run that dies on a JPEG must name that JPEG with bytes
that reproduce it (on a GPU that name is the finding)."""

from __future__ import annotations

import base64
import os
import subprocess
import sys

import pytest
import torch

from scripts.broken_jpegs import (
    BOTH_REFUSED,
    RAISED,
    SAME,
    STARTED,
    RunnerDecode,
    api_crop,
    forwarded,
    intact_jpegs,
    mutations,
    outcome,
    read_lines,
    run,
    summary,
)
from tests.helpers import REPO_ROOT

COUNT, SEED = 10, 3


@pytest.fixture(scope="module")
def lines(tmp_path_factory: pytest.TempPathFactory) -> list[dict]:
    path = tmp_path_factory.mktemp("broken-jpegs") / "lines.jsonl"
    run(path, COUNT, SEED)
    return read_lines(path)


def test_on_the_cpu_a_forwarded_broken_jpeg_gets_the_api_paths_answer_alone_and_batched(lines):
    result = summary(lines)
    assert (result["decoder"], result["device"], result["mutations"]) == ("pillow", "cpu", COUNT)
    assert 0 < result["tried"] <= COUNT
    assert sum(result["outcomes"].values()) == result["tried"]
    assert set(result["outcomes"]) <= {SAME, BOTH_REFUSED}
    assert result["outcomes"].get(SAME, 0) > 0  # most broken JPEGs still decode
    assert result["intact_largest_mean_abs_difference"] == 0.0
    assert result["intact_batch_differs_from_solo"] == 0
    assert result["batch_changed_the_broken_jpeg"] == result["batch_changed_neighbours"] == 0
    assert not {"raised", "stopped_at"} & result.keys()


def test_only_jpegs_the_api_workers_forward_are_tried(lines):
    made = dict(mutations(intact_jpegs(), COUNT, SEED))
    tried = [line["name"] for line in lines if "outcome" in line]
    assert tried and all(forwarded(made[name]) for name in tried)
    assert [name for name, blob in made.items() if forwarded(blob)] == tried


def test_a_run_that_died_on_a_jpeg_names_it_with_bytes_that_reproduce_its_outcome(lines):
    last_outcome = max(index for index, line in enumerate(lines) if "outcome" in line)
    died = summary(lines[:last_outcome])  # as if the process died decoding that JPEG
    stopped = died["stopped_at"]
    assert stopped["name"] == lines[last_outcome]["name"]
    assert died["tried"] == summary(lines)["tried"]
    blob = base64.b64decode(stopped["bytes"])
    assert forwarded(blob)
    ours, _ = RunnerDecode(torch.device("cpu")).one(blob)
    assert outcome(ours, api_crop(blob)) == lines[last_outcome]["outcome"]


def test_an_exception_is_reported_with_the_jpeg_that_raised_it(lines):
    name = lines[-1]["name"]
    failed = [*lines[:-1], {"name": name, "outcome": RAISED, "error": "RuntimeError()"}]
    result = summary(failed)
    assert result["raised"]["name"] == name
    assert result["raised"]["error"] == "RuntimeError()"
    assert forwarded(base64.b64decode(result["raised"]["bytes"]))
    assert result["outcomes"][RAISED] == 1


def test_a_run_that_never_decoded_says_so():
    assert "error" in summary([])


def test_it_runs_where_pytest_is_missing_as_on_the_gpu_machine(tmp_path):
    """The GPU machine's image has no pytest (this venv and the rehearsal's have it), and the
    stage's process borrows the tests' image helpers: a `pytest` that cannot be imported first
    on the path must not stop it before it tries a JPEG."""
    blocker = tmp_path / "no-pytest"
    blocker.mkdir()
    (blocker / "pytest.py").write_text('raise ImportError("no pytest, as on the GPU machine")\n')
    path = os.pathsep.join(
        filter(None, [str(blocker), str(REPO_ROOT), os.environ.get("PYTHONPATH")])
    )
    lines = tmp_path / "lines.jsonl"
    done = subprocess.run(
        [sys.executable, "scripts/broken_jpegs.py", "--count", "2", "--lines", str(lines)],
        cwd=REPO_ROOT,
        env=os.environ | {"PYTHONPATH": path},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    written = read_lines(lines)
    assert STARTED in written[0] and written[1]["intact"]  # past its set-up, then decoding
