"""Prometheus metrics of this project, shown on `/metrics` beside BentoML's own.

BentoML aggregates them across the API workers and the runner (multiprocess mode); outside a
server they are plain in-process metrics, so the library stays importable and testable.

prometheus_client itself: BentoML deprecated its `bentoml.metrics` wrapper, which only put off
importing prometheus_client until first use, so that it saw PROMETHEUS_MULTIPROC_DIR. BentoML
puts that variable in each worker's environment before starting it, so this import sees it too.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import psutil
from prometheus_client import Counter, Histogram
from prometheus_client.multiprocess import mark_process_dead

# Up to 512: a text call carries up to 4 text passes, 128 prompts each on a GPU.
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
SECONDS_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)

RUNNER_BATCH_IMAGES = Histogram(
    name="clip_runner_batch_images",
    documentation="Images per forward pass of the image encoder (cross-request batches)",
    buckets=BATCH_BUCKETS,
)
RUNNER_BATCH_TEXTS = Histogram(
    name="clip_runner_batch_texts",
    documentation="Prompts per forward pass of the text encoder",
    buckets=BATCH_BUCKETS,
)
RUNNER_INFERENCE_SECONDS = Histogram(
    name="clip_runner_inference_seconds",
    documentation="Time of one batched forward pass in the runner",
    labelnames=["encoder"],
    buckets=SECONDS_BUCKETS,
)
RUNNER_JPEG_DECODE_SECONDS = Histogram(
    name="clip_runner_jpeg_decode_seconds",
    documentation="Time one image pass of forwarded JPEGs spent decoding them and putting them "
    "on the device resized (part of clip_runner_inference_seconds; on a GPU the pixels' copies "
    "and the resize's kernels are only queued here, and run in the forward pass's time)",
    buckets=SECONDS_BUCKETS,
)
RUNNER_CALL_SECONDS = Histogram(
    name="clip_service_runner_call_seconds",
    documentation="Time an API worker waits on a runner call: queueing + batch + transfer",
    labelnames=["encoder"],
    buckets=SECONDS_BUCKETS,
)
RUNNER_CALL_IMAGES = Histogram(
    name="clip_service_runner_call_images",
    documentation="Images one runner call carried (an API worker merges concurrent requests "
    "into one call), by what was sent: decoded pixels, or JPEG bytes for the device to decode",
    labelnames=["sent_as"],
    buckets=BATCH_BUCKETS,
)
RUNNER_CALL_TEXTS = Histogram(
    name="clip_service_runner_call_texts",
    documentation="Prompts one runner call carried (after the text cache and merging)",
    buckets=BATCH_BUCKETS,
)
PREPROCESS_SECONDS = Histogram(
    name="clip_service_preprocess_seconds",
    documentation="Decode + resize + crop time of one image, in a worker thread",
    buckets=SECONDS_BUCKETS,
)
TEXT_CACHE_LOOKUPS = Counter(
    name="clip_service_text_cache_lookups",
    documentation="Prompts looked up in an API worker's embedding cache, by result: hit (cached), "
    "miss (encoded for this request), shared (another request was encoding it; awaited)",
    labelnames=["result"],
)
RUNNER_TEXT_CACHE_LOOKUPS = Counter(
    name="clip_runner_text_cache_lookups",
    documentation="Prompts the runner was sent, by result: hit (encoded already, most often for "
    "another API worker), miss (encoded for this call), shared (another call was encoding it)",
    labelnames=["result"],
)
LABEL_CACHE_LOOKUPS = Counter(
    name="clip_service_label_cache_lookups",
    documentation="Labels looked up in the API workers' cache of labels' embeddings ensembled "
    "over their templates (/classify, the toolkit shape), by result (hit or miss)",
    labelnames=["result"],
)

SERVICE_ERRORS = Counter(
    name="clip_service_errors",
    documentation="Error answers of the API service by error type (the `type` of the JSON "
    "error object: a 422 may be invalid_request, invalid_image or forbidden_url, a 503 "
    "overloaded, runner_unavailable or not_ready), and each failed line of a JSON Lines answer",
    labelnames=["type"],
)

# A worker's gauge files in multiprocess mode: `gauge_<mode>_<pid>.db`. Those of the `live*`
# modes count only while their process lives; an `all` gauge keeps one series per process.
GAUGE_FILE = re.compile(r"gauge_(?P<mode>live\w*|all)_(?P<pid>\d+)\.db")


def forget_dead_workers(directory: str | None = None) -> set[int]:
    """Drop the live gauges of workers that are gone; returns their process ids.

    BentoML marks a worker's gauges dead only from a destructor, which a worker killed
    (SIGKILL, the OOM killer) or crashed never runs: the requests it was answering stayed in
    `bentoml_service_request_in_progress` for good, and its per-process series (the last
    request's time) stayed on `/metrics`, one more each restart. Each worker calls this as it
    starts, so a replacement clears what the one it replaces left. Counters and histograms are
    kept: they hold the totals, dead workers' included.
    """
    folder = directory or os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    if not folder or not Path(folder).is_dir():
        return set()
    files = [(GAUGE_FILE.fullmatch(path.name), path) for path in Path(folder).iterdir()]
    dead = {
        int(found["pid"])
        for found, _ in files
        if found and not psutil.pid_exists(int(found["pid"]))
    }
    for pid in dead:
        mark_process_dead(pid, folder)  # the live* gauges
    for found, path in files:
        if found and found["mode"] == "all" and int(found["pid"]) in dead:
            path.unlink(missing_ok=True)
    return dead
