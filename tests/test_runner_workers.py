"""CLIP_RUNNER_WORKERS: several runner processes share the work (and the GPUs, where there are).

A real `bentoml serve` with two runner workers must start both, each with the model, and give
concurrent callers the same answers as the suite's one-worker server. On a machine with several
GPUs the workers must go round them.
"""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import Iterator

import httpx
import pytest

from clip_runner.cpu_quota import usable_cores
from clip_runner.cuda_check import RECORD
from tests.helpers import ServedBento, as_base64, photo_like, serve_tiny

CLASSES = [["cat", 1], ["dog", 0], ["a red car", 1], ["tree", 0]]


@pytest.fixture(scope="module")
def two_runners(tiny_stored_model, bentoml_home, tmp_path_factory) -> Iterator[ServedBento]:
    with serve_tiny(
        tiny_stored_model, bentoml_home, tmp_path_factory, "two-runners", CLIP_RUNNER_WORKERS="2"
    ) as server:
        yield server


def test_two_runner_workers_start_and_answer_as_one(two_runners, served):
    assert len(two_runners.runner_processes()) == 2
    # each worker loads the (random-weight) model and says so; /ping needs only one of them
    two_runners.wait_for_log(*(f"[service:clip_runner:{worker}] !!! SERVING" for worker in (1, 2)))
    # On CPU they share the cores: each runs at most its half at once (each had taken them all).
    layouts = re.findall(r"up to (\d+) pass\(es\) at once of (\d+) thread", two_runners.log())
    assert len(layouts) == 2
    share = max(1, usable_cores() // 2)
    assert all(int(passes) * int(threads) <= share for passes, threads in layouts), layouts
    bodies = [
        {"images": [as_base64(photo_like(48 + seed, 40, seed=seed))], "classes": CLASSES}
        for seed in range(16)
    ]

    async def burst(url: str) -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=url, timeout=60) as client:
            return await asyncio.gather(*(client.post("/invocations", json=b) for b in bodies))

    spread = asyncio.run(burst(two_runners.url))
    single = asyncio.run(burst(served.url))
    for got, expected in zip(spread, single, strict=True):
        assert got.status_code == 200 and expected.status_code == 200, got.text
        (answer,), (reference,) = got.json(), expected.json()
        assert answer["prompts"][:2] == reference["prompts"][:2]  # same classes, same order
        assert answer["prompts"][2] == pytest.approx(reference["prompts"][2], abs=1e-5)
        assert answer["classification"] == reference["classification"]


def test_runner_workers_go_round_the_gpus_the_supervisor_counted(
    tiny_stored_model, bentoml_home, tmp_path_factory
):
    """With two GPUs, four runner workers by default, each narrowed to its own GPU in turn.

    This machine has no GPU: what is stubbed is the driver's answer, as the supervisor records
    it for its workers (cuda_check.RECORD). The rest is real: the supervisor's default from it,
    BentoML's worker indices, its allocator kept off (it would give every worker the first GPU,
    and the workers, seeing another list than the one counted, would ask the driver again and
    find none), and each worker's choice before torch starts; here torch then serves on the CPU,
    and each worker's log says so beside the GPU it was given.
    """
    two_gpus = json.dumps({"gpus": 2, "CUDA_VISIBLE_DEVICES": None})  # counted with it unset
    unset = {"CUDA_VISIBLE_DEVICES": None}  # (the suite's servers have it "": no GPU)
    with serve_tiny(
        tiny_stored_model, bentoml_home, tmp_path_factory, "two-gpus", **unset, **{RECORD: two_gpus}
    ) as server:
        placed = [
            f"runner worker {worker} was given GPU {gpu} (CUDA_VISIBLE_DEVICES) of the 2 here, "
            "but serves on the CPU"
            for worker, gpu in zip(range(1, 5), "0101", strict=True)
        ]
        log = server.wait_for_log(*placed, within_s=120)
        assert len(server.runner_processes()) == 4
        assert "was to serve GPU" not in log
        body = {"images": [as_base64(photo_like(64, 48, seed=1))], "classes": CLASSES}
        answer = httpx.post(f"{server.url}/invocations", json=body, timeout=60)
        assert answer.status_code == 200, answer.text
