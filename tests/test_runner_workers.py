"""CLIP_RUNNER_WORKERS: several runner processes share the work (and a GPU, where there is one).

A real `bentoml serve` with two runner workers must start both, each with the model, and give
concurrent callers the same answers as the suite's one-worker server.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import httpx
import pytest

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
