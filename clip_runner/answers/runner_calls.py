"""Calling the runner from an API worker: which failures mean "runner unavailable", and retries.

Both ways of calling it speak aiohttp over the runner's unix socket: the runner's wire format
(direct_runner.py, the default) and BentoML's dependency client (`CLIP_DIRECT_RUNNER_CALLS=off`,
and `describe`); both fail with the same exceptions.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from http import HTTPStatus
from typing import Any, TypeVar

import aiohttp
import bentoml
import httpx
import numpy as np

from clip_runner.metrics import RUNNER_CALL_IMAGES, RUNNER_CALL_SECONDS, RUNNER_CALL_TEXTS
from clip_runner.model.batching import GreedyBatcher, PassSlots, Rows
from clip_runner.model.model_facts import ModelFacts

logger = logging.getLogger(__name__)

# How a runner call fails when the runner is gone, slow, or refuses.
RUNNER_ERRORS = (
    aiohttp.ClientError,
    httpx.HTTPError,
    TimeoutError,
    bentoml.exceptions.BentoMLException,
)
T = TypeVar("T")

# Text passes one text call may carry (the runner's batcher splits it into passes). Each call
# costs both processes HTTP, (de)serialising and a thread hop (about 1.3 ms here), while the tiny
# model's text pass of 32 prompts takes about 2: a cold ensemble of 1,000 labels x 80 templates
# took 14.1-15.3 s in calls of one pass, 7.7-8.7 s in calls of up to four (2 cores). Images stay
# at one pass per call: their calls are as large as the requests merged into them.
TEXT_CALL_MAX_PASSES = 4
# What a call's passes beyond its first may add to the wait of the worker's other text requests,
# queued behind it. With ViT-B/32 on 2 cores (a pass of 32 prompts about 0.35 s), a one-prompt
# `/embed_texts` beside cold ensembles took p95 3.6-3.9 s in calls of four passes and 0.67-0.86 s
# in calls of one; the ensembles a median 20.5 s in calls of four, 22.3 in calls of one (README).
TEXT_CALL_EXTRA_WAIT_S = 0.02


def text_call_passes(text_pass_s: float) -> int:
    """Text passes per call: as many as fit TEXT_CALL_EXTRA_WAIT_S after the first, up to
    TEXT_CALL_MAX_PASSES. Where a pass is cheap (the tiny model, a GPU), the per-call cost is
    much of a pass and calls carry several; where it is costly (a large model on CPU), a call
    of one pass keeps the worker's other text requests from waiting behind several, at some
    cost to a cold ensemble's time. `text_pass_s` is the runner's warm-up timing (0, not
    timed: the most)."""
    if text_pass_s <= 0:
        return TEXT_CALL_MAX_PASSES
    return min(TEXT_CALL_MAX_PASSES, 1 + int(TEXT_CALL_EXTRA_WAIT_S / text_pass_s))


def runner_overloaded(error: BaseException) -> bool:
    """The runner answered 503: its queue bound (CLIP_MAX_LATENCY_MS) refused the call.

    BentoML's client raises its generic exception carrying the runner's status code.
    """
    return (
        isinstance(error, bentoml.exceptions.BentoMLException)
        and error.error_code == HTTPStatus.SERVICE_UNAVAILABLE
    )


def resilient(
    call: Callable[..., Awaitable[T]], attempt_timeout_s: float, encoder: str = "other"
) -> Callable[..., Awaitable[T]]:
    """A runner call that is tried twice when its connection fails or its answer never comes.

    A pooled connection can be gone when a call takes it (the runner restarted, or closed it
    idle), BentoML's client closes its pool under in-flight requests when it renews it
    ("Server disconnected"; runner.py makes that rare by keeping one pool), and in soak tests
    about one call in several thousand was never answered.
    Encoding is idempotent, so a second attempt is safe; the runner's own queue bound
    (CLIP_MAX_LATENCY_MS) keeps honest calls well inside `attempt_timeout_s`. A second attempt
    that times out says how long it waited (the caller's 503 repeats it).
    """

    async def call_twice(*args: object) -> T:
        with RUNNER_CALL_SECONDS.labels(encoder=encoder).time():
            try:
                return await asyncio.wait_for(call(*args), attempt_timeout_s)
            except (aiohttp.ClientConnectionError, TimeoutError) as exc:
                logger.warning(
                    "runner call failed (%s: %s); retrying once", type(exc).__name__, exc
                )
            try:
                return await asyncio.wait_for(call(*args), attempt_timeout_s)
            except TimeoutError:
                raise TimeoutError(
                    f"the model runner did not answer a second try within {attempt_timeout_s:g} s"
                ) from None

    return call_twice


def merged(
    call: Callable[[Rows], Awaitable[np.ndarray]],
    in_flight: int,
    max_rows: int,
    max_queue_wait_s: float,
    observe_rows: Callable[[int], None],
) -> Callable[[Rows], Awaitable[np.ndarray]]:
    """`call` (a runner method) shared by this API worker's concurrent requests.

    Every runner call costs both processes an HTTP exchange, (de)serialisation and BentoML's
    per-call layers: several ms of CPU, more than the tiny model's forward pass. So requests do
    what the runner's own batcher does: up to `in_flight` calls are under way at once
    (`calls_in_flight`); requests arriving meanwhile queue, and the next call takes the queued
    rows, split
    among the free call slots and at most `max_rows` (the runner's batch) each. One client
    alone is never held back; under load a call carries many requests.
    """

    async def run(rows: Rows, _threads: int) -> np.ndarray:
        observe_rows(len(rows))
        return await call(rows)

    slots = PassSlots(passes=in_flight, wide_threads=1, narrow_threads=1)
    return GreedyBatcher(run, max_rows, max_queue_wait_s, slots).submit


@dataclass(frozen=True)
class RunnerCalls:
    """The runner's encoders as one API worker calls them: retried once, and merged across
    the worker's concurrent requests."""

    encode_images: Callable[[np.ndarray], Awaitable[np.ndarray]]
    encode_jpegs: Callable[[list[bytes]], Awaitable[np.ndarray]]
    encode_tokens: Callable[[list[list[int]]], Awaitable[np.ndarray]]


def calls_in_flight(
    facts: ModelFacts, runner_workers: int, api_workers: int, configured: int = 0
) -> int:
    """Runner calls one API worker keeps under way at once: `configured` (CLIP_RUNNER_CALLS)
    when set, else the API workers' share of what the runner wants.

    The runner should always have one call more than it has passes, so a pass that ends finds
    the next batch there: with exactly one call per pass, ViT-B/32 on CPU fell from 0.9 to 0.79
    x the bare model (a lone call runs wide, on every thread, and holds the other back). Every
    call beyond that costs the runner and the API worker CPU beyond its images (HTTP, pickling,
    BentoML's layers, a thread hop: about 2.3 ms of the runner's per call here), so the API
    workers share that count rather than each keeping it:
    - on CPU rounding down (each keeps at least one), since the calls' CPU comes from the cores
      the model needs: with two API workers on 2 cores (the tiny model), one call each served
      262-334 requests/s against 248-259 with two and one (quick runs, BENCHMARKS.md);
    - on a GPU rounding up, so together they keep at least that many. There the runner
      processes' Python work is the limit: with each of 8 API workers keeping 3 calls, 64
      clients would make calls of about 3 images, each costing a runner's event loop a whole
      call; with one each, calls of about 8.
    """
    if configured:
        return configured
    wanted = facts.passes * runner_workers + 1
    if facts.device == "cuda":
        return -(-wanted // api_workers)
    return max(1, wanted // api_workers)


def runner_calls(
    runner: Any,
    facts: ModelFacts,
    attempt_s: float,
    workers: tuple[int, int],
    max_queue_wait_s: float,
    configured_in_flight: int = 0,
) -> RunnerCalls:
    """`runner` is BentoML's async client of CLIPRunner; `facts` its `describe()`; `workers`
    the (API, runner) worker counts; `configured_in_flight` CLIP_RUNNER_CALLS (0: by them)."""
    in_flight = calls_in_flight(facts, workers[1], workers[0], configured_in_flight)
    images = RUNNER_CALL_IMAGES.labels(sent_as="pixels").observe
    jpegs = RUNNER_CALL_IMAGES.labels(sent_as="jpeg").observe

    def merge(
        method: Callable, encoder: str, max_rows: int, observe: Callable[[int], None]
    ) -> Callable:
        call = resilient(method, attempt_s, encoder)
        return merged(call, in_flight, max_rows, max_queue_wait_s, observe)

    texts = RUNNER_CALL_TEXTS.observe
    max_texts = text_call_passes(facts.text_pass_s) * facts.max_text_batch
    return RunnerCalls(
        encode_images=merge(runner.encode_images, "image", facts.max_batch, images),
        encode_jpegs=merge(runner.encode_jpegs, "image", facts.max_batch, jpegs),
        encode_tokens=merge(runner.encode_tokens, "text", max_texts, texts),
    )


def forwards_jpegs(decode_jpegs_on: str, facts: ModelFacts) -> bool:
    """CLIP_DECODE: `runner` always forwards JPEG bytes, `api` never, `auto` where the runner
    has a GPU: the runner decodes them (Pillow in its threads, or nvJPEG where
    CLIP_RUNNER_JPEG_DECODER=nvjpeg) and the GPU resizes them, so the API workers only parse
    JSON and check headers. On CPU, decoding in the API workers keeps the runner's cores for the
    model; with Pillow the forwarded path is exactly as faithful either way."""
    if decode_jpegs_on == "auto":
        return facts.device == "cuda"
    return decode_jpegs_on == "runner"


def fast_preprocessing_note(fast_preprocessing: bool, forward_jpegs: bool) -> str | None:
    """What to tell a user of CLIP_PREPROCESS=fast whose JPEGs go to the runner: its reduced
    decode is the API workers' (Pillow's draft mode), so the JPEGs the runner decodes keep the
    reference's pixels, at full size; the option still reduces the other big images."""
    if not (fast_preprocessing and forward_jpegs):
        return None
    return (
        "CLIP_PREPROCESS=fast applies to the images the API workers decode: the JPEGs forwarded "
        "to the runner (CLIP_DECODE) are decoded there at full size, with the reference's pixels"
    )
