"""Retrying runner calls: one more attempt after a dropped connection or a lost answer."""

from __future__ import annotations

import asyncio
import dataclasses

import aiohttp
import bentoml
import numpy as np
import pytest

from clip_runner.answers.runner_calls import (
    TEXT_CALL_EXTRA_WAIT_S,
    TEXT_CALL_MAX_PASSES,
    calls_in_flight,
    fast_preprocessing_note,
    forwards_jpegs,
    merged,
    resilient,
    runner_calls,
    runner_overloaded,
    text_call_passes,
)
from clip_runner.model.device_decode import NVJPEG, PILLOW
from clip_runner.model.model_facts import ModelFacts


class FlakyCall:
    """Fails (or hangs) on the first `bad` calls, then answers with the call count."""

    def __init__(self, bad: int, failure: str) -> None:
        self.bad, self.failure, self.calls = bad, failure, 0

    async def __call__(self, value: int) -> int:
        self.calls += 1
        if self.calls <= self.bad:
            if self.failure == "hang":
                await asyncio.sleep(10)
            raise aiohttp.ServerDisconnectedError()
        return value * 10


@pytest.mark.parametrize("failure", ["disconnect", "hang"])
def test_one_failure_is_retried(failure):
    call = FlakyCall(bad=1, failure=failure)
    assert asyncio.run(resilient(call, attempt_timeout_s=0.2)(4)) == 40
    assert call.calls == 2


@pytest.mark.parametrize(
    ("failure", "error", "says"),
    [
        ("disconnect", aiohttp.ServerDisconnectedError, None),
        ("hang", TimeoutError, "the model runner did not answer a second try within 0.2 s"),
    ],
)
def test_two_failures_are_reported(failure, error, says):
    """A runner that hangs twice is reported with how long the second try waited."""
    call = FlakyCall(bad=2, failure=failure)
    with pytest.raises(error, match=says):
        asyncio.run(resilient(call, attempt_timeout_s=0.2)(4))
    assert call.calls == 2


def test_other_errors_are_not_retried():
    calls = 0

    async def refuses(_: int) -> int:
        nonlocal calls
        calls += 1
        raise ValueError("bad input")

    with pytest.raises(ValueError):
        asyncio.run(resilient(refuses, attempt_timeout_s=1)(1))
    assert calls == 1


@pytest.mark.parametrize(
    ("error", "overloaded"),
    [
        (bentoml.exceptions.ServiceUnavailable("queue full"), True),
        # What BentoML's client raises for the runner's 503 answer.
        (bentoml.exceptions.BentoMLException("Error making request: 503", error_code=503), True),
        (bentoml.exceptions.BentoMLException("Error making request: 500", error_code=500), False),
        (aiohttp.ServerDisconnectedError(), False),
        (TimeoutError(), False),
    ],
)
def test_only_the_runners_503_means_overloaded(error, overloaded):
    assert runner_overloaded(error) is overloaded


def test_merged_calls_carry_concurrent_requests_and_hand_back_each_its_rows():
    calls: list[int] = []
    observed: list[int] = []

    async def runner_call(rows: np.ndarray) -> np.ndarray:
        calls.append(len(rows))
        await asyncio.sleep(0.05)  # one call in flight while the others queue
        return rows * 10

    async def scenario() -> list[np.ndarray]:
        encode = merged(runner_call, 1, 64, 10, observed.append)
        return await asyncio.gather(*(encode(np.full((1, 2), i)) for i in range(12)))

    results = asyncio.run(scenario())
    assert [int(r[0, 0]) for r in results] == [i * 10 for i in range(12)]
    assert sum(calls) == 12 and len(calls) < 12 and calls == observed


class SlowRunner:
    """A runner's encoders that take a while and record how many calls overlap."""

    def __init__(self) -> None:
        self.active, self.peak = 0, 0

    async def encode(self, rows: list) -> np.ndarray:
        self.active += 1
        self.peak = max(self.peak, self.active)
        await asyncio.sleep(0.05)
        self.active -= 1
        return np.zeros((len(rows), 1))

    encode_images = encode_jpegs = encode_tokens = encode


def test_merged_calls_keep_up_to_in_flight_calls_going():
    runner = SlowRunner()

    async def scenario() -> None:
        encode = merged(runner.encode, 3, 2, 10, lambda rows: None)
        await asyncio.gather(*(encode(["text"]) for _ in range(12)))

    asyncio.run(scenario())
    assert runner.peak == 3


@pytest.mark.parametrize(("configured", "peak"), [(0, 1), (2, 2)])
def test_runner_calls_in_flight_follow_clip_runner_calls(configured, peak):
    """Two API workers and one runner on CPU keep one call each; CLIP_RUNNER_CALLS=2, two."""
    facts = ModelFacts("clip:x", 16, 100.0, 224, 224, 224, 77, True, "cpu", passes=2)
    runner = SlowRunner()
    calls = runner_calls(runner, facts, 5.0, (2, 1), 10.0, configured_in_flight=configured)

    async def scenario() -> None:
        await asyncio.gather(*(calls.encode_tokens([[49406, i, 49407]]) for i in range(8)))

    asyncio.run(scenario())
    assert runner.peak == peak


def merged_call_sizes(facts: ModelFacts) -> dict[str, list[int]]:
    """The sizes of the runner calls that 40 concurrent one-prompt requests and 7 one-image
    requests make, through `runner_calls` with one call in flight."""
    sizes: dict[str, list[int]] = {"texts": [], "images": []}

    class RecordingRunner:
        async def encode_tokens(self, token_ids: list[list[int]]) -> np.ndarray:
            sizes["texts"].append(len(token_ids))
            await asyncio.sleep(0.05)
            return np.zeros((len(token_ids), 1))

        async def encode_images(self, pixels: np.ndarray) -> np.ndarray:
            sizes["images"].append(len(pixels))
            await asyncio.sleep(0.05)
            return np.zeros((len(pixels), 1))

        encode_jpegs = encode_images

    calls = runner_calls(RecordingRunner(), facts, 5.0, (1, 1), 10.0, configured_in_flight=1)

    async def scenario() -> None:
        texts = (calls.encode_tokens([[49406, i, 49407]]) for i in range(40))
        images = (calls.encode_images(np.zeros((1, 2, 2, 3), np.uint8)) for _ in range(7))
        await asyncio.gather(*texts, *images)

    asyncio.run(scenario())
    assert sum(sizes["texts"]) == 40 and sum(sizes["images"]) == 7
    return sizes


def batches_of_2_images_or_6_prompts(text_pass_s: float) -> ModelFacts:
    """A runner's facts with small batches, whose full text pass took `text_pass_s`."""
    facts = ModelFacts("clip:x", 16, 100.0, 224, 224, 224, 77, True)
    return dataclasses.replace(facts, max_batch=2, max_text_batch=6, text_pass_s=text_pass_s)


def test_text_calls_merge_up_to_their_passes_and_image_calls_up_to_the_image_batch():
    """Prompts cost a fraction of an image, so where a text pass is cheap, merged text calls
    take more rows (TEXT_CALL_MAX_PASSES x the runner's `max_text_batch`) than image calls
    (`max_batch`)."""
    sizes = merged_call_sizes(batches_of_2_images_or_6_prompts(text_pass_s=0.002))
    assert max(sizes["texts"]) == TEXT_CALL_MAX_PASSES * 6
    assert max(sizes["images"]) == 2


def test_a_costly_text_pass_makes_text_calls_of_one_pass():
    """Where a pass takes longer than the extra wait a call may add (a large model on CPU),
    a call of several passes would hold the worker's other text requests back by several."""
    sizes = merged_call_sizes(batches_of_2_images_or_6_prompts(text_pass_s=0.4))
    assert max(sizes["texts"]) == 6


def test_text_call_passes_fit_the_extra_wait_after_the_first():
    assert text_call_passes(0.0) == TEXT_CALL_MAX_PASSES  # not timed
    assert text_call_passes(0.001) == TEXT_CALL_MAX_PASSES
    assert text_call_passes(TEXT_CALL_EXTRA_WAIT_S / 2.5) == 3
    assert text_call_passes(TEXT_CALL_EXTRA_WAIT_S) == 2
    assert text_call_passes(TEXT_CALL_EXTRA_WAIT_S * 1.01) == 1
    assert text_call_passes(0.4) == 1


def test_calls_in_flight_keep_one_call_waiting_at_the_runner_shared_by_the_api_workers():
    """The API workers share the runner's passes plus one: on CPU rounding down (at least one
    each), on a GPU rounding up (together at least that many); CLIP_RUNNER_CALLS overrides."""
    cpu = ModelFacts("clip:x", 16, 100.0, 224, 224, 224, 77, True, "cpu", passes=2)
    assert calls_in_flight(cpu, runner_workers=1, api_workers=1) == 3
    assert calls_in_flight(cpu, runner_workers=1, api_workers=2) == 1
    assert calls_in_flight(cpu, runner_workers=2, api_workers=2) == 2
    assert calls_in_flight(cpu, runner_workers=1, api_workers=8) == 1  # never none
    gpu = dataclasses.replace(cpu, device="cuda", passes=1)
    assert calls_in_flight(gpu, runner_workers=2, api_workers=1) == 3
    assert calls_in_flight(gpu, runner_workers=2, api_workers=2) == 2  # 4 in all, >= 3
    assert calls_in_flight(gpu, runner_workers=2, api_workers=8) == 1  # 8 in all
    for facts in (cpu, gpu):
        assert calls_in_flight(facts, runner_workers=2, api_workers=8, configured=4) == 4


@pytest.mark.parametrize(
    ("device", "decoder", "auto_forwards"),
    [
        ("cuda", PILLOW, True),  # the default on a GPU: the runner's threads, the GPU resize
        ("cuda", NVJPEG, True),  # CLIP_RUNNER_JPEG_DECODER=nvjpeg
        ("cpu", PILLOW, False),  # the runner's cores are the model's
    ],
)
def test_jpegs_are_forwarded_where_the_runner_has_a_gpu(device, decoder, auto_forwards):
    facts = ModelFacts("clip:x", 16, 100.0, 224, 224, 224, 77, True, device, jpeg_decoder=decoder)
    assert forwards_jpegs("auto", facts) is auto_forwards
    assert forwards_jpegs("runner", facts) is True
    assert forwards_jpegs("api", facts) is False


def test_fast_preprocessing_is_said_to_leave_forwarded_jpegs_exact():
    """CLIP_PREPROCESS=fast reduces what the API workers decode; the runner's JPEGs keep the
    reference's pixels (a review found the option silently doing nothing for them)."""
    note = fast_preprocessing_note(fast_preprocessing=True, forward_jpegs=True)
    assert note is not None and "CLIP_DECODE" in note and "full size" in note
    assert fast_preprocessing_note(fast_preprocessing=True, forward_jpegs=False) is None
    assert fast_preprocessing_note(fast_preprocessing=False, forward_jpegs=True) is None
