"""CLIPRunner: the BentoML service that owns the model and batches encoding across requests.

One model copy per worker, loaded from the BentoML model store and warmed up before the worker
reports ready (model/engine.py: imported only when a runner worker starts, so this module, which
the supervisor and the API workers import to reach the runner, loads no torch). Concurrent
encoding calls (from all API workers) are merged into one forward pass by this project's greedy
batcher (batching.py) rather than BentoML's: its learned waits added up to a second to every
request after a burst of load.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Annotated, TypeVar

import bentoml
import numpy as np
from bentoml.validators import ContentType

from clip_runner.bound_apis import bind_apis_once
from clip_runner.config import get_settings
from clip_runner.cuda_check import usable_gpus
from clip_runner.gc_tuning import settle_after_loading
from clip_runner.gil_handover import hand_over_gil_after
from clip_runner.malloc_tuning import reuse_freed_memory
from clip_runner.metrics import RUNNER_TEXT_CACHE_LOOKUPS, forget_dead_workers
from clip_runner.model.batching import GreedyBatcher, PassSlots, QueueWaitExceeded, in_executor
from clip_runner.model.direct_calls import DirectCallsMiddleware
from clip_runner.model.embedding_cache import EmbeddingCache, first_misses, with_cached
from clip_runner.model.encodings_in_flight import EncodingsInFlight
from clip_runner.model.gpu_placement import BENTOML_GPU_ALLOCATION_OFF, place_worker
from clip_runner.model.model_source import ModelSourceError
from clip_runner.model.shutdown_order import (
    close_inherited_listeners,
    hold_sigterm_while,
    other_services_alive,
    stop_the_server,
)
from clip_runner.model.startup_phases import StartupPhases

logger = logging.getLogger("clip_runner")
settings = get_settings()
RUNNER_SERVICE_NAME = "clip_runner"
# The encoders' answer, with its media type stated: otherwise BentoML derives it from the
# return type's JSON schema, generated anew for every response (8.7% of the runner's CPU at
# load, py-spy). The type is the one BentoML derived.
Embeddings = Annotated[np.ndarray, ContentType("application/json")]
Encoded = TypeVar("Encoded")
# The runner workers choose their GPUs themselves (gpu_placement.py); BentoML's allocator, read
# by the supervisor when it starts them, would put them all on the first.
os.environ.setdefault(BENTOML_GPU_ALLOCATION_OFF, "1")


@bentoml.service(
    name=RUNNER_SERVICE_NAME,
    resources={"gpu": 1},
    # One process on CPU; two per GPU, each GPU's pair sharing it (gpu_placement.py): the
    # runner's per-call Python work (HTTP, deserialising, batching) limits a process long before
    # the GPU does (BENCHMARKS.md, GPU section). Each has its own copy of the model.
    workers=settings.runner_workers,
    traffic={"timeout": settings.request_timeout_s},
    # How API workers connect to this service. BentoML's client replaces its connection pool
    # every 100 requests / 300 s by default and closes the old pool with its requests still in
    # flight ("Server disconnected"): under load that cut about one runner call in four, each
    # then retried (runner_calls.py) after the runner had often encoded it already. One
    # long-lived pool instead; the retry stays for the rare real disconnect.
    runner_connection={"max_requests": 2**31 - 1, "max_age": 7 * 24 * 3600.0},
    # No access log line per runner call: the API service logs every request; these internal
    # calls (several per request under load) were noise in the log and CPU in the runner.
    logging={"access": {"enabled": False}},
    # Nor BentoML's HTTP metrics per internal call: the API service records each runner call's
    # duration and rows (clip_service_runner_call_*), and this project's runner metrics
    # (batches, inference time) are written by the code itself, so they stay on /metrics.
    metrics={"enabled": False},
    # Nor an OpenTelemetry span per internal call: BentoML's tracing middleware took 15% of the
    # runner's event loop at load (py-spy), spans that go nowhere unless an exporter is set. The
    # API service's span still covers each request, runner call included.
    tracing={
        "excluded_urls": [
            "/encode_images",
            "/encode_jpegs",
            "/encode_tokens",
            "/describe",
            "/tokenizer",
        ]
    },
)
class CLIPRunner:
    """Encodes images (uint8 arrays or forwarded JPEGs) and prompts (token ids) into L2-normalised
    CLIP embeddings."""

    model_ref = bentoml.models.BentoModel(settings.model_tag)

    def __init__(self) -> None:
        phases = StartupPhases()  # each step's time, logged once ready (startup_phases.py)
        # The API's port, which a stop must close (shutdown_order.py); not its own.
        close_inherited_listeners(sys.argv)
        # Before torch starts CUDA in this process: it reads CUDA_VISIBLE_DEVICES only then.
        worker = bentoml.server_context.worker_index
        gpu = place_worker(os.environ, usable_gpus(), worker)
        with phases.phase("torch and transformers imported"):
            # Here, not at the top: the supervisor and the API workers import this class to
            # reach the runner, and never load torch and transformers (engine.py).
            from clip_runner.model.engine import ServedModel

        try:
            self.model = ServedModel(self.model_ref, phases)
        except ModelSourceError as error:  # the checkpoint itself: no restart would load it
            stop_the_server(str(error))
            raise
        if gpu is not None:
            log_placement(worker, gpu, usable_gpus(), self.model.facts.device)
        layout = self.model.layout
        # One thread per concurrent pass and one PassSlots, shared by the three batchers.
        inference = ThreadPoolExecutor(
            max_workers=layout.passes, thread_name_prefix="clip-inference"
        )
        slots = PassSlots(layout.passes, self.model.torch_threads, layout.threads_per_pass)
        max_wait_s = settings.max_latency_ms / 1000

        def batcher(encode: Callable[..., np.ndarray], max_rows: int) -> GreedyBatcher:
            return GreedyBatcher(in_executor(encode, inference), max_rows, max_wait_s, slots)

        self.image_batcher = batcher(self.model.encode_images, layout.max_batch)
        self.text_batcher = batcher(self.model.encode_tokens, layout.max_text_batch)
        self.jpeg_batcher = batcher(self.model.encode_jpegs, layout.max_batch)
        # Prompts encoded lately and being encoded, by token ids, for every API worker's calls.
        self.text_cache: EmbeddingCache[tuple[int, ...]] = EmbeddingCache(
            settings.text_cache_size, RUNNER_TEXT_CACHE_LOOKUPS, misses_counted_elsewhere=True
        )
        self.texts_in_flight: EncodingsInFlight[tuple[int, ...]] = EncodingsInFlight(
            RUNNER_TEXT_CACHE_LOOKUPS
        )
        bind_apis_once(self)  # BentoML looks each API up per call (bound_apis.py)
        # The model, torch and transformers stay for the process's lifetime: kept out of garbage
        # collections, whose full passes otherwise stalled every call (gc_tuning.py).
        with phases.phase("garbage collector settled"):
            frozen = settle_after_loading()
        logger.info("runner: %d objects loaded at start kept out of garbage collection", frozen)
        hand_over_gil_after(settings.switch_interval_ms, "runner")
        reuse_freed_memory()  # each batch's buffers, not page faults (malloc_tuning.py)
        forget_dead_workers()  # the live gauges of a worker killed before this one (metrics.py)
        # Stopped with the API workers, it serves their last calls first (shutdown_order.py).
        hold_sigterm_while(lambda: other_services_alive(RUNNER_SERVICE_NAME))
        logger.info("runner %s", phases.line())

    @bentoml.api
    async def encode_images(self, pixels: np.ndarray) -> Embeddings:
        """uint8 (N, H, W, 3) images, already resized and cropped -> float32 (N, D)."""
        return await _bounded(self.image_batcher.submit(pixels))

    @bentoml.api
    async def encode_jpegs(self, jpegs: list[bytes]) -> Embeddings:
        """JPEG files -> float32 (N, D), decoded and resized on the model's device
        (device_decode.py); rows of NaN for JPEGs that did not decode."""
        return await _bounded(self.jpeg_batcher.submit(jpegs))

    @bentoml.api
    async def encode_tokens(self, token_ids: list[list[int]]) -> Embeddings:
        """Prompts' token ids (this model's tokenizer's, special tokens included, at most its
        token limit each; the API workers tokenize) -> float32 (N, D).

        Each API worker caches and shares only its own requests' prompts, so the same new
        prompts reaching several workers come here once from each, usually some passes apart.
        The runner answers those it encoded already from its own cache and awaits those being
        encoded (one chunk per call: the API workers send theirs in passes already). Tiny
        model, 2 API workers, 8 concurrent cold requests of 1,000 labels x 80 templates: 80,000
        prompts encoded in 17-18 s, where each worker had encoded them all (160,000, 23-32 s)."""
        if not token_ids:
            raise ValueError("nothing to encode")
        keys = [tuple(ids) for ids in token_ids]
        cached = self.text_cache.lookup(keys)
        missing = list(first_misses(keys, cached))
        if not missing:
            return np.stack(cached)

        async def encode(chunk: list[tuple[int, ...]]) -> np.ndarray:
            embeddings = await self.text_batcher.submit([list(ids) for ids in chunk])
            self.text_cache.store(chunk, embeddings)
            return embeddings

        fresh = await _bounded(self.texts_in_flight.embeddings(missing, encode, len(missing)))
        return with_cached(keys, cached, missing, fresh)

    @bentoml.api
    def describe(self) -> dict:
        """Facts the API service needs: tag, logit scale, image geometry, embedding size."""
        return self.model.facts.__dict__.copy()

    @bentoml.api
    def tokenizer(self) -> str:
        """The served model's Rust tokenizer, as its JSON: each API worker tokenizes prompts
        with a copy of it (answers/token_ids.py), and so never loads transformers."""
        return self.model.tokenizer_json


def log_placement(worker: int | None, gpu: str, gpus: int, device: str) -> None:
    """Says which of the machine's GPUs this runner worker serves, or that it could not keep to
    it: its torch could not use that GPU (it serves on the CPU; the warning before this says
    why), or CUDA started in this process before it chose (it then sees them all and serves
    the first)."""
    import torch

    if device != "cuda":
        logger.warning(
            "runner worker %s was given GPU %s (CUDA_VISIBLE_DEVICES) of the %d here, but "
            "serves on the CPU, far slower: see the warning above",
            worker,
            gpu,
            gpus,
        )
        return
    seen = torch.cuda.device_count()
    if seen != 1:
        logger.warning(
            "runner worker %s was to serve GPU %s alone, but CUDA had started in this process: "
            "it sees %d GPUs and serves the first, beside other workers",
            worker,
            gpu,
            seen,
        )
        return
    logger.info(
        "runner worker %s serves GPU %s (CUDA_VISIBLE_DEVICES) of the %d here", worker, gpu, gpus
    )


async def direct_call(method: str, rows: np.ndarray | list) -> np.ndarray:
    """An API worker's call in the wire format (direct_calls.py), answered by the API method of
    that name on this worker's runner: the method BentoML's endpoint calls for other callers."""
    return await getattr(bentoml.get_current_service(), method)(rows)


CLIPRunner.add_asgi_middleware(DirectCallsMiddleware, handler=direct_call)


async def _bounded(encoding: Awaitable[Encoded]) -> Encoded:
    """A request that queued past CLIP_MAX_LATENCY_MS is refused with 503 ("overloaded")."""
    try:
        return await encoding
    except QueueWaitExceeded as exc:
        raise bentoml.exceptions.ServiceUnavailable(f"the model's queue is full: {exc}") from exc
