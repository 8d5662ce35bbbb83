"""CLIPRunner: the BentoML service that owns the model and batches encoding across requests.

One model copy per worker, loaded from the BentoML model store and warmed up before the worker
reports ready. Concurrent encoding calls (from all API workers) are merged into one forward pass
by this project's greedy batcher (batching.py) rather than BentoML's: its learned waits added
up to a second to every request after a burst of load.
"""

from __future__ import annotations

import dataclasses
import io
import logging
import os
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Annotated

import bentoml
import numpy as np
import torch
from bentoml.validators import ContentType
from PIL import Image

from clip_runner.bound_apis import bind_apis_once
from clip_runner.config import get_settings, runner_decode_threads
from clip_runner.gc_tuning import settle_after_loading
from clip_runner.gil_handover import hand_over_gil_after
from clip_runner.metrics import (
    RUNNER_BATCH_IMAGES,
    RUNNER_BATCH_TEXTS,
    RUNNER_INFERENCE_SECONDS,
    RUNNER_JPEG_DECODE_SECONDS,
)
from clip_runner.model.batching import GreedyBatcher, PassSlots, QueueWaitExceeded, in_executor
from clip_runner.model.cuda_graphs import ReplayedForward
from clip_runner.model.device_decode import DeviceJpegDecoder
from clip_runner.model.device_health import exits_when_device_breaks, halves_when_out_of_memory
from clip_runner.model.direct_calls import DirectCallsMiddleware
from clip_runner.model.encoding import ClipEncoder, pick_device
from clip_runner.model.model_source import load_served_clip
from clip_runner.model.pass_layout import pass_layout

logger = logging.getLogger("clip_runner")
settings = get_settings()
# The encoders' answer, with its media type stated: otherwise BentoML derives it from the
# return type's JSON schema, generated anew for every response (8.7% of the runner's CPU at
# load, py-spy). The type is the one BentoML derived.
Embeddings = Annotated[np.ndarray, ContentType("application/json")]


@bentoml.service(
    name="clip_runner",
    resources={"gpu": 1},
    # One process by default. On a GPU the runner's per-call Python work (HTTP, deserialising,
    # batching) limits throughput long before the GPU does; more workers share the one GPU,
    # each with its own copy of the model (BENCHMARKS.md, GPU section).
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
    tracing={"excluded_urls": ["/encode_images", "/encode_jpegs", "/encode_tokens", "/describe"]},
)
class CLIPRunner:
    """Encodes images (uint8 arrays or forwarded JPEGs) and prompts (token ids) into L2-normalised
    CLIP embeddings."""

    model_ref = bentoml.models.BentoModel(settings.model_tag)

    def __init__(self) -> None:
        if settings.runner_threads:
            torch.set_num_threads(settings.runner_threads)
        loaded = load_served_clip(self.model_ref, settings.model_dir)  # CLIP_MODEL_DIR or store
        device, dtype = pick_device()
        self.encoder = ClipEncoder(loaded.model, loaded.processor, device, dtype)
        facts = self.encoder.facts(loaded.tag, loaded.random_weights)
        layout = pass_layout(
            device.type == "cuda",
            torch.get_num_threads(),
            settings.runner_passes,
            settings.max_batch_size,
            settings.max_text_batch_size,
            compiled=settings.torch_compile,
        )
        self.jpeg_decoder = DeviceJpegDecoder(
            device,
            facts.shortest_edge,
            facts.crop_height,
            facts.crop_width,
            use_nvjpeg=settings.runner_jpeg_decoder == "nvjpeg",
            threads=runner_decode_threads(len(os.sched_getaffinity(0)), settings.runner_workers),
            passes=layout.passes,
        )
        if settings.torch_compile:
            self.encoder.compile_towers()
        if loaded.random_weights:
            logger.warning(
                "!!! SERVING %s, A MODEL WITH RANDOM WEIGHTS: its answers are meaningless. "
                "Import a real checkpoint with `python scripts/import_model.py` for real use. !!!",
                loaded.tag,
            )
        self._warm_up()
        if settings.cuda_graphs:
            self._replay_image_passes(layout.max_batch)
        self.model_facts = dataclasses.replace(
            facts,
            device=device.type,
            passes=layout.passes,
            max_batch=layout.max_batch,
            max_text_batch=layout.max_text_batch,
            jpeg_decoder=self.jpeg_decoder.name,
        )
        # One thread per concurrent pass and one PassSlots, shared by the three batchers.
        inference = ThreadPoolExecutor(
            max_workers=layout.passes, thread_name_prefix="clip-inference"
        )
        slots = PassSlots(layout.passes, torch.get_num_threads(), layout.threads_per_pass)
        max_wait_s = settings.max_latency_ms / 1000

        def batcher(encode: Callable[..., np.ndarray], max_rows: int) -> GreedyBatcher:
            # A CUDA context broken by one batch would fail every later one: the process then
            # exits to be restarted (device_health.py).
            guarded = exits_when_device_breaks(encode, device)
            return GreedyBatcher(in_executor(guarded, inference), max_rows, max_wait_s, slots)

        self.image_batcher = batcher(self._encode_image_batch, layout.max_batch)
        self.text_batcher = batcher(self._encode_token_batch, layout.max_text_batch)
        self.jpeg_batcher = batcher(self._encode_jpeg_batch, layout.max_batch)
        logger.info(
            "CLIP model %s ready on %s (%s, up to %d pass(es) at once of %d thread(s) (a lone pass "
            "gets all), batches up to %d images or %d prompts%s%s, forwarded JPEGs decoded by "
            "%s)",
            loaded.tag,
            device,
            dtype,
            layout.passes,
            layout.threads_per_pass,
            layout.max_batch,
            layout.max_text_batch,
            ", torch.compile" if settings.torch_compile else "",
            _replay_note(self.encoder.replayed),
            self.jpeg_decoder.name,
        )
        bind_apis_once(self)  # BentoML looks each API up per call (bound_apis.py)
        # The model, torch and transformers stay for the process's lifetime: kept out of garbage
        # collections, whose full passes otherwise stalled every call (gc_tuning.py).
        frozen = settle_after_loading()
        logger.info("runner: %d objects loaded at start kept out of garbage collection", frozen)
        hand_over_gil_after(settings.switch_interval_ms, "runner")

    def _warm_up(self) -> None:
        """Passes of each encoder and a JPEG decode, so the first request pays no lazy
        initialisation (nvJPEG's included).

        A compiled model also gets a batch of two: it specialises on size 1 and compiles a
        second, dynamic graph for larger batches.
        """
        height, width = self.encoder.crop_height, self.encoder.crop_width
        for batch in (1, 2) if settings.torch_compile else (1,):
            blank = np.zeros((batch, height, width, 3), dtype=np.uint8)
            self.encoder.encode_images(blank)
            self.encoder.encode_texts(["a photo of a cat"] * batch)
        jpeg = io.BytesIO()
        Image.new("RGB", (width, height)).save(jpeg, "JPEG")
        self.jpeg_decoder([jpeg.getvalue()])

    def _replay_image_passes(self, max_batch: int) -> None:
        """CLIP_CUDA_GRAPHS (on a GPU by default): record the image tower per batch bucket
        (cuda_graphs.py). A model that cannot be recorded is served as it is, with a warning,
        not refused."""
        try:
            self.encoder.replay_image_passes(max_batch)
        except RuntimeError as exc:
            logger.warning("CUDA graphs could not be recorded (%s): passes run eagerly", exc)
            return
        if not self.encoder.replayed.recorded:
            logger.warning(
                "CLIP_CUDA_GRAPHS=on without a GPU: nothing to record, image passes run eagerly "
                "through the same per-bucket staging (as the tests run it)"
            )

    def _encode_image_batch(self, pixels: np.ndarray, threads: int) -> np.ndarray:
        torch.set_num_threads(threads)  # under OpenMP, for this inference thread only
        RUNNER_BATCH_IMAGES.observe(len(pixels))
        with RUNNER_INFERENCE_SECONDS.labels(encoder="image").time():
            return halves_when_out_of_memory(self.encoder.encode_images)(pixels)

    def _encode_jpeg_batch(self, jpegs: list[bytes], threads: int) -> np.ndarray:
        torch.set_num_threads(threads)
        RUNNER_BATCH_IMAGES.observe(len(jpegs))
        with RUNNER_INFERENCE_SECONDS.labels(encoder="image").time():
            return halves_when_out_of_memory(self._decode_and_encode_jpegs)(jpegs)

    def _decode_and_encode_jpegs(self, jpegs: list[bytes]) -> np.ndarray:
        """Decoded and resized on the device, then encoded; a JPEG that did not decode gets a
        row of NaN (the API answers that image with a 422) and its batch goes on."""
        with RUNNER_JPEG_DECODE_SECONDS.time():
            crops, decoded = self.jpeg_decoder(jpegs)
        output = np.full((len(jpegs), self.model_facts.embedding_dim), np.nan, np.float32)
        if len(crops):
            output[np.flatnonzero(decoded)] = self.encoder.encode_pixels(crops)
        return output

    def _encode_token_batch(self, token_ids: list[list[int]], threads: int) -> np.ndarray:
        torch.set_num_threads(threads)
        RUNNER_BATCH_TEXTS.observe(len(token_ids))
        with RUNNER_INFERENCE_SECONDS.labels(encoder="text").time():
            return halves_when_out_of_memory(self.encoder.encode_token_ids)(token_ids)

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
        token limit each; the API workers tokenize) -> float32 (N, D)."""
        return await _bounded(self.text_batcher.submit(token_ids))

    @bentoml.api
    def describe(self) -> dict:
        """Facts the API service needs: tag, logit scale, image geometry, embedding size."""
        return self.model_facts.__dict__.copy()


def _replay_note(replayed: ReplayedForward | None) -> str:
    if replayed is None:
        return ""
    how = "CUDA graphs" if replayed.recorded else "eager passes (no GPU)"
    return f", image passes per batch bucket {list(replayed.buckets)} from {how}"


async def direct_call(method: str, rows: np.ndarray | list) -> np.ndarray:
    """An API worker's call in the wire format (direct_calls.py), answered by the API method of
    that name on this worker's runner: the method BentoML's endpoint calls for other callers."""
    return await getattr(bentoml.get_current_service(), method)(rows)


CLIPRunner.add_asgi_middleware(DirectCallsMiddleware, handler=direct_call)


async def _bounded(encoding: Awaitable[np.ndarray]) -> np.ndarray:
    """A request that queued past CLIP_MAX_LATENCY_MS is refused with 503 ("overloaded")."""
    try:
        return await encoding
    except QueueWaitExceeded as exc:
        raise bentoml.exceptions.ServiceUnavailable(f"the model's queue is full: {exc}") from exc
