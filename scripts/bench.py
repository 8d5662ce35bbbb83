"""Benchmark harness: the served bento vs the bare model (the limit) vs the original's design.

    python scripts/bench.py                        # everything, ~16 minutes on 2 CPU cores
    python scripts/bench.py --quick                # fewer requests per scenario, a smoke run
    python scripts/bench.py --runner-workers 1 2 4 # only the runner-process sweep (for GPUs)

It imports a `--random-vit-b32` model (ViT-B/32 shapes; speed does not depend on weight values)
into a temporary BentoML home, serves it with `bentoml serve` on a free loopback port, drives it
with an async load generator (bounded by request count and time), and measures in the same run:
the bare model's batched throughput in-process (the limit) and the baseline server in
`benchmarks/` (per-request model calls, no batching, no caching). Results go to
`benchmarks/results.json` (rewritten after every scenario, so a cut-short run keeps its rows),
`benchmarks/throughput.png`, `benchmarks/summary.md` and BENCHMARKS.md's table (its GPU section
when CUDA is present; `scripts/gpu_bench.sh` runs it there).
"""

from __future__ import annotations

import argparse
import asyncio
import atexit
import base64
import contextlib
import dataclasses
import datetime
import functools
import io
import json
import math
import os
import pickle
import platform
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import httpx
import numpy as np
import psutil
import torch
from PIL import Image

from clip_runner.answers.zero_shot import zero_shot_probabilities
from clip_runner.model.pillow_pixels import EXIF_ORIENTATION
from clip_runner.model.resample import resized_size
from clip_runner.model.startup_phases import STARTUP_LINE_PREFIX
from clip_runner.web.schemas import SEED_CLASSES

REPO = Path(__file__).resolve().parent.parent
LOAD_GENERATOR = REPO / "scripts" / "load_generator.py"
sys.path.insert(0, str(REPO))  # tests.hard_images: the fidelity set the tests use too
from tests.hard_images import photo  # noqa: E402 (needs the line above)

FIFTY_CLASSES = [[f"object number {i}", i % 2] for i in range(50)]
# Rounds of bare model / service / baseline, taking turns, behind the headline ratios.
HEADLINE_ROUNDS = 3


# ---------------------------------------------------------------- synthetic test images


def jpeg_base64(
    width: int, height: int, seed: int, orientation: int | None = None, progressive: bool = False
) -> str:
    """A photo-like JPEG (quality 88) in base64; with `orientation`, tagged with that EXIF
    orientation (how to turn the stored pixels for display); `progressive`, as many web
    images are stored (mozjpeg's default)."""
    image = photo(width, height, seed)
    save_args: dict[str, object] = {"progressive": progressive}
    if orientation is not None:
        exif = image.getexif()
        exif[EXIF_ORIENTATION] = orientation
        save_args["exif"] = exif.tobytes()
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=88, **save_args)
    return base64.b64encode(buffer.getvalue()).decode()


def seed_request_bodies(
    classes: list | None = SEED_CLASSES, progressive: bool = False
) -> list[bytes]:
    """Four request bodies of the seed's shape: one 640x480 JPEG each (`progressive`: stored
    so) and the seed's classes (no classes: the `/embed_images` shape)."""
    return [
        json.dumps(
            {
                "images": [jpeg_base64(640, 480, seed, progressive=progressive)],
                **({"classes": classes} if classes else {}),
            }
        ).encode()
        for seed in range(4)
    ]


# A phone's sensor is wider than tall; held level, upside down, upright or the other way up, it
# stores the same 4032x3024 pixels and tags how to turn them.
PHONE_ORIENTATIONS = (1, 3, 6, 8)


def phone_photo_bodies() -> list[bytes]:
    """Four seed requests of one 12-MP photo each as a phone stores it (4032x3024, one of
    `PHONE_ORIENTATIONS` each)."""
    return [
        json.dumps(
            {"images": [jpeg_base64(4032, 3024, seed, orientation)], "classes": SEED_CLASSES}
        ).encode()
        for seed, orientation in enumerate(PHONE_ORIENTATIONS)
    ]


# ---------------------------------------------------------------- servers


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class NeverReady(TimeoutError):
    """A server that was still starting when wait_ready gave up on it."""


def wait_ready(url: str, process: subprocess.Popen, timeout_s: float = 240) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"server exited with {process.returncode}")
        try:
            if httpx.get(f"{url}/ping", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise NeverReady(f"{url} not ready after {timeout_s} s")


@contextmanager
def server(
    command: list[str],
    env: dict[str, str],
    port: int,
    log: Path,
    cpus: set[int] | None = None,
    cwd: Path = REPO,
) -> Iterator[tuple[str, int]]:
    """Start a server process (own session; on `cpus` only, its children too) in `cwd` (a
    checkout of this repository), yield (url, pid), stop it with SIGTERM."""
    with open(log, "wb") as out:
        process = subprocess.Popen(
            command,
            cwd=cwd,
            env={**os.environ, **env},
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            preexec_fn=(lambda: os.sched_setaffinity(0, cpus)) if cpus else None,
        )
    url = f"http://127.0.0.1:{port}"
    try:
        try:
            wait_ready(url, process)
        except (RuntimeError, TimeoutError):
            # On a remote machine the log is all there is to go on: show why it did not start.
            print("".join(log.read_text(errors="replace").splitlines(True)[-60:]), flush=True)
            raise
        yield url, process.pid
    finally:
        stop_tree(process)


def stop_tree(process: subprocess.Popen, grace_s: float = 10) -> None:
    """SIGTERM to the server's process group, then SIGKILL to every process of its tree still
    there after `grace_s`. BentoML starts its workers in process groups of their own, and a
    server stopped while starting up (a run interrupted by gpu_bench.sh's timeout) ignored
    SIGTERM, workers and all: left running, they would skew a resumed run on the same machine.
    """
    try:
        processes = tree(process.pid)
    except psutil.NoSuchProcess:  # it exited (a failed start)
        processes = []
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, 15)
    _, alive = psutil.wait_procs(processes, timeout=grace_s)
    for survivor in alive:
        with contextlib.suppress(psutil.NoSuchProcess):
            survivor.kill()
    with contextlib.suppress(ProcessLookupError):  # and any it started after the snapshot
        os.killpg(process.pid, 9)
    psutil.wait_procs(alive, timeout=grace_s)  # SIGKILL lands asynchronously
    process.wait()


def checkout_first(checkout: Path, python_path: str) -> str:
    """PYTHONPATH with `checkout` ahead of what it held: on the GPU machine that holds the
    carried wheels (gpu_bench.sh), which the server needs too."""
    return os.pathsep.join([str(checkout), *filter(None, python_path.split(os.pathsep))])


def bento_server(
    home: Path,
    tag: str,
    log: Path,
    cpus: set[int] | None = None,
    checkout: Path = REPO,
    **env: str,
):
    """`bentoml serve` of the service in `checkout` (this repository, or another commit's
    worktree: its own modules first on the path, whatever this venv installed)."""
    port = free_port()
    full_env = {
        "BENTOML_HOME": str(home),
        "CLIP_MODEL_TAG": tag,
        "CLIP_PORT": str(port),
        "BENTOML_DO_NOT_TRACK": "true",
        "PYTHONPATH": checkout_first(checkout, os.environ.get("PYTHONPATH", "")),
        **env,
    }
    command = [sys.executable, "-m", "bentoml", "serve", "service:ClipService"]
    return server([*command, "--host", "127.0.0.1"], full_env, port, log, cpus, checkout)


def baseline_server(model_dir: Path, log: Path):
    port = free_port()
    command = [
        sys.executable,
        "benchmarks/baseline_server.py",
        "--model-dir",
        str(model_dir),
        "--port",
        str(port),
    ]
    return server(command, {"PYTHONPATH": str(REPO)}, port, log)


# ---------------------------------------------------------------- load generation


@dataclass
class Scenario:
    name: str
    bodies: list[bytes]
    images_per_request: int
    concurrency: int
    route: str = "/invocations"
    profile_gil: bool = False  # py-spy over the window (drive_parallel's `gil_profile_to`)


# The service's histograms behind a window's "where the time went" figures, by short name.
HISTOGRAMS = {
    "request": "bentoml_service_request_duration_seconds",  # in the API, per request
    "preprocess": "clip_service_preprocess_seconds",  # the API's image work, per image
    "call": "clip_service_runner_call_seconds",  # a runner call as the API waits for it
    "call_images": "clip_service_runner_call_images",
    "pass": "clip_runner_inference_seconds",  # a runner batch (device decode included)
    "decode": "clip_runner_jpeg_decode_seconds",  # the device decode's part of a JPEG batch
    "pass_images": "clip_runner_batch_images",
    "pass_texts": "clip_runner_batch_texts",
}


def histogram_totals(metrics_text: str, route: str) -> dict[str, tuple[float, float]]:
    """Each of `HISTOGRAMS`' (sum, count) over all its labels in a /metrics page; the request
    time only for `route` (not /ping or /metrics)."""
    totals = {}
    for short, name in HISTOGRAMS.items():
        route_only = f'{{[^}}]*endpoint="{re.escape(route)}"[^}}]*}}'
        labels = route_only if short == "request" else "(?:{[^}]*})?"
        sums, counts = (
            sum(float(v) for v in re.findall(rf"^{name}_{part}{labels} (\S+)$", metrics_text, re.M))
            for part in ("sum", "count")
        )
        totals[short] = (sums, counts)
    return totals


def metric_totals(url: str, route: str) -> dict[str, tuple[float, float]]:
    return histogram_totals(httpx.get(f"{url}/metrics", timeout=10).text, route)


def where_time_went(
    before: dict[str, tuple[float, float]], after: dict[str, tuple[float, float]], seconds: float
) -> dict[str, float | None]:
    """A window's means from two `histogram_totals`: what a request spent in the API, its
    images' preprocessing there, a runner call as the API waited for it and the forward pass
    inside (with the device decode of forwarded JPEGs, also given alone), so a slow figure says
    where to look. None where the window had none of that (no preprocessing when JPEGs go to
    the device, no device decode when they do not)."""

    def mean(short: str, scale: float = 1000.0) -> float | None:
        total = after[short][0] - before[short][0]
        count = after[short][1] - before[short][1]
        return round(scale * total / count, 2) if count else None

    return {
        "api_ms_per_request": mean("request"),
        "preprocess_ms_per_image": mean("preprocess"),
        "runner_call_ms": mean("call"),
        "forward_pass_ms": mean("pass"),
        "decode_ms_per_pass": mean("decode"),
        # Merging in the API worker: how many requests' images one runner call carried.
        "images_per_runner_call": mean("call_images", 1.0),
        "mean_runner_batch": mean("pass_images", 1.0),
        "mean_text_batch": mean("pass_texts", 1.0),
        # Forward passes in progress on average (1.0: one pass always running).
        "model_busy": round((after["pass"][0] - before["pass"][0]) / seconds, 3),
    }


def tree(pid: int) -> list[psutil.Process]:
    root = psutil.Process(pid)
    return [root, *root.children(recursive=True)]


def process_role(process: psutil.Process, root_pid: int) -> str:
    """What a server process does: the supervisor (or the baseline's one process), the runner
    (the model), or an API worker."""
    if process.pid == root_pid:
        return "server"
    try:
        return "runner" if "clip_runner" in " ".join(process.cmdline()) else "api"
    except psutil.NoSuchProcess:  # a worker that exited (and was restarted) meanwhile
        return "exited"


def cpu_seconds(process: psutil.Process) -> float:
    try:
        return sum(process.cpu_times()[:2])
    except psutil.NoSuchProcess:
        return 0.0


async def drive(
    url: str, pid: int, scenario: Scenario, max_requests: int, max_seconds: float, has_metrics: bool
) -> dict:
    """Closed-loop load: `concurrency` clients, each sending its next request on an answer."""
    latencies: list[float] = []
    errors = 0
    sent = 0
    processes = tree(pid)
    cpu_before = {p.pid: cpu_seconds(p) for p in processes}
    peak_rss = 0.0
    totals_before = metric_totals(url, scenario.route) if has_metrics else {}
    deadline = time.monotonic() + max_seconds

    async def client_loop(session: aiohttp.ClientSession, worker: int) -> None:
        nonlocal errors, sent
        index = worker
        while sent < max_requests and time.monotonic() < deadline:
            sent += 1
            body = scenario.bodies[index % len(scenario.bodies)]
            index += scenario.concurrency
            started = time.monotonic()
            async with session.post(
                scenario.route, data=body, headers={"Content-Type": "application/json"}
            ) as response:
                await response.read()
            if response.status != 200:  # an error is no answer: neither in rates nor latencies
                errors += 1
                continue
            latencies.append(time.monotonic() - started)

    async def sample_rss() -> None:
        nonlocal peak_rss
        while True:
            rss = sum(p.memory_info().rss for p in processes if p.is_running()) / 2**20
            peak_rss = max(peak_rss, rss)
            await asyncio.sleep(0.25)

    sampler = asyncio.ensure_future(sample_rss())
    client_cpu_before = time.process_time()
    started = time.monotonic()
    # aiohttp rather than httpx: at GPU rates httpx's client alone took a whole core.
    async with aiohttp.ClientSession(
        base_url=url,
        connector=aiohttp.TCPConnector(limit=scenario.concurrency + 4),
        timeout=aiohttp.ClientTimeout(total=120),
    ) as session:
        await asyncio.gather(*(client_loop(session, w) for w in range(scenario.concurrency)))
    duration = time.monotonic() - started
    sampler.cancel()
    cores_by_role: dict[str, float] = {}
    api_worker_cores = []
    for process in processes:
        role = process_role(process, pid)
        used = (cpu_seconds(process) - cpu_before[process.pid]) / duration
        cores_by_role[role] = cores_by_role.get(role, 0.0) + used
        if role == "api":
            api_worker_cores.append(round(used, 3))
    quantiles = statistics.quantiles(latencies, n=100) if len(latencies) > 1 else [0] * 99
    result = {
        "scenario": scenario.name,
        "concurrency": scenario.concurrency,
        "requests": len(latencies),
        "errors": errors,
        "requests_per_s": round(len(latencies) / duration, 2),
        "images_per_s": round(len(latencies) * scenario.images_per_request / duration, 2),
        "p50_ms": round(quantiles[49] * 1000),
        "p95_ms": round(quantiles[94] * 1000),
        "p99_ms": round(quantiles[98] * 1000),
        "server_cpu_cores": round(sum(cores_by_role.values()), 2),
        # Where the server's CPU went: supervisor ("server"), API workers, runner.
        "cpu_cores_by_process": {role: round(cores, 3) for role, cores in cores_by_role.items()},
        # One entry per API worker: near-equal when connections spread over them.
        "api_worker_cores": sorted(api_worker_cores),
        "server_peak_rss_mb": round(peak_rss),
        # Near 1.0 the load generator (one Python process) limits the figure, not the server.
        "client_cpu_cores": round((time.process_time() - client_cpu_before) / duration, 3),
    }
    if has_metrics:
        totals_after = metric_totals(url, scenario.route)
        result |= where_time_went(totals_before, totals_after, duration)
    return result


# Scenarios of at most this many bodies on `/invocations` have their answers under load
# checked against the same requests' answers at rest (`answers_at_rest`).
CHECKED_MAX_BODIES = 16


def answers_at_rest(url: str, scenario: Scenario) -> list[list[dict] | None] | None:
    """Each body's answer, one request at a time with the server otherwise idle: what the load
    generator compares the answers under load with (load_generator.py). None for a scenario not
    checked (another route, or bodies each sent once, as uncached prompts are); None for a
    body not answered 200."""
    if scenario.route != "/invocations" or len(scenario.bodies) > CHECKED_MAX_BODIES:
        return None
    answers: list[list[dict] | None] = []
    for body in scenario.bodies:
        response = httpx.post(
            f"{url}{scenario.route}",
            content=body,
            headers={"Content-Type": "application/json"},
            timeout=120,
        )
        answers.append(response.json() if response.status_code == 200 else None)
    return answers


def checked_answers(outcomes: list[dict]) -> dict:
    """The load processes' checks of their answers, together (none where unchecked)."""
    checked = [outcome for outcome in outcomes if "answers_checked" in outcome]
    if not checked:
        return {}
    return {
        "answers_checked": sum(outcome["answers_checked"] for outcome in checked),
        "largest_probability_change": max(
            outcome["largest_probability_change"] for outcome in checked
        ),
        "classification_changes": sum(outcome["classification_changes"] for outcome in checked),
    }


def drive_parallel(
    url: str,
    pid: int,
    scenario: Scenario,
    seconds: float,
    client_cpus: set[int],
    gil_profile_to: Path | None = None,
    check_answers: bool = True,
) -> dict:
    """Like `drive`, from one load-generator process per client core (all pinned to the client
    cores, never the server's), so the
    load generator is not the limit at GPU rates; reports its own CPU too. The window runs from
    the moment every load process is ready to the last one's end (`time.monotonic` is one clock
    for all processes on Linux). With `gil_profile_to`, py-spy samples the server over the
    window (scripts/gil_profile.py) into that file, and the row says where its GIL was held.
    With `check_answers`, where the scenario is checked (`answers_at_rest`), the row also says
    how far its answers under load moved from the same requests' answers at rest
    (`checked_answers`)."""
    from scripts import gil_profile

    processes = max(1, min(len(client_cpus), scenario.concurrency))
    shares = [
        scenario.concurrency // processes + (i < scenario.concurrency % processes)
        for i in range(processes)
    ]
    cpus = ",".join(str(cpu) for cpu in sorted(client_cpus))
    references = answers_at_rest(url, scenario) if check_answers else None
    with tempfile.NamedTemporaryFile(suffix=".pickle") as bodies:
        pickle.dump((scenario.bodies, references), bodies)
        bodies.flush()
        workers = [
            subprocess.Popen(
                [sys.executable, str(LOAD_GENERATOR), url, scenario.route, bodies.name]
                + [str(share), str(seconds), str(sum(shares[:i])), str(scenario.concurrency)]
                + [cpus],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                text=True,
            )
            for i, share in enumerate(shares)
        ]
        try:
            for worker in workers:
                if worker.stdout.readline().strip() != "ready":
                    raise RuntimeError(f"a load process failed to start (exit {worker.wait()})")
            server_processes = tree(pid)
            cpu_before = {p.pid: cpu_seconds(p) for p in server_processes}
            totals_before = metric_totals(url, scenario.route)
            started = time.monotonic()
            for worker in workers:
                worker.stdin.write("go\n")
                worker.stdin.flush()
            profiled: dict = {}
            spy = None
            if gil_profile_to is not None:
                try:
                    spy = gil_profile.start(pid, seconds, gil_profile_to, client_cpus)
                except FileNotFoundError as exc:
                    profiled["gil_profile_error"] = str(exc)
            outcomes = [
                json.loads(worker.communicate(timeout=seconds + 180)[0]) for worker in workers
            ]
            if spy is not None:
                roles = {process.pid: process_role(process, pid) for process in server_processes}
                try:
                    profiled["gil_profile"] = gil_profile.finish(
                        spy, gil_profile_to, seconds, roles
                    )
                except RuntimeError as exc:
                    profiled["gil_profile_error"] = str(exc)
        finally:  # on an error, no load process is left behind
            for worker in workers:
                worker.kill()
                worker.wait()
    duration = max(outcome["ended"] for outcome in outcomes) - started
    cpu_after = {p.pid: cpu_seconds(p) for p in server_processes}
    latencies = [latency for outcome in outcomes for latency in outcome["latencies"]]
    cores_by_role: dict[str, float] = {}
    runner_worker_cores = []
    for process in server_processes:
        role = process_role(process, pid)
        used = (cpu_after[process.pid] - cpu_before[process.pid]) / duration
        cores_by_role[role] = cores_by_role.get(role, 0.0) + used
        if role == "runner":
            runner_worker_cores.append(round(used, 3))
    totals_after = metric_totals(url, scenario.route)
    quantiles = statistics.quantiles(latencies, n=100) if len(latencies) > 1 else [0] * 99
    return (
        {
            "name": scenario.name,
            "concurrency": scenario.concurrency,
            "requests": len(latencies),
            "errors": sum(outcome["errors"] for outcome in outcomes),
            "requests_per_s": round(len(latencies) / duration, 2),
            "images_per_s": round(len(latencies) * scenario.images_per_request / duration, 2),
            # To the microsecond: the targets are judged on these (10.04 ms is not 10).
            "p50_ms": round(quantiles[49] * 1000, 3),
            "p95_ms": round(quantiles[94] * 1000, 3),
            "p99_ms": round(quantiles[98] * 1000, 3),
            "server_cpu_cores": round(sum(cores_by_role.values()), 2),
            "cpu_cores_by_process": {
                role: round(cores, 3) for role, cores in cores_by_role.items()
            },
            "api_workers": sum(process_role(process, pid) == "api" for process in server_processes),
            # One entry per runner worker: near-equal when the API workers' calls spread over
            # them (answers/direct_runner.calls_per_connection); a GPU's runner Python is its limit.
            "runner_worker_cores": sorted(runner_worker_cores),
            "load_generator_processes": processes,
            "client_cpu_cores": round(sum(outcome["cpu_s"] for outcome in outcomes) / duration, 3),
        }
        | checked_answers(outcomes)
        | where_time_went(totals_before, totals_after, duration)
        | profiled
    )


# ---------------------------------------------------------------- in-process measurements


def device_name() -> str:
    if torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    return "CPU"


def cpu_name() -> str:
    """The host CPU as /proc/cpuinfo names it (family and model too: cloud hosts often say only
    "AMD EPYC") and the vector instructions torch uses on it. Hosts of the same name differ:
    two runs a day apart on "AMD EPYC" found Pillow's decode + resize and the bare model 1.1 to
    1.7 x as fast in the second while the server's Python work sped up less, so a ratio from
    one host does not carry to another (BENCHMARKS.md)."""
    fields: dict[str, str] = {}
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            fields.setdefault(key.strip(), value.strip())
            if not line.strip():
                break  # the first processor's block is enough
    return (
        f"{fields.get('model name', platform.processor() or 'unknown CPU')}, family "
        f"{fields.get('cpu family', '?')} model {fields.get('model', '?')}, torch on "
        f"{torch.backends.cpu.get_cpu_capability()}"
    )


BARE_BATCHES = (1, 8, 16, 32)
GPU_BATCHES = (64, 128, 256)
# Batches timed from pixels already on the device too (`BareModel.round`): a GPU's best batch is
# among them, and the upload matters most there.
RESIDENT_BATCHES = (32, *GPU_BATCHES)
# Two forward passes at once, each with half the torch threads (CPU only): on 2 cores this beat
# one pass with both threads by 5-28% (no OpenMP barrier shared across the cores), so the limit
# has to include it.
TWO_PASS_BATCHES = (8, 16)


def two_passes_at_once(encode, pixels: np.ndarray, threads_each: int, window_s: float) -> float:
    """Images/s of two threads each running back-to-back passes with `threads_each` threads."""
    counts = [0, 0]
    started = time.monotonic()

    def loop(lane: int) -> None:
        torch.set_num_threads(threads_each)  # per thread under OpenMP: this lane only
        while time.monotonic() - started < window_s:
            encode(pixels)
            counts[lane] += len(pixels)

    lanes = [threading.Thread(target=loop, args=(lane,)) for lane in (0, 1)]
    for lane in lanes:
        lane.start()
    for lane in lanes:
        lane.join()
    return sum(counts) / (time.monotonic() - started)


class BareModel:
    """The bare image encoder in this process, as the runner builds it (uint8 in, same device).

    Measured in rounds, each giving every configuration a turn, so a burst of load from
    elsewhere on a shared machine hits every one alike rather than one.
    """

    def __init__(
        self,
        model_dir: Path,
        replayed: bool = False,
        dtype_choice: str = "auto",
        resident: bool | None = None,
    ) -> None:
        """`dtype_choice`: CLIP_DTYPE's value (the runner's default dtype for the device, or an
        opt-in such as bfloat16). `resident`: also time the larger batches from pixels already
        on the device (by default on a GPU only, see `round`)."""
        from transformers import CLIPModel

        from clip_runner.model.encoding import ClipEncoder, pick_device
        from clip_runner.model.store import load_processor

        model = CLIPModel.from_pretrained(model_dir, attn_implementation="sdpa")
        # As the runner does: CUDA fp16 when present, else CPU fp32, unless told otherwise.
        device, dtype = pick_device(dtype_choice=dtype_choice)
        # Waiting for the GPU by polling (CUDA's default), not asleep as the runner waits
        # (device_wait.py): the limit at its fastest, a few microseconds sooner per pass.
        self.encoder = ClipEncoder(model, load_processor(model_dir), device, dtype, spin_waits=True)
        # A GPU's best batch is larger than a CPU's: try up to 256 there.
        self.batches = BARE_BATCHES + (GPU_BATCHES if device.type == "cuda" else ())
        if replayed:  # CLIP_CUDA_GRAPHS=on, as the runner runs it
            self.encoder.replay_image_passes(max(self.batches))
        self.pixels = np.random.default_rng(0).integers(
            0, 255, (max(self.batches), 224, 224, 3), dtype=np.uint8
        )
        self.threads = torch.get_num_threads()
        self.two_passes = device.type == "cpu" and self.threads >= 2
        self.resident = None
        if resident if resident is not None else device.type == "cuda":
            from clip_runner.model.device_wait import to_device

            pixels = torch.from_numpy(self.pixels[: max(self.batches)])
            self.resident = to_device(pixels, device).permute(0, 3, 1, 2)
        for batch in self.batches:
            self.encoder.encode_images(self.pixels[:batch])  # warm

    def round(self, window_s: float = 4) -> dict[str, float]:
        """Images/s of each configuration, `window_s` seconds each: one pass at a time with all
        torch threads at each batch size, and (CPU) two passes at once."""
        throughput = {}
        torch.set_num_threads(self.threads)  # this thread's count; the lanes below set their own
        for batch in self.batches:
            images, started = 0, time.monotonic()
            while time.monotonic() - started < window_s:
                self.encoder.encode_images(self.pixels[:batch])
                images += batch
            throughput[f"batch{batch}"] = images / (time.monotonic() - started)
        # The same passes from pixels already on the device: the batches above upload theirs
        # from pageable memory each pass (on an H200 some milliseconds of a batch of 256, which
        # the runner overlaps: pinned memory, queued copies). The limit is the faster of the two.
        for batch in [
            b for b in RESIDENT_BATCHES if b in self.batches and self.resident is not None
        ]:
            on_device = self.resident[:batch]
            self.encoder.encode_pixels(on_device)  # warm
            images, started = 0, time.monotonic()
            while time.monotonic() - started < window_s:
                self.encoder.encode_pixels(on_device)
                images += batch
            throughput[f"resident_batch{batch}"] = images / (time.monotonic() - started)
        for batch in TWO_PASS_BATCHES if self.two_passes else ():
            throughput[f"two_passes_batch{batch}"] = two_passes_at_once(
                self.encoder.encode_images, self.pixels[:batch], self.threads // 2, window_s
            )
        return throughput


def batched_best(throughput: dict[str, float]) -> tuple[str, float]:
    """The fastest batched configuration (batch 1 is the unbatched reference, not a limit)."""
    return max(
        ((name, value) for name, value in throughput.items() if name != "batch1"),
        key=lambda item: item[1],
    )


def limit_of(rounds: list[dict[str, float]]) -> dict:
    """Each configuration's median over the rounds, and the limit: the best batched median.

    Not batch 32's: on 2 CPU cores batch 8 or 16 has run as fast as or faster than 32 (cache
    pressure), and two passes at once faster than either.
    """
    result = {"torch_threads": torch.get_num_threads(), "device": device_name()}
    medians = {name: statistics.median(r[name] for r in rounds) for name in rounds[0]}
    for name, value in medians.items():
        result[f"{name}_images_per_s"] = round(value, 2)
    single_pass = {name: value for name, value in medians.items() if name.startswith("batch")}
    result["best_single_pass"], single = batched_best(single_pass)
    result["single_pass_limit_images_per_s"] = round(single, 2)
    result["best"], best = batched_best(medians)
    result["batched_limit_images_per_s"] = round(best, 2)
    result["rounds"] = len(rounds)
    return result


def bare_model_limit(model_dir: Path, rounds: int = 3) -> dict:
    """The bare model's limit from `rounds` back-to-back rounds (no server running)."""
    bare = BareModel(model_dir)
    return limit_of([bare.round() for _ in range(rounds)])


def seed_prompt_embeddings(encoder) -> np.ndarray:
    """The seed request's six prompts, encoded: what the probabilities are taken over."""
    return encoder.encode_texts([f"a photo of a {name}" for name, _ in SEED_CLASSES])


def embedding_distances(
    ours: np.ndarray, theirs: np.ndarray, text: np.ndarray, our_text: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Per row of two sets of unit image embeddings: the largest change of any probability over
    `text` at logit scale 100 (the issue's measure), and the cosine. `our_text`: the prompts'
    embeddings `ours` are scored against where they come from another model (another dtype)."""
    moved = zero_shot_probabilities(
        ours, text if our_text is None else our_text, 100.0
    ) - zero_shot_probabilities(theirs, text, 100.0)
    return np.abs(moved).max(axis=1), (ours * theirs).sum(axis=1)


def preprocessing_fidelity(model_dir: Path) -> dict:
    """Each preprocessing path against CLIPImageProcessor on the hard-image set (tests/
    hard_images.py: stripes of 2-11 px both ways, checkerboards, fabric, noise, text, photos,
    extreme aspect ratios; PNG, and JPEG at 4:2:0, with the colour images at 4:2:2 and 4:4:4
    too): the largest change of any probability over the seed's six prompts at logit scale 100,
    the lowest embedding cosine, which image, and ms per image.
    Every path's pixels go through the same encoder one image at a time, so only the
    preprocessing differs: on a GPU the fp16 kernels cuBLAS picks can change with the batch
    size, and at logit scale 100 their rounding alone could approach the 1e-3 bound (so the
    JPEG-only device paths, 20 images, were not comparable with a reference batch of 40).
    The device path is measured twice: its decoder called for one JPEG at a time, and for
    batches as the runner calls it (one nvJPEG call decodes a whole batch)."""
    from transformers import CLIPModel

    from clip_runner.images.loading import ImageGeometry, prepare_image
    from clip_runner.model.device_decode import NVJPEG, DeviceJpegDecoder
    from clip_runner.model.encoding import ClipEncoder, pick_device
    from clip_runner.model.pass_layout import GPU_MAX_BATCH
    from clip_runner.model.store import load_processor
    from tests.hard_images import encoded_set, is_jpeg

    processor = load_processor(model_dir)
    device, dtype = pick_device()
    encoder = ClipEncoder(CLIPModel.from_pretrained(model_dir), processor, device, dtype)
    geometry = ImageGeometry(encoder.shortest_edge, encoder.crop_height, encoder.crop_width)
    blobs = encoded_set()

    def clip_processor(blob: bytes) -> np.ndarray:
        image = Image.open(io.BytesIO(blob)).convert("RGB")
        values = processor.image_processor(
            images=image, do_rescale=False, do_normalize=False, return_tensors="np"
        )["pixel_values"][0]
        return values.transpose(1, 2, 0).round().astype(np.uint8)

    def one_at_a_time(prepare: Callable[[bytes], np.ndarray]) -> Callable:
        return lambda chosen: np.stack([prepare(blob) for blob in chosen])

    def on_device(decoder: DeviceJpegDecoder, batch: int = 1) -> Callable:
        """The decoder's crops, `batch` JPEGs per call: the runner decodes its batches (up
        to GPU_MAX_BATCH) in one call, one nvJPEG batch call, which may not give the pixels
        that a call for one JPEG gives."""

        def prepare(chosen: list[bytes]) -> np.ndarray:
            crops = []
            for start in range(0, len(chosen), batch):
                decoded, ok = decoder(chosen[start : start + batch])
                assert all(ok), "a JPEG of the hard set did not decode"
                crops.append(decoded.permute(0, 2, 3, 1).cpu().numpy())
            return np.concatenate(crops)

        return prepare

    decoder = DeviceJpegDecoder(device, *dataclasses.astuple(geometry), use_nvjpeg=True)
    # A decoder of its own, so that jpegs_refused_by_nvjpeg counts the one-at-a-time path's.
    batched = DeviceJpegDecoder(device, *dataclasses.astuple(geometry), use_nvjpeg=True)
    pillow = DeviceJpegDecoder(device, *dataclasses.astuple(geometry))
    device_path = f"device path ({decoder.name} on {device.type}, JPEG only"
    paths = {
        "CLIPImageProcessor": (one_at_a_time(clip_processor), False),
        "default (reference)": (
            one_at_a_time(lambda b: prepare_image(b, 0, geometry, 10**9)),
            False,
        ),
        "CLIP_PREPROCESS=fast": (
            one_at_a_time(lambda b: prepare_image(b, 0, geometry, 10**9, fast=True)),
            False,
        ),
        f"{device_path})": (on_device(decoder), True),
        f"{device_path}, batches of {GPU_MAX_BATCH})": (on_device(batched, GPU_MAX_BATCH), True),
    }
    if decoder.name != pillow.name:  # on a GPU: the default (Pillow) beside the opt-in nvJPEG
        pillow_path = f"device path (pillow on {device.type}, JPEG only"
        paths[f"{pillow_path})"] = (on_device(pillow), True)
        paths[f"{pillow_path}, batches of {GPU_MAX_BATCH})"] = (
            on_device(pillow, GPU_MAX_BATCH),
            True,
        )
    text = seed_prompt_embeddings(encoder)

    def compared(embeddings: np.ndarray, theirs: np.ndarray, names: list[str]) -> dict:
        changes, cosines = embedding_distances(embeddings, theirs, text)
        return {
            "images": len(names),
            "max_probability_change_scale_100": round(float(changes.max()), 5),
            "worst_image": names[int(changes.argmax())],
            "min_cosine": round(float(cosines.min()), 6),
            "worst_cosine_image": names[int(cosines.argmin())],
        }

    results: dict = {"images": len(blobs), "paths": {}}
    reference = None
    for path, (prepare, jpeg_only) in paths.items():
        chosen = [(name, blob) for name, blob in blobs if not jpeg_only or is_jpeg(blob)]
        names = [name for name, _ in chosen]
        started = time.monotonic()
        pixels = prepare([blob for _, blob in chosen])
        elapsed_ms = (time.monotonic() - started) * 1000 / len(chosen)
        embeddings = np.concatenate([encoder.encode_images(row[None]) for row in pixels])
        if reference is None:
            reference = dict(zip(names, embeddings, strict=True))
            results["clip_processor_ms_per_image"] = round(elapsed_ms, 1)
            # Not preprocessing: the same pixels as one batch against one at a time, what
            # batching alone moves (on a GPU, fp16 kernels picked by batch size).
            results["same_pixels_batched"] = compared(
                encoder.encode_images(pixels), embeddings, names
            )
            continue
        theirs = np.stack([reference[name] for name in names])
        results["paths"][path] = {
            "ms_per_image": round(elapsed_ms, 1),
            **compared(embeddings, theirs, names),
        }
    if decoder.name == NVJPEG:  # refused images got Pillow's pixels: their rows are not nvJPEG's
        results["jpegs_refused_by_nvjpeg"] = decoder.refused_by_nvjpeg
    return results


def dtype_fidelity(model_dir: Path, dtype_choice: str) -> dict:
    """The model in `dtype_choice` (CLIP_DTYPE, an opt-in) against the default dtype, on the
    hard-image set's default pixels, one image at a time: each side's probabilities over its own
    dtype's prompt embeddings, as a server in that dtype answers. The same pixels; only the
    forward passes differ."""
    from clip_runner.model.encoding import pick_device

    return arithmetic_fidelity(
        model_dir, pick_device(dtype_choice=dtype_choice), pick_device(dtype_choice="auto")
    )


def fold_fidelity(model_dir: Path) -> dict:
    """The CPU's default arithmetic (float32, the pixels' normalisation folded into the first
    layer) against float64 with the pixels normalised as CLIPImageProcessor does, standing in
    for exact arithmetic: how far float rounding alone, the fold's included, moves the answers
    of a direct CLIPProcessor + CLIPModel computation."""
    cpu = torch.device("cpu")
    return arithmetic_fidelity(model_dir, (cpu, torch.float32), (cpu, torch.float64))


def arithmetic_fidelity(
    model_dir: Path,
    ours: tuple[torch.device, torch.dtype],
    theirs: tuple[torch.device, torch.dtype],
) -> dict:
    """The model on `ours` (device, dtype) against `theirs`, on the hard-image set's default
    pixels, one image at a time, each side's probabilities over its own prompt embeddings."""
    from transformers import CLIPModel

    from clip_runner.images.loading import ImageGeometry, prepare_image
    from clip_runner.model.encoding import ClipEncoder
    from clip_runner.model.store import load_processor
    from tests.hard_images import encoded_set

    processor = load_processor(model_dir)
    blobs = encoded_set()
    pixels: list[np.ndarray] = []
    answers = []
    for device, dtype in (ours, theirs):
        encoder = ClipEncoder(CLIPModel.from_pretrained(model_dir), processor, device, dtype)
        if not pixels:  # the same pixels for both: the processor's geometry, not the dtype's
            geometry = ImageGeometry(encoder.shortest_edge, encoder.crop_height, encoder.crop_width)
            pixels = [prepare_image(blob, 0, geometry, 10**9) for _, blob in blobs]
        started = time.monotonic()
        images = np.concatenate([encoder.encode_images(row[None]) for row in pixels])
        ms_per_image = (time.monotonic() - started) * 1000 / len(pixels)
        answers.append((images, seed_prompt_embeddings(encoder), ms_per_image, str(dtype)))
    (our_images, our_text, our_ms, our_dtype), (their_images, their_text, their_ms, their_dtype) = (
        answers
    )
    changes, cosines = embedding_distances(our_images, their_images, their_text, our_text)
    names = [name for name, _ in blobs]
    return {
        "dtype": our_dtype.removeprefix("torch."),
        "against": their_dtype.removeprefix("torch."),
        "images": len(names),
        "ms_per_image_batch_1": round(our_ms, 1),
        "against_ms_per_image_batch_1": round(their_ms, 1),
        "max_probability_change_scale_100": float(f"{changes.max():.3g}"),
        "worst_image": names[int(changes.argmax())],
        "min_cosine": round(float(cosines.min()), 9),
        "worst_cosine_image": names[int(cosines.argmin())],
    }


def device_resize_exactness(model_dir: Path) -> dict:
    """The torch resize on the model's device (float32 byte planes, device_resample.py) against
    CLIPImageProcessor's Pillow resize, pixel for pixel, on the hard-image set decoded by
    Pillow, so that only the resize differs: no pixel may differ, on a GPU as on the CPU."""
    from clip_runner.model.device_resample import resize_and_crop
    from clip_runner.model.encoding import pick_device, size_value
    from clip_runner.model.store import load_processor
    from tests.hard_images import hard_images

    image_processor = load_processor(model_dir).image_processor
    shortest_edge = size_value(image_processor.size, "shortest_edge")
    device = pick_device()[0]
    differing, pixels, worst = 0, 0, None
    for name, image in hard_images():
        rgb = image.convert("RGB")
        theirs = image_processor(
            images=rgb, do_rescale=False, do_normalize=False, return_tensors="np"
        )["pixel_values"][0]
        on_device = torch.from_numpy(np.array(rgb)).permute(2, 0, 1).to(device)
        ours = resize_and_crop(on_device, shortest_edge, *theirs.shape[1:]).cpu().numpy()
        wrong = int((ours != theirs.round().astype(np.uint8)).sum())
        differing, pixels = differing + wrong, pixels + ours.size
        worst = name if wrong and worst is None else worst
    return {"device": str(device), "pixels": pixels, "differing": differing, "first_off": worst}


# ---------------------------------------------------------------- reporting


def write_plot(results: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    for label, prefix in (("service", "service seed"), ("baseline", "baseline seed")):
        pattern = re.compile(rf"^{prefix} c\d+$")
        rows = sorted(
            (r for r in results if pattern.match(r["name"])), key=lambda r: r["concurrency"]
        )
        xs = [r["concurrency"] for r in rows]
        left.plot(xs, [r["images_per_s"] for r in rows], marker="o", label=label)
        right.plot(xs, [r["p95_ms"] for r in rows], marker="o", label=label)
    left.set(xlabel="concurrent clients", ylabel="images/s", title="Throughput (seed request)")
    right.set(xlabel="concurrent clients", ylabel="p95 latency (ms)", title="p95 latency")
    for axis in (left, right):
        axis.set_xscale("log", base=2)
        axis.grid(alpha=0.3)
        axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=110)


def markdown_table(results: list[dict]) -> str:
    header = (
        "| scenario | clients | requests | errors | images/s | req/s | p50 ms | p95 ms | "
        "p99 ms | mean runner batch | server CPU cores | server peak RSS MB |"
    )
    lines = [header, "|" + "---|" * 12]
    for r in results:
        lines.append(
            f"| {r['name']} | {r['concurrency']} | {r['requests']} | {r['errors']} | "
            f"{r['images_per_s']} | {r['requests_per_s']} | {r['p50_ms']} | {r['p95_ms']} | "
            f"{r['p99_ms']} | {shown(r.get('mean_runner_batch'))} | {r['server_cpu_cores']} | "
            f"{r['server_peak_rss_mb']} |"
        )
    return "\n".join(lines)


def update_benchmarks_md(block: str, section: str) -> None:
    """Replace the text between `<!-- {section}:start -->` and its end marker in BENCHMARKS.md."""
    path = REPO / "BENCHMARKS.md"
    start, end = f"<!-- {section}:start -->", f"<!-- {section}:end -->"
    text = path.read_text() if path.exists() else ""
    if start not in text:
        text += f"\n{start}\n{end}\n"
    before, rest = text.split(start, 1)
    _, after = rest.split(end, 1)
    path.write_text(f"{before}{start}\n{block}\n{end}{after}")


def write_gpu_report(results: Path) -> None:
    """`--gpu-report`: BENCHMARKS.md's GPU section from a GPU run's gpu-targets.json. A smoke
    run's (no GPU) is printed instead: written, its CPU figures would replace the GPU results."""
    payload = json.loads(results.read_text())
    report = gpu_report(payload, results.as_posix())
    if payload.get("model") == SMOKE_RUN_MODEL:
        print(report)
        print(f"{results} is a smoke run: BENCHMARKS.md is left as it is", file=sys.stderr)
        return
    update_benchmarks_md(report, "bench-gpu-targets")


# ---------------------------------------------------------------- main


def bare_only(out: Path) -> int:
    """The bare model's limit and the preprocessing fidelity, without a store or a server."""
    from clip_runner.model.store import build_random_clip

    with tempfile.TemporaryDirectory(prefix="clip-bare-") as scratch:
        model_dir = Path(scratch)
        model, processor = build_random_clip(tiny=False)
        model.save_pretrained(model_dir)
        processor.save_pretrained(model_dir)
        payload = {
            "limit": bare_model_limit(model_dir),
            "fidelity": preprocessing_fidelity(model_dir),
        }
    out.mkdir(parents=True, exist_ok=True)
    (out / "results-bare.json").write_text(json.dumps(payload, indent=1))
    print(json.dumps(payload, indent=1))
    return 0


@functools.cache
def bench_home() -> Path:
    """One temporary BentoML home per run: BentoML reads its home once, when first imported, so
    every model of the run must be saved to (and served from) the same one."""
    home = Path(tempfile.mkdtemp(prefix="clip-bench-"))
    os.environ["BENTOML_HOME"] = str(home)
    # Its ViT-B/32 takes 0.6 GB: gone when the run ends, as the servers it fed are by then.
    atexit.register(shutil.rmtree, home, ignore_errors=True)
    return home


def import_random_model(tiny: bool = False) -> tuple[Path, str, Path]:
    """A temporary BentoML home holding a random-weight ViT-B/32 (or the tiny test model):
    (home, tag, model dir)."""
    home = bench_home()
    import bentoml

    from clip_runner.model.store import build_random_clip, save_clip

    name = "tiny" if tiny else "vit-b32"
    print(f"importing a random-weight {name} model into", home, flush=True)
    stored = save_clip(*build_random_clip(tiny=tiny), source=f"random:{name}", random_weights=True)
    return home, str(stored.tag), Path(bentoml.models.get(stored.tag).path)


def measure(
    url: str, pid: int, scenario: Scenario, max_requests: int, max_seconds: float, metrics: bool
) -> dict:
    """One scenario's row, after a short warm-up (caches, allocator, batcher training)."""
    warm = Scenario(scenario.name, scenario.bodies, scenario.images_per_request, 2, scenario.route)
    asyncio.run(drive(url, pid, warm, 4, 30, False))
    row = asyncio.run(drive(url, pid, scenario, max_requests, max_seconds, metrics))
    row["name"] = scenario.name
    if row["errors"]:  # a rate of refusals is no speed: nothing is written from such a run
        raise RuntimeError(
            f"{scenario.name}: {row['errors']} answers were not 200 (and {row['requests']} "
            "were); see the server's log"
        )
    return row


def median_row(rows: list[dict]) -> dict:
    """The round with the median throughput (lower middle for an even count), whole, so its
    latencies belong to the same round; the other rounds' throughputs ride along."""
    ranked = sorted(rows, key=lambda row: row["images_per_s"])
    return {
        **ranked[(len(ranked) - 1) // 2],
        "rounds_images_per_s": [r["images_per_s"] for r in rows],
    }


def runner_worker_sweep(out: Path, counts: list[int], max_requests: int, max_seconds: float) -> int:
    """Seed and embedding load against servers with 1, 2, ... runner workers (one GPU shared).

    On a GPU the single runner process's per-call Python work, not the GPU, sets the ceiling;
    this shows how far more runner processes lift it. Rows go to `runner-workers.json`.
    """
    home, tag, model_dir = import_random_model()
    limit = bare_model_limit(model_dir)
    print(json.dumps(limit), flush=True)
    seed_bodies = seed_request_bodies()
    embed_bodies = seed_request_bodies(classes=None)
    scenarios = [
        *(Scenario(f"seed c{c}", seed_bodies, 1, c) for c in (8, 32, 64)),
        Scenario("embed_images c64", embed_bodies, 1, 64, "/embed_images"),
    ]
    payload = {
        "limit": limit,
        "api_workers": os.environ.get("CLIP_API_WORKERS", "default"),
        "rows": [],
    }
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        for count in counts:
            log = Path(tmp) / f"workers{count}.log"
            with bento_server(home, tag, log, CLIP_RUNNER_WORKERS=str(count)) as (url, pid):
                for scenario in scenarios:
                    row = measure(url, pid, scenario, max_requests, max_seconds, True)
                    row["runner_workers"] = count
                    payload["rows"].append(row)
                    print(json.dumps(row), flush=True)
                    (out / "runner-workers.json").write_text(json.dumps(payload, indent=1))
    return 0


def decode_and_resize(source: str, edge: int = 224) -> np.ndarray:
    """Plain Pillow, the way CLIPImageProcessor prepares an image: base64 decode, decode, RGB,
    bicubic resize of the shortest side, center crop."""
    image = Image.open(io.BytesIO(base64.b64decode(source))).convert("RGB")
    size = resized_size(*image.size, edge)
    image = image.resize(size, Image.Resampling.BICUBIC)
    left, top = (size[0] - edge) // 2, (size[1] - edge) // 2
    return np.asarray(image.crop((left, top, left + edge, top + edge)))


def pillow_rate(sources: list[str], window_s: float = 6) -> float:
    """Images/s of `decode_and_resize` on one thread per core (Pillow releases the GIL while it
    decodes and resamples): the image work a server must do, with nothing around it."""
    threads = os.cpu_count() or 1
    counts = [0] * threads
    started = time.monotonic()

    def loop(lane: int) -> None:
        index = lane
        while time.monotonic() - started < window_s:
            decode_and_resize(sources[index % len(sources)])
            index += threads
            counts[lane] += 1

    lanes = [threading.Thread(target=loop, args=(lane,)) for lane in range(threads)]
    for lane in lanes:
        lane.start()
    for lane in lanes:
        lane.join()
    return sum(counts) / (time.monotonic() - started)


def cpu_ms_per_image(model_dir: Path, sources: list[str], window_s: float = 2) -> dict:
    """CPU ms per image, on one thread, of plain Pillow's work and of the model's (normalising
    the pixels and the forward pass, batch 8): the work no server can avoid, and so the highest
    ratio to Pillow's rate a server could reach with nothing else to do."""
    from transformers import CLIPModel

    from clip_runner.model.encoding import ClipEncoder
    from clip_runner.model.store import load_processor

    encoder = ClipEncoder(
        CLIPModel.from_pretrained(model_dir),
        load_processor(model_dir),
        torch.device("cpu"),
        torch.float32,
    )
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    pixels = np.stack([decode_and_resize(source) for source in sources * 2])
    costs = {}
    for name, work, images in (
        ("pillow", lambda: [decode_and_resize(source) for source in sources], len(sources)),
        ("model", lambda: encoder.encode_images(pixels), len(pixels)),
    ):
        work()
        started, count = time.process_time(), 0
        while time.process_time() - started < window_s:
            work()
            count += images
        costs[f"{name}_cpu_ms_per_image"] = round((time.process_time() - started) * 1000 / count, 2)
    torch.set_num_threads(threads)
    pillow, model = costs["pillow_cpu_ms_per_image"], costs["model_cpu_ms_per_image"]
    costs["ceiling_ratio"] = round(pillow / (pillow + model), 3)
    return costs


def cpu_ms_per_request(row: dict) -> dict[str, float]:
    """CPU milliseconds per served request, by process role, and the load generator's."""
    per_request = 1000 / max(row["requests_per_s"], 1e-9)
    costs = {role: cores * per_request for role, cores in row["cpu_cores_by_process"].items()}
    costs["load generator"] = row["client_cpu_cores"] * per_request
    return {role: round(ms, 2) for role, ms in costs.items()}


def overhead(out: Path, rounds: int, max_requests: int, max_seconds: float) -> dict:
    """The work around the model, measured where the model costs nothing: the tiny model, the
    seed request (one 640x480 JPEG, six classes), 32 clients, against plain Pillow's rate for
    the same images on the same cores. Rounds take turns (Pillow, service) like the headline."""
    home, tag, model_dir = import_random_model(tiny=True)
    sources = [json.loads(body)["images"][0] for body in seed_request_bodies()]
    scenario = Scenario("tiny model seed c32", seed_request_bodies(), 1, 32)
    payload: dict = {"rounds": [], **cpu_ms_per_image(model_dir, sources)}
    with tempfile.TemporaryDirectory() as tmp:
        with bento_server(home, tag, Path(tmp) / "tiny.log") as (url, pid):
            for number in range(1, rounds + 1):
                rate = pillow_rate(sources)
                row = measure(url, pid, scenario, max_requests, max_seconds, metrics=True)
                row["pillow_images_per_s"] = round(rate, 2)
                row["ratio"] = round(row["requests_per_s"] / rate, 3)
                row["cpu_ms_per_request"] = cpu_ms_per_request(row)
                payload["rounds"].append(row)
                print(f"overhead round {number}:", json.dumps(row), flush=True)
    payload["median"] = median_row(payload["rounds"])
    # Pillow's own rate swings between rounds: the middle ratio can belong to another round
    # than the middle throughput, and the target is a ratio.
    payload["median_ratio"] = statistics.median(row["ratio"] for row in payload["rounds"])
    out.mkdir(parents=True, exist_ok=True)
    (out / "overhead.json").write_text(json.dumps(payload, indent=1))
    return payload


async def alternate_runner_calls(
    runner_url: str, runner: psutil.Process, rounds: int, calls: int
) -> dict:
    """One runner process called both ways, alternating blocks of `calls` sequential calls:
    BentoML's dependency client (as `CLIP_DIRECT_RUNNER_CALLS=off` calls it: pickle) and the
    wire format. Per case and way, medians over the rounds of the block's median wall time
    per call and of the runner's and this process's CPU per call."""
    from _bentoml_impl.client.proxy2 import AsyncClient

    from clip_runner.answers.direct_runner import DirectRunnerClient
    from clip_runner.model.runner import CLIPRunner

    pickled = AsyncClient(
        runner_url,
        media_type="application/vnd.bentoml+pickle",
        service=CLIPRunner,
        server_ready_timeout=0,
        max_age=1e9,
        max_requests=2**31,
    )
    direct = DirectRunnerClient(runner_url)
    facts = await pickled.call("describe")
    rng = np.random.default_rng(0)
    shape = (facts["crop_height"], facts["crop_width"], 3)
    cases = {
        "1 image": ("encode_images", rng.integers(0, 256, (1, *shape), dtype=np.uint8)),
        "8 images": ("encode_images", rng.integers(0, 256, (8, *shape), dtype=np.uint8)),
        "8 prompts": ("encode_tokens", [list(range(1, 14))] * 8),
    }
    results: dict = {}
    try:
        for case, (method, rows) in cases.items():
            ways = {
                "bentoml": functools.partial(pickled.call, method, rows),
                "wire": functools.partial(getattr(direct, method), rows),
            }
            answers = [await call() for call in ways.values()]
            samples: dict = {
                way: {"ms": [], "runner_cpu_ms": [], "client_cpu_ms": []} for way in ways
            }
            for number in range(rounds):
                for way in sorted(ways, reverse=number % 2 == 1):
                    runner_cpu, client_cpu = cpu_seconds(runner), time.process_time()
                    walls = []
                    for _ in range(calls):
                        started = time.perf_counter()
                        await ways[way]()
                        walls.append(time.perf_counter() - started)
                    block = samples[way]
                    block["ms"].append(1000 * statistics.median(walls))
                    block["runner_cpu_ms"].append(1000 * (cpu_seconds(runner) - runner_cpu) / calls)
                    block["client_cpu_ms"].append(1000 * (time.process_time() - client_cpu) / calls)
            results[case] = {
                way: {name: round(statistics.median(values), 3) for name, values in block.items()}
                for way, block in samples.items()
            }
            results[case]["same_answers"] = bool(np.array_equal(*answers))
            print(f"runner calls, {case}:", json.dumps(results[case]), flush=True)
    finally:
        await direct.close()
        await pickled.close()
    return results


def runner_calls_served(home: Path, tag: str, log: Path, rounds: int, calls: int, **env) -> dict:
    """A server of `tag` with one runner process, its runner called both ways (above)."""
    with bento_server(home, tag, log, CLIP_RUNNER_WORKERS="1", **env) as (_, pid):
        runner = next(p for p in tree(pid) if process_role(p, pid) == "runner")
        runner_url = json.loads(runner.environ()["BENTOML_RUNNER_MAP"])["clip_runner"]
        cases = asyncio.run(alternate_runner_calls(runner_url, runner, rounds, calls))
    return {"rounds": rounds, "calls_per_block": calls, "cases": cases}


def runner_calls_text(comparison: dict) -> str:
    """One line per case: the wire format against BentoML's client."""
    parts = []
    for case, ways in comparison["cases"].items():
        wire, pickled = ways["wire"], ways["bentoml"]
        parts.append(
            f"{case}: {wire['ms']} against {pickled['ms']} ms a call, the runner's CPU "
            f"{wire['runner_cpu_ms']} against {pickled['runner_cpu_ms']} ms, the caller's "
            f"{wire['client_cpu_ms']} against {pickled['client_cpu_ms']} ms"
            + ("" if ways["same_answers"] else " (ANSWERS DIFFER)")
        )
    return (
        f"the wire format against BentoML's client, one runner, alternating blocks of "
        f"{comparison['calls_per_block']} calls, medians of {comparison['rounds']} rounds: "
        + "; ".join(parts)
    )


def runner_calls_comparison(out: Path, rounds: int, calls: int) -> dict:
    """`--runner-calls`: the tiny model's runner, served as usual, called both ways."""
    home, tag, _ = import_random_model(tiny=True)
    with tempfile.TemporaryDirectory() as tmp:
        payload = runner_calls_served(home, tag, Path(tmp) / "runner-calls.log", rounds, calls)
    out.mkdir(parents=True, exist_ok=True)
    (out / "runner-calls.json").write_text(json.dumps(payload, indent=1))
    print(runner_calls_text(payload), flush=True)
    return payload


def long_run(out: Path, minutes: float) -> int:
    """Seed-shaped load for `minutes`, with each server process's RSS after every minute."""
    home, tag, _ = import_random_model()
    bodies = seed_request_bodies()
    samples = []
    with (
        tempfile.TemporaryDirectory() as tmp,
        bento_server(home, tag, Path(tmp) / "s.log") as (
            url,
            pid,
        ),
    ):
        asyncio.run(drive(url, pid, Scenario("warm-up", bodies, 1, 8), 100, 60, False))
        for minute in range(1, math.ceil(minutes) + 1):
            row = asyncio.run(drive(url, pid, Scenario("long", bodies, 1, 8), 10**6, 60, True))
            rss = {}
            for process in tree(pid):
                command = " ".join(process.cmdline())
                role = (
                    "runner"
                    if "clip_runner" in command
                    else "api"
                    if "clip_service" in command
                    else "supervisor"
                )
                rss[role] = round(process.memory_info().rss / 2**20)
            samples.append(
                {
                    "minute": minute,
                    "requests": row["requests"],
                    "errors": row["errors"],
                    "images_per_s": row["images_per_s"],
                    "rss_mb": rss,
                }
            )
            print(json.dumps(samples[-1]), flush=True)
    out.mkdir(parents=True, exist_ok=True)
    (out / "long-run.json").write_text(json.dumps(samples, indent=1))
    return 0


def bare_text_rate(encoder, window_s: float = 4) -> dict[str, float]:
    """Prompts/s of the bare text encoder on distinct prompts, at batch 32 and 256, from token
    ids as the runner gets them (the API workers tokenize; tokenizing 256 prompts here had been
    some 18% of an H200's batch)."""
    rates = {}
    for batch in (32, 256):
        prompts, count, timed = 0, 0, 0.0
        while timed < window_s:
            texts = [f"a photo of a thing number {count + i}" for i in range(batch)]
            token_ids = encoder.tokenizer(
                texts, truncation=True, max_length=encoder.max_text_tokens
            )["input_ids"]
            started = time.monotonic()
            encoder.encode_token_ids(token_ids)
            timed += time.monotonic() - started
            count += batch
            prompts += batch
        rates[f"batch{batch}_prompts_per_s"] = round(prompts / timed, 1)
    return rates


def warm_up_of(scenario: Scenario) -> Scenario:
    """The few seconds of load before a scenario's window, at its own clients (at least 8), so
    that the batch sizes (and with CUDA graphs off, the kernels) its window meets have run once:
    an ablation's server is fresh, where the default's c64 window followed two others. Its
    bodies from the last one back, so where no body repeats (the uncached prompts) the window,
    which starts at the first, meets none that the warm-up left in a text cache."""
    clients = max(8, scenario.concurrency)
    return Scenario(scenario.name, scenario.bodies[::-1], 1, clients, scenario.route)


def write_whole(path: Path, text: str) -> None:
    """`text` as `path`, whole or not at all: the device's time limit may stop a run mid-write,
    and a cut results file would leave nothing to resume from or report."""
    partial = path.with_name(path.name + ".partial")
    partial.write_text(text)
    partial.replace(path)


def uncached_text_bodies(requests: int, per_request: int = 8, first: int = 0) -> list[bytes]:
    """`/embed_texts` bodies whose prompts never repeat: every one misses the text cache.
    Bodies from another `first` (past the first's `requests`) share no prompt with these."""
    words = ["red", "small", "old", "shiny", "wooden", "striped", "broken", "tiny", "huge"]
    return [
        json.dumps(
            {"texts": [f"a {words[(r + i) % 9]} object number {r}-{i}" for i in range(per_request)]}
        ).encode()
        for r in range(first, first + requests)
    ]


RUNNER_CALLS_ABLATION = "all server cores, CLIP_RUNNER_CALLS=3"
CUDA_GRAPHS_ABLATION = "all server cores, CLIP_CUDA_GRAPHS=off"
CONFINED_WORKERS_ABLATION = "server on 4 cores, CLIP_API_WORKERS=3"
CONFINED_RUNNERS_ABLATION = "server on 4 cores, CLIP_RUNNER_WORKERS=1"
NVJPEG_ABLATION = "all server cores, CLIP_RUNNER_JPEG_DECODER=nvjpeg"
API_DECODE_ABLATION = "all server cores, CLIP_DECODE=api"
PASSES_ABLATION = "all server cores, CLIP_RUNNER_PASSES=2"
SWITCH_INTERVAL_ABLATION = "all server cores, CLIP_SWITCH_INTERVAL_MS=0.2"
ACCESS_LOG_ABLATION = "server on 4 cores, CLIP_ACCESS_LOG=on"
CUDA_WAIT_ABLATION = "server on 4 cores, CLIP_CUDA_WAIT=spin"
BARE_ENCODERS = "bare encoders"
FIDELITY = "fidelity"
GRAPHED_BARE_MODEL = "bare model, CUDA graphs"
DEVICE_WAITS = "bare model, waiting asleep and polling"
RUNNER_DECODE = "runner decode, pinned and pageable, simplejpeg and Pillow"
RUNNER_CALLS_BOTH_WAYS = "runner calls, both ways"
BROKEN_JPEGS = "forwarded broken JPEGs"
UNCACHED_TEXTS = "embed_texts uncached c32"
GIL_PROFILED = "seed c64, py-spy"
PHONE_PHOTOS = "phone photos c32"
# What each stage that serves nothing writes into the results (a server's stage writes rows).
STAGE_OUTPUTS = {
    BARE_ENCODERS: ("bare_image", "bare_text"),
    FIDELITY: ("device_resize", "fidelity"),
    DEVICE_WAITS: ("device_waits",),
    RUNNER_DECODE: ("runner_decode",),
    GRAPHED_BARE_MODEL: ("cuda_graphs",),
    RUNNER_CALLS_BOTH_WAYS: ("runner_calls",),
    BROKEN_JPEGS: ("broken_jpegs",),
}


def replayed_passes(replayed: BareModel, plain: BareModel) -> dict:
    """The bare image encoder with its passes `replayed` from CUDA graphs (the GPU default): its
    rate at each batch (one round), and how far its embeddings are from the `plain` passes' at
    the same batch sizes (padding to a bucket may change which kernels run): the lowest cosine,
    and the largest change of a probability over the seed's prompts at logit scale 100."""
    text = seed_prompt_embeddings(plain.encoder)
    cosines, changes = [], []
    for rows in (1, 3, 8, 13, 32):
        pixels = plain.pixels[:rows]
        moved, cosine = embedding_distances(
            replayed.encoder.encode_images(pixels), plain.encoder.encode_images(pixels), text
        )
        changes.append(float(moved.max()))
        cosines.append(float(cosine.min()))
    return {
        "recorded": bool(replayed.encoder.replayed and replayed.encoder.replayed.recorded),
        "bare_image": limit_of([replayed.round(2)]),
        "min_cosine_to_plain_passes": round(min(cosines), 6),
        "max_probability_change_to_plain_passes": round(max(changes), 5),
    }


WAIT_BATCHES = (1, 32)


def device_waits(model: BareModel, passes: int = 200, rounds: int = 2) -> dict:
    """What the thread that waits for each answer costs the CPU, waiting asleep (the runner's
    default, CLIP_CUDA_WAIT=block) and by polling (CUDA's default, `spin`): per replayed pass
    of the bare encoder at batch 1 and 32, the pass's wall time and that thread's CPU time
    (`time.thread_time`), best of `rounds`, the two ways taking turns on the same graphs.
    Polling should cost about the pass's whole wall time; asleep, only the launches and the
    copy of the pixels to the GPU (from pageable memory: CUDA's copy into its staging buffer)."""
    encoder = model.encoder
    waited_for = [encoder, *([encoder.replayed] if encoder.replayed else [])]
    best: dict[str, dict[str, dict[str, float]]] = {}
    try:
        for batch in WAIT_BATCHES:
            pixels = model.pixels[:batch]
            for _ in range(rounds):
                for way, spin in (("asleep", False), ("polling", True)):
                    for part in waited_for:
                        part.spin_waits = spin
                    encoder.encode_images(pixels)  # the first wait of the new way
                    wall, cpu = time.perf_counter(), time.thread_time()
                    for _ in range(passes):
                        encoder.encode_images(pixels)
                    figures = {
                        "wall_ms_per_pass": (time.perf_counter() - wall) / passes * 1000,
                        "thread_cpu_ms_per_pass": (time.thread_time() - cpu) / passes * 1000,
                    }
                    kept = best.setdefault(f"batch{batch}", {}).get(way)
                    if kept is None or figures["wall_ms_per_pass"] < kept["wall_ms_per_pass"]:
                        best[f"batch{batch}"][way] = figures
    finally:
        for part in waited_for:
            part.spin_waits = True  # as the BareModel was made
    return {
        "replayed": bool(encoder.replayed and encoder.replayed.recorded),
        **{
            batch: {way: {k: round(v, 3) for k, v in f.items()} for way, f in ways.items()}
            for batch, ways in best.items()
        },
    }


# The runner's ways to decode a JPEG and put it on the GPU: (pinned memory, copy waited for,
# simplejpeg decoding where it agrees with Pillow).
DECODE_WAYS = {
    "pinned, queued": (True, False, True),  # the default on a GPU (device_decode.decoded_on_host)
    "pinned, queued, Pillow alone": (True, False, False),  # where simplejpeg is missing
    "pageable, queued": (False, False, True),
    "pageable, waited for": (False, True, True),  # as before: torch's blocking copy
}


def runner_decodes(threads: int, batches: int = 40, rounds: int = 3) -> dict:
    """The runner's decode of a batch of forwarded JPEGs (32 of the seed's 640x480 photos,
    decoded in `threads` threads, the exact resize on the device) each of DECODE_WAYS, taking
    turns: per batch, the wall time until its crops are on the device and the process's CPU
    time (every thread's), best of `rounds`. The blocking copy is put back, and simplejpeg set
    aside, for their turns by this benchmark only. On CPU the copies are one path (a smoke
    run); simplejpeg and Pillow differ there too."""
    from clip_runner.model import device_decode, simplejpeg_pixels
    from clip_runner.model.device_wait import wait_for_queued_work
    from clip_runner.model.encoding import pick_device

    device, _ = pick_device()
    blobs = [base64.b64decode(jpeg_base64(640, 480, seed)) for seed in range(4)] * 8
    decoders = {
        pinned: device_decode.DeviceJpegDecoder(
            device, 224, 224, 224, use_nvjpeg=False, threads=threads, pinned=pinned
        )
        for pinned in (True, False)
    }
    queued = device_decode.to_device
    agrees = simplejpeg_pixels.AGREES
    best: dict[str, dict[str, float]] = {}
    try:
        for _ in range(rounds):
            for way, (pinned, waited_for, simplejpeg) in DECODE_WAYS.items():
                device_decode.to_device = (lambda host, to: host.to(to)) if waited_for else queued
                simplejpeg_pixels.AGREES = agrees and simplejpeg
                decoder = decoders[pinned]
                decoder(blobs)  # warm: pinned blocks, the resize's weights
                wait_for_queued_work(device)
                wall, cpu = time.perf_counter(), time.process_time()
                for _ in range(batches):
                    decoder(blobs)
                    wait_for_queued_work(device)  # asleep: the crops are on the device
                figures = {
                    "wall_ms_per_batch": (time.perf_counter() - wall) / batches * 1000,
                    "cpu_ms_per_image": (time.process_time() - cpu) / batches / len(blobs) * 1000,
                }
                kept = best.get(way)
                if kept is None or figures["wall_ms_per_batch"] < kept["wall_ms_per_batch"]:
                    best[way] = figures
    finally:
        device_decode.to_device = queued
        simplejpeg_pixels.AGREES = agrees
    return {
        "device": device.type,
        "threads": threads,
        "simplejpeg_agrees": agrees,
        "images_per_batch": len(blobs),
        **{way: {k: round(v, 3) for k, v in f.items()} for way, f in best.items()},
    }


def broken_jpegs_decoded(tmp: Path, mutations: int, timeout_s: float = 120) -> dict:
    """scripts/broken_jpegs.py in a process of its own: what nvJPEG makes of forwarded JPEGs
    with broken coded data. A JPEG that kills that process or leaves its CUDA context broken
    costs only this stage, and the lines it wrote name the JPEG. Its summary, with how the
    process ended where it did not end well."""
    from scripts.broken_jpegs import STARTED, read_lines, summary

    lines = tmp / "broken-jpegs.jsonl"
    lines.unlink(missing_ok=True)  # a resumed or repeated stage reads only its own lines
    command = [sys.executable, str(REPO / "scripts" / "broken_jpegs.py")]
    command += ["--count", str(mutations), "--lines", str(lines)]
    started = time.monotonic()
    try:
        completed = subprocess.run(command, capture_output=True, text=True, timeout=timeout_s)
        ended, stderr = completed.returncode, completed.stderr
    except subprocess.TimeoutExpired as expired:
        ended, stderr = f"timed out after {timeout_s} s", expired.stderr or ""
    written = read_lines(lines)
    if ended != 0:
        stderr = stderr.decode(errors="replace") if isinstance(stderr, bytes) else stderr
        if isinstance(ended, int) and not any(STARTED in line for line in written):
            # It ended in its own set-up (an import, say), before nvJPEG ran: the harness
            # failed, not nvJPEG, so the stage is a failed one (a resume runs it again).
            raise RuntimeError(
                f"scripts/broken_jpegs.py ended ({ended}) before nvJPEG ran: {stderr[-2000:]}"
            )
    result = summary(written, time.monotonic() - started)
    if ended != 0:
        result |= {"exit": ended, "stderr": stderr[-2000:]}
    return result


def resumed_payload(previous: dict, fresh: dict) -> tuple[dict, set[str]]:
    """A cut-short or partly failed `--gpu-targets` run's results, to finish in a second run on
    a machine of the same kind (card, cores, torch): (the results to build on, the stages done
    there). A failed stage counts
    as not done, so its rows and error are dropped and it runs again."""
    for key in ("machine", "server_cpus", "client_cpus", "confined_cpus"):
        if previous.get(key) != fresh[key]:
            raise SystemExit(
                f"--resume: those results were measured with {key} {previous.get(key)!r}, this "
                f"run has {fresh[key]!r}; figures from two machines do not mix: start afresh"
            )
    failed = previous.get("stage_errors", {})
    done = {name for name in previous.get("stage_seconds", {}) if name not in failed}
    # What a stage not done left (a failed stage's partial output) goes with its error: a
    # stage that fails again, or is cut short, must not read as done with old figures.
    stale = {key for name, keys in STAGE_OUTPUTS.items() if name not in done for key in keys}
    payload = {
        key: value
        for key, value in previous.items()
        if key not in ("stage_errors", "targets", *stale)
    }
    payload["stage_seconds"] = {
        name: seconds for name, seconds in previous.get("stage_seconds", {}).items() if name in done
    }
    payload["rows"] = [row for row in previous.get("rows", []) if row.get("server") in done]
    payload["resumed_on"] = [*previous.get("resumed_on", []), fresh["date"]]
    return payload, done


# What a run without a GPU measures: its figures smoke-test the harness, they are no GPU results.
SMOKE_RUN_MODEL = "random-weight tiny CLIP (a smoke run)"


def server_settings(env: dict[str, str], cuda: bool) -> dict[str, str]:
    """A `--gpu-targets` server's CLIP_ settings: its own (an ablation's), over the GPU's
    defaults where a smoke run stands in for the GPU run (GPU_DEFAULTS_ON_CPU)."""
    return env if cuda else GPU_DEFAULTS_ON_CPU | env


# A smoke run's target and ablation servers take the GPU's defaults where a setting can name
# them, so that the rehearsal serves what the GPU run will (JPEGs forwarded to two runner
# workers, several API workers, the graphs' per-bucket staging, the stalled-pass watch), not
# the CPU's defaults; an ablation's own setting still wins.
GPU_DEFAULTS_ON_CPU = {
    # The GPU's least: half the cores, at least two (the GPU run's 12-core server gets 6).
    "CLIP_API_WORKERS": "2",
    "CLIP_DECODE": "runner",
    "CLIP_RUNNER_WORKERS": "2",
    "CLIP_CUDA_GRAPHS": "on",
    "CLIP_ACCESS_LOG": "off",
    "CLIP_STALLED_PASS_S": "60",
}


def gpu_targets(out: Path, seconds: float, resume: Path | None = None) -> dict:
    """Every GPU target of the serving-speed issue in one run, with the default settings: the
    seed request at 1, 32 and 64 clients on all but the load generator's cores, at 64 clients
    with the whole server on 4 cores (`sched_setaffinity`, as `taskset -c 0-3`), uncached
    `/embed_texts`, and 12-MP phone photos (beside the `CLIP_DECODE=api` ablation's: where
    phones' photos are best decoded); against the bare fp16 image encoder's best batch and the
    bare text encoder,
    and the device path's fidelity, measured in the same run; CUDA graphs' numbers against
    plain passes in process; then the ablations (the servers in `open_defaults`, then in
    `settled`, the runner's wire format, and nvJPEG on broken JPEGs). The load generator runs
    in as many processes as it has cores (4), pinned to those, never on the server's.

    With `resume` (an earlier run's gpu-targets.json from a machine of this kind) only the
    stages that run did not finish run: a device lent for minutes may not give a second whole
    run."""
    from transformers import CLIPModel

    from clip_runner.model.encoding import ClipEncoder, pick_device
    from clip_runner.model.store import load_processor

    cuda = torch.cuda.is_available()
    cores = sorted(os.sched_getaffinity(0))
    client_cpus = set(cores[-4:]) if len(cores) >= 8 else set(cores[len(cores) // 2 :])
    server_cpus = set(cores) - client_cpus
    confined_cpus = set(cores[:4]) - client_cpus or server_cpus
    payload: dict = {
        "date": time.strftime("%Y-%m-%d"),
        # The kernel too: under gVisor (4.4.0) CPU affinity is only recorded, not enforced.
        "machine": f"{device_name()}, {len(cores)} CPU cores ({cpu_name()}), "
        f"torch {torch.__version__}, "
        f"kernel {platform.release()}",
        "model": "random-weight ViT-B/32" if cuda else SMOKE_RUN_MODEL,
        "server_cpus": sorted(server_cpus),
        "client_cpus": sorted(client_cpus),
        "confined_cpus": sorted(confined_cpus),
    }
    done: set[str] = set()
    if resume is not None:  # before the model is built: a refusal costs the device no minute
        payload, done = resumed_payload(json.loads(resume.read_text()), payload)
        print(f"resuming {resume}: kept {sorted(done)}", flush=True)
    home, tag, model_dir = import_random_model(tiny=not cuda)  # on CPU: a smoke run only
    payload.setdefault("rows", [])
    payload.setdefault("stage_seconds", {})
    payload.setdefault("server_logs", {})
    payload.setdefault("server_log_heads", {})
    payload.setdefault("runner_start_ups", {})
    payload.setdefault("server_start_timelines", {})
    payload.setdefault("server_start_seconds", {})
    payload.setdefault("server_stop_seconds", {})
    out.mkdir(parents=True, exist_ok=True)
    device, dtype = pick_device()

    def save() -> None:
        write_whole(out / "gpu-targets.json", json.dumps(payload, indent=1))

    @functools.cache
    def plain() -> BareModel:
        return BareModel(model_dir)

    # Each bare configuration's window: on a GPU a pass takes milliseconds, so 1.5 s holds a
    # hundred passes or more even at batch 256; the first H200 run's 3-s windows made this stage
    # 53 s of the device's minutes (7 batch sizes x 2 rounds, and the text encoder).
    bare_window_s = 1.5 if cuda else 3

    def bare_encoders() -> None:
        payload["bare_image"] = limit_of([plain().round(bare_window_s) for _ in range(2)])
        encoder = ClipEncoder(
            CLIPModel.from_pretrained(model_dir),
            load_processor(model_dir),
            device,
            dtype,
        )
        payload["bare_text"] = bare_text_rate(encoder, 2 if cuda else 4)

    seed = seed_request_bodies()
    texts = uncached_text_bodies(200_000)  # each server has its own text cache: all uncached
    # 12-MP photos in the four orientations a phone stores: forwarded to the runner like the
    # seed's, or (with CLIP_DECODE=api) decoded and resized in the API workers. Last on each
    # server, after what the targets need.
    phones = Scenario(PHONE_PHOTOS, phone_photo_bodies(), 1, 32)
    # The targets first and the ablations last, so a run cut short by the device's time limit
    # still holds the targets (each stage is saved as it ends, with how long it took).
    with tempfile.TemporaryDirectory() as tmp:
        targets = [
            (
                "all server cores",
                server_cpus,
                {},
                [
                    Scenario("seed c1", seed, 1, 1),
                    Scenario("seed c32", seed, 1, 32),
                    Scenario("seed c64", seed, 1, 64),
                    Scenario(UNCACHED_TEXTS, texts, 8, 32, "/embed_texts"),
                    Scenario(GIL_PROFILED, seed, 1, 64, profile_gil=True),
                    phones,
                ],
            ),
            (
                "server on 4 cores",
                confined_cpus,
                {},
                [
                    Scenario("seed c64", seed, 1, 64),
                    Scenario(GIL_PROFILED, seed, 1, 64, profile_gil=True),
                ],
            ),
        ]
        # By what each decides, as a run rarely gets through them all (each costs a server's
        # start, about 45 s on the H200, beside its 10 s of load): first the defaults still
        # open (two passes per runner, where the JPEGs are decoded, a third API worker and one
        # runner worker on 4 cores, the calls in flight, how the runner waits for the GPU, the
        # GIL's switch interval), then what the first H200 run already settled or an opt-in
        # only shows (nvJPEG, CUDA graphs off, the access log on).
        open_defaults = [
            # Two passes at once in each runner: one's Pillow decode beside the other's forward
            # pass (with nvJPEG two passes were unsafe; with Pillow the decode is CPU work).
            (
                PASSES_ABLATION,
                server_cpus,
                {"CLIP_RUNNER_PASSES": "2"},
                [Scenario("seed c64", seed, 1, 64)],
            ),
            # The other exact path: the API workers decode and resize, the runner gets crops.
            (
                API_DECODE_ABLATION,
                server_cpus,
                {"CLIP_DECODE": "api"},
                [Scenario("seed c64", seed, 1, 64), phones],
            ),
            # On 4 cores the default is 2 API workers (half the cores): is a third worth the
            # core it takes from the runners?
            (
                CONFINED_WORKERS_ABLATION,
                confined_cpus,
                {"CLIP_API_WORKERS": "3"},
                [Scenario("seed c64", seed, 1, 64)],
            ),
            # On 4 cores the default's two runner processes (each a CUDA context, a model copy, an
            # event loop and decoding threads) against one with all the runner's cores: with
            # Pillow decoding in the runner, its share of 4 cores may matter more than the
            # second process's overlap.
            (
                CONFINED_RUNNERS_ABLATION,
                confined_cpus,
                {"CLIP_RUNNER_WORKERS": "1"},
                [Scenario("seed c64", seed, 1, 64)],
            ),
            # The GPU's calls-in-flight rule: each API worker keeping the runner's passes + 1
            # (3 with the GPU defaults) instead of sharing them.
            (
                RUNNER_CALLS_ABLATION,
                server_cpus,
                {"CLIP_RUNNER_CALLS": "3"},
                [Scenario("seed c64", seed, 1, 64)],
            ),
            # A runner thread waiting for the GPU asleep (the default) or polling it, on the 4
            # cores where a core spent polling is a quarter of the machine (device_wait.py).
            (
                CUDA_WAIT_ABLATION,
                confined_cpus,
                {"CLIP_CUDA_WAIT": "spin"},
                [Scenario("seed c64", seed, 1, 64)],
            ),
            # Threads back from C code (Pillow's decode, torch calls) getting the GIL within
            # 0.2 ms instead of Python's 5 ms: mixed on 2 busy CPU cores (gil_handover.py).
            (
                SWITCH_INTERVAL_ABLATION,
                server_cpus,
                {"CLIP_SWITCH_INTERVAL_MS": "0.2"},
                [Scenario("seed c64", seed, 1, 64)],
            ),
        ]
        settled = [
            # The opt-in nvJPEG: what its inexact pixels buy (the default decodes with Pillow in
            # the runner's threads, the resize on the GPU either way).
            (
                NVJPEG_ABLATION,
                server_cpus,
                {"CLIP_RUNNER_JPEG_DECODER": "nvjpeg"},
                [Scenario("seed c64", seed, 1, 64)],
            ),
            # CUDA graphs (the GPU default) against plain passes, throughput and one client:
            # measured with nvJPEG in the first H200 run (2.08 x).
            (
                CUDA_GRAPHS_ABLATION,
                server_cpus,
                {"CLIP_CUDA_GRAPHS": "off"},
                [Scenario("seed c1", seed, 1, 1), Scenario("seed c64", seed, 1, 64)],
            ),
            # BentoML's access-log line per request, off by default on a GPU: what it costs
            # where the CPUs are the limit.
            (
                ACCESS_LOG_ABLATION,
                confined_cpus,
                {"CLIP_ACCESS_LOG": "on"},
                [Scenario("seed c64", seed, 1, 64)],
            ),
        ]

        def stage(name: str, measure: Callable[[], object]) -> None:
            """One stage; a failure is recorded and the next stage still runs (one device run
            is all there is: a failed ablation must not cost the targets after it)."""
            if name in done:
                print(f"{name}: kept from {resume}", flush=True)
                return
            # The clock time lines the stage up with gpu_bench.sh's GPU samples (gpu-util.csv).
            print(f"{time.strftime('%H:%M:%S')} {name} ...", flush=True)
            started = time.monotonic()
            try:
                measure()
            except Exception:  # noqa: BLE001 - recorded in the results, and the exit code
                payload.setdefault("stage_errors", {})[name] = traceback.format_exc()[-4000:]
                print(payload["stage_errors"][name], flush=True)
            payload["stage_seconds"][name] = round(time.monotonic() - started, 1)
            save()

        never_ready: list[str] = []  # servers that hung in start-up (each cost wait_ready's 240 s)

        def serve(label: str, cpus: set[int], env: dict[str, str], scenarios: list) -> None:
            if never_ready:  # the next would most likely hang as long: keep the time for the rest
                raise RuntimeError(
                    f"skipped: the server of {never_ready[0]!r} never became ready (its log is in "
                    "server_logs); a --resume run retries this stage"
                )
            log = Path(tmp) / f"server-{len(payload['server_logs'])}.log"
            starting, started_at = time.monotonic(), time.time()
            settings = server_settings(env, cuda)
            try:
                with bento_server(home, tag, log, cpus=cpus, **settings) as (url, pid):
                    # Most of a one-scenario stage: the device's minutes go here first.
                    payload["server_start_seconds"][label] = round(time.monotonic() - starting, 1)
                    for scenario in scenarios:
                        drive_parallel(
                            url, pid, warm_up_of(scenario), 2, client_cpus, check_answers=False
                        )
                        # py-spy's raw stacks beside the results, for a flame graph later.
                        slug = re.sub(r"[^a-z0-9]+", "-", label.lower()).strip("-")
                        spied = out / f"py-spy-{slug}.txt" if scenario.profile_gil else None
                        row = drive_parallel(url, pid, scenario, seconds, client_cpus, spied)
                        row["server"] = label
                        payload["rows"].append(row)
                        print(json.dumps(row), flush=True)
                        save()
                    stopping = time.monotonic()
                # The rest of a stage's overhead: every process of the server gone.
                payload["server_stop_seconds"][label] = round(time.monotonic() - stopping, 1)
            except NeverReady:
                never_ready.append(label)
                raise
            finally:  # on a lent machine the log is all there is to go on
                text = log.read_text(errors="replace") if log.exists() else ""
                payload["server_logs"][label] = text[-4000:]
                # Its start: each process's timed lines say where the start-up went.
                payload["server_log_heads"][label] = text[:8000]
                # From the whole log: with 6 API workers the head may end before the runners'.
                payload["runner_start_ups"][label] = runner_start_ups(text)
                payload["server_start_timelines"][label] = start_timeline(text, started_at)

        def fidelity() -> None:
            payload["device_resize"] = device_resize_exactness(model_dir)
            payload["fidelity"] = preprocessing_fidelity(model_dir)

        @functools.cache
        def graphed() -> BareModel:
            return BareModel(model_dir, replayed=True)

        def replayed() -> None:
            try:
                model = graphed()
            except RuntimeError as exc:  # a model that cannot be recorded: reported, not fatal
                payload["cuda_graphs"] = {"error": str(exc)[:2000]}
                return
            payload["cuda_graphs"] = replayed_passes(model, plain())

        def waits() -> None:
            try:
                model = graphed()
            except RuntimeError:  # not recordable: the runner then waits for plain passes
                model = plain()
            payload["device_waits"] = device_waits(model)

        def decodes() -> None:
            from clip_runner.config import default_runner_workers, runner_decode_threads

            threads = runner_decode_threads(len(server_cpus), default_runner_workers())
            # On CPU the resize is the slow torch twin (25 ms an image here): a smoke run only.
            repeats = {"batches": 40, "rounds": 3} if cuda else {"batches": 1, "rounds": 1}
            payload["runner_decode"] = runner_decodes(threads, **repeats)

        def runner_calls() -> None:
            log = Path(tmp) / "server-runner-calls.log"
            compared = runner_calls_served(home, tag, log, 8, 30, cpus=server_cpus)
            payload["runner_calls"] = compared

        mutations = 1000 if cuda else 40  # on a CPU about 0.2 s each: a smoke run's share
        stages: list[tuple[str, Callable[[], object]]] = [
            (BARE_ENCODERS, bare_encoders),
            # Each server a stage of its own: one failing costs only its rows.
            *((run[0], functools.partial(serve, *run)) for run in targets),
            (FIDELITY, fidelity),
            # What a thread waiting for the GPU costs the CPU, asleep (the default) and polling.
            (DEVICE_WAITS, waits),
            # What decoding into pinned memory, queueing the copies and decoding through
            # simplejpeg save the decoding threads.
            (RUNNER_DECODE, decodes),
            # The default forward pass on a GPU: how far its numbers are from plain passes (the
            # first H200 run: cosine >= 0.999999; the same bare encoder's best batch either
            # way). In process, no server to start: before the ablations, which a call rarely
            # finishes.
            (GRAPHED_BARE_MODEL, replayed),
            *((run[0], functools.partial(serve, *run)) for run in [*open_defaults, *settled]),
            # What the wire format saves per call where the forward pass is short.
            (RUNNER_CALLS_BOTH_WAYS, runner_calls),
            # Last, as a JPEG that breaks the device could take what came after it with it.
            (
                BROKEN_JPEGS,
                lambda: payload.update(broken_jpegs=broken_jpegs_decoded(Path(tmp), mutations)),
            ),
        ]
        # The report names the stages a run cut short never reached.
        payload["stages_planned"] = [name for name, _ in stages]
        for name, measured in stages:
            stage(name, measured)
    payload["targets"] = gpu_target_checks(payload)
    save()
    return payload


# The issue's bound on every preprocessing path but the opt-in fast one, against CLIPProcessor.
FIDELITY_MAX_PROBABILITY_CHANGE = 1e-3
FIDELITY_MIN_COSINE = 0.9999
OPT_IN_APPROXIMATION = "CLIP_PREPROCESS=fast"
# nvJPEG's rows in the fidelity stage: since it missed the bound on an H200 it is an opt-in
# (CLIP_RUNNER_JPEG_DECODER=nvjpeg) reported with its measured bound, as the fast path is.
NVJPEG_PATHS = "device path (nvjpeg"


def is_opt_in_approximation(path: str) -> bool:
    """A preprocessing path that trades exactness for speed, opted into: reported with its
    measured worst case, not held to the issue's bound as the defaults are."""
    return path == OPT_IN_APPROXIMATION or path.startswith(NVJPEG_PATHS)


def rows_per_pass(row: dict) -> str:
    """Images per forward pass, or "(prompts)" where a window's passes encoded only texts."""
    if row.get("mean_runner_batch") is None and row.get("mean_text_batch") is not None:
        return f"({row['mean_text_batch']})"
    return shown(row.get("mean_runner_batch"))


def shown(value: object) -> str:
    """A table cell: "-" where a run did not record the figure (older runs, or none to take)."""
    return "-" if value is None else str(value)


def figure_text(value: object) -> str:
    """A measured figure as text: six significant digits (a ratio of 0.29983 is not 0.3)."""
    return f"{value:.6g}" if isinstance(value, float) else str(value)


def scenario_figure(
    payload: dict, server: str, scenario: str, field: str = "images_per_s"
) -> float | None:
    """One served scenario's figure from a `--gpu-targets` run; None where it was not measured."""
    for row in payload.get("rows", []):
        if (row["server"], row["name"]) == (server, scenario):
            return row.get(field)
    return None


# The fewest answers a latency percentile is judged from (a 1-client window of the GPU run
# holds hundreds): with one, its p50 would be read as 0 ms.
MIN_LATENCY_SAMPLES = 20
# CPU time over a window measured from outside the processes runs a little past the cores a
# process may use; beyond this the pinning did not hold and the 4-core figures mean nothing.
PINNING_SLACK = 1.05
# How far an answer under load may move from the same request's answer at rest: the issue's
# fidelity bound. The pixels are the same either way; only the batch (fp16 kernels chosen by
# its size, a CUDA graph of another size) differs, which moved a probability by 0.00071 at
# logit scale 100 on the H200 (the fidelity stage's "same pixels batched"), and the runs'
# random weights score at their own scale, 14.3. Another photo's answer, or a photo half
# overwritten by another, moved one by 0.0018-0.022 and 0.0055 on this project's CPU
# (random ViT-B/32, the seed's four photos).
ANSWER_DRIFT_BOUND = 1e-3


def most_cores_used(payload: dict) -> float | None:
    """The largest share of its pinned cores any served scenario's server or load generator
    used: above 1 the machine does not enforce CPU affinity (gVisor only records it)."""
    shares = []
    for row in payload.get("rows", []):
        if "server_cpu_cores" not in row:
            continue
        confined = row["server"].startswith("server on 4 cores")
        given = payload["confined_cpus" if confined else "server_cpus"]
        shares.append(row["server_cpu_cores"] / len(given))
        shares.append(row["client_cpu_cores"] / len(payload["client_cpus"]))
    return round(max(shares), 3) if shares else None


def gpu_verdicts(payload: dict) -> list[tuple[str, object, str]]:
    """Each GPU target as (target, measured figure, "met" / "not met" / "unmeasured")."""
    figure = functools.partial(scenario_figure, payload)
    rows = payload.get("rows", [])
    full = figure("all server cores", "seed c64", "images_per_s")
    bare = payload.get("bare_image", {}).get("batched_limit_images_per_s")
    # nvJPEG (opt-in, inexact) decodes a batch in one call, whose pixels need not be those of
    # a call for one JPEG: its answers under load are shown in its row, not judged. A row
    # whose answers all failed checked none.
    checked = [
        row for row in rows if row.get("answers_checked") and row["server"] != NVJPEG_ABLATION
    ]
    # A speed or latency from a window with errors in it is not met, however fast: refusals are
    # quick (their figures count only the 200 answers, but a server refusing some of its load
    # did less work); a latency of under MIN_LATENCY_SAMPLES answers is unmeasured.
    windows = {
        ">= 2,000 images/s at 64 clients": ("all server cores", "seed c64"),
        ">= 0.3 x the bare fp16 image encoder's best batch": ("all server cores", "seed c64"),
        ">= 1,000 images/s at 64 clients, server on 4 cores": ("server on 4 cores", "seed c64"),
        "p50 at 1 client <= 10 ms": ("all server cores", "seed c1"),
        "p95 at 32 clients <= 100 ms": ("all server cores", "seed c32"),
    }
    checks: list[tuple[str, object, float, str]] = [
        (">= 2,000 images/s at 64 clients", full, 2000, ">="),
        (
            ">= 0.3 x the bare fp16 image encoder's best batch",
            full / bare if full and bare else None,  # judged unrounded
            0.3,
            ">=",
        ),
        (
            ">= 1,000 images/s at 64 clients, server on 4 cores",
            figure("server on 4 cores", "seed c64", "images_per_s"),
            1000,
            ">=",
        ),
        ("p50 at 1 client <= 10 ms", figure("all server cores", "seed c1", "p50_ms"), 10, "<="),
        (
            "p95 at 32 clients <= 100 ms",
            figure("all server cores", "seed c32", "p95_ms"),
            100,
            "<=",
        ),
        (
            "every request of every scenario answered 200 (errors)",
            sum(row["errors"] for row in rows) if rows else None,
            0,
            "<=",
        ),
        (
            "every answer under load within 1e-3 of the same request's answer at rest (largest "
            "change of a top-3 probability)",
            max((row["largest_probability_change"] for row in checked), default=None),
            ANSWER_DRIFT_BOUND,
            "<=",
        ),
        (
            "images whose classification changed under load",
            sum(row["classification_changes"] for row in checked) if checked else None,
            0,
            "<=",
        ),
        (
            "every server and load generator stayed on its cores (most CPU used / cores given)",
            most_cores_used(payload),
            PINNING_SLACK,
            "<=",
        ),
        (
            "device resize: pixels differing from Pillow's",
            payload.get("device_resize", {}).get("differing"),
            0,
            "<=",
        ),
    ]
    broken = payload.get("broken_jpegs")
    checks += [
        (
            "forwarded broken JPEGs: intact images' pixels changed by one in their batch",
            broken.get("batch_changed_neighbours") if broken else None,
            0,
            "<=",
        ),
        (
            "forwarded broken JPEGs: exceptions, crashes or hangs",
            len(BROKEN_JPEG_FAILURES & broken.keys()) if broken else None,
            0,
            "<=",
        ),
    ]
    for path, measured in payload.get("fidelity", {}).get("paths", {}).items():
        if is_opt_in_approximation(path):
            continue
        checks += [
            (
                f"fidelity, {path}: largest probability change <= 1e-3",
                measured["max_probability_change_scale_100"],
                FIDELITY_MAX_PROBABILITY_CHANGE,
                "<=",
            ),
            (
                f"fidelity, {path}: embedding cosine >= 0.9999",
                measured["min_cosine"],
                FIDELITY_MIN_COSINE,
                ">=",
            ),
        ]
    if "fidelity" not in payload:  # the stage failed or was never reached
        checks.append(("fidelity of the default preprocessing paths", None, 0, "<="))
    verdicts = []
    for target, value, bound, sense in checks:
        window = windows.get(target)
        answered = figure(*window, "requests") if window else None
        if value is None or (target.startswith("p") and (answered or 0) < MIN_LATENCY_SAMPLES):
            verdicts.append((target, value, "unmeasured"))
        elif window and figure(*window, "errors"):
            verdicts.append((target, value, "not met"))
        else:
            met = value >= bound if sense == ">=" else value <= bound
            verdicts.append((target, value, "met" if met else "not met"))
    return verdicts


def gpu_ablations(payload: dict) -> dict[str, str]:
    """Each ablation against the default it would replace, and the figures reported beside the
    targets (text, for the summary)."""
    figure = functools.partial(scenario_figure, payload)
    full = figure("all server cores", "seed c64")
    graphs = payload.get("cuda_graphs", {})
    graphed_bare = graphs.get("bare_image", {})
    return {
        "seed c64 images/s, runner calls shared / 3 per API worker": (
            f"{full} / {figure(RUNNER_CALLS_ABLATION, 'seed c64')}"
        ),
        "seed c64 images/s, one pass at a time per runner (default) / two": (
            f"{full} / {figure(PASSES_ABLATION, 'seed c64')}"
        ),
        "seed c64 images/s, the GIL handed over after 5 ms (default) / 0.2 ms": (
            f"{full} / {figure(SWITCH_INTERVAL_ABLATION, 'seed c64')}"
        ),
        "seed c64 images/s, JPEGs decoded by Pillow in the runner (default, exact) / nvJPEG "
        "(opt-in) / Pillow in the API workers (CLIP_DECODE=api)": (
            f"{full} / {figure(NVJPEG_ABLATION, 'seed c64')} / "
            f"{figure(API_DECODE_ABLATION, 'seed c64')}"
        ),
        "phone photos c32 (12 MP, EXIF orientations 1, 3, 6, 8) images/s, forwarded to the "
        "runner (default) / decoded in the API workers (CLIP_DECODE=api)": (
            f"{figure('all server cores', PHONE_PHOTOS)} / "
            f"{figure(API_DECODE_ABLATION, PHONE_PHOTOS)}"
        ),
        "server on 4 cores, seed c64 images/s, the GPU waited for asleep (default) / polling "
        "(CLIP_CUDA_WAIT=spin)": (
            f"{figure('server on 4 cores', 'seed c64')} / {figure(CUDA_WAIT_ABLATION, 'seed c64')}"
        ),
        "the waiting thread per replayed pass of the bare encoder, asleep / polling": (
            waits_text(payload.get("device_waits"))
        ),
        "the runner's decode of a batch of forwarded JPEGs, each way": (
            decodes_text(payload.get("runner_decode"))
        ),
        "server on 4 cores, seed c64 images/s, default / 3 API workers": (
            f"{figure('server on 4 cores', 'seed c64')} / "
            f"{figure(CONFINED_WORKERS_ABLATION, 'seed c64')}"
        ),
        "server on 4 cores, seed c64 images/s, 2 runner workers (default) / 1": (
            f"{figure('server on 4 cores', 'seed c64')} / "
            f"{figure(CONFINED_RUNNERS_ABLATION, 'seed c64')}"
        ),
        "seed c64 images/s and c1 p50 ms, CUDA graphs (default) / plain passes": (
            f"{full} / {figure(CUDA_GRAPHS_ABLATION, 'seed c64')}, "
            f"{figure('all server cores', 'seed c1', 'p50_ms')} / "
            f"{figure(CUDA_GRAPHS_ABLATION, 'seed c1', 'p50_ms')}"
        ),
        "bare image encoder, best batch images/s, plain / CUDA graphs": (
            f"{payload.get('bare_image', {}).get('batched_limit_images_per_s')} / "
            f"{graphed_bare.get('batched_limit_images_per_s')}"
        ),
        "bare image encoder, CUDA graphs against plain passes: largest probability change, "
        "lowest cosine": (
            f"{graphs.get('max_probability_change_to_plain_passes')}, "
            f"{graphs.get('min_cosine_to_plain_passes')}"
        ),
        "/embed_texts uncached c32, prompts/s (bare text encoder, batch 256)": (
            f"{figure('all server cores', UNCACHED_TEXTS)} "
            f"({payload.get('bare_text', {}).get('batch256_prompts_per_s')})"
        ),
        "server on 4 cores, seed c64 images/s, access log off (default on a GPU) / on": (
            f"{figure('server on 4 cores', 'seed c64')} / {figure(ACCESS_LOG_ABLATION, 'seed c64')}"
        ),
    }


def waits_text(waits: dict | None) -> str:
    """The device-waits stage as text: per batch, wall and thread CPU ms per pass each way."""
    if not waits:
        return "None"
    parts = []
    for batch in WAIT_BATCHES:
        ways = waits.get(f"batch{batch}", {})
        asleep, polling = ways.get("asleep", {}), ways.get("polling", {})
        parts.append(
            f"batch {batch}: thread CPU {asleep.get('thread_cpu_ms_per_pass')} / "
            f"{polling.get('thread_cpu_ms_per_pass')} ms of a pass of "
            f"{asleep.get('wall_ms_per_pass')} / {polling.get('wall_ms_per_pass')} ms"
        )
    if waits.get("replayed"):
        return "; ".join(parts)
    return "; ".join(parts) + " (plain passes: no graphs recorded, or no GPU to wait for)"


def decodes_text(decodes: dict | None) -> str:
    """The runner-decode stage as text: CPU per image and wall per batch, each way."""
    if not decodes:
        return "None"
    parts = [
        f"{way}{' (the default)' if way == next(iter(DECODE_WAYS)) else ''}: "
        f"{decodes.get(way, {}).get('cpu_ms_per_image')} ms of CPU per image, "
        f"{decodes.get(way, {}).get('wall_ms_per_batch')} ms per batch"
        for way in DECODE_WAYS
    ]
    threads = decodes.get("threads")
    head = f"{decodes.get('images_per_batch')} 640x480 JPEGs in {threads} thread(s)"
    tail = "" if decodes.get("device") == "cuda" else " (no GPU: one copy path)"
    if decodes.get("simplejpeg_agrees") is False:
        tail += " (simplejpeg missing or disagreeing: Pillow decoded every way)"
    return f"{head}: " + "; ".join(parts) + tail


# How the broken-JPEG stage's process can end badly (scripts/broken_jpegs.py's summary).
BROKEN_JPEG_FAILURES = {"raised", "stopped_at", "exit", "error"}


def broken_jpegs_text(result: dict) -> str:
    """The broken-JPEG stage as sentences: what happened to the forwarded JPEGs, then how the
    run ended where it ended badly (a JPEG's bytes stay in the JSON)."""
    if "outcomes" not in result:
        return f"no results: {result.get('error')}; exit {result.get('exit')} (stderr in the JSON)"
    sentences = [
        f"{result['decoder']} on {result['device']}, {result['mutations']} mutated JPEGs; of "
        f"those the API workers forward, {result['tried']} tried",
        "; ".join(f"{name}: {count}" for name, count in result["outcomes"].items()),
    ]
    if result["decoder"] == "nvjpeg":
        sentences.append(f"nvJPEG refused {result['refused_by_nvjpeg']} (Pillow decided those)")
    sentences += [
        f"Decoded by both, {result['differ_more_than_intact']} differ from Pillow's pixels by "
        f"more than the intact JPEGs do (largest mean difference "
        f"{result['largest_mean_abs_difference']} grey levels, intact "
        f"{result['intact_largest_mean_abs_difference']})",
        f"In a batch beside intact JPEGs the broken JPEG's own result changed "
        f"{result['batch_changed_the_broken_jpeg']} times, the intact ones' pixels "
        f"{result['batch_changed_neighbours']} times; the intact JPEGs as one batch against "
        f"alone: {result['intact_batch_differs_from_solo']} differ",
        f"{result.get('seconds')} s",
    ]
    for failure in sorted(BROKEN_JPEG_FAILURES & result.keys()):
        shown_failure = result[failure]
        if isinstance(shown_failure, dict):
            shown_failure = {key: value for key, value in shown_failure.items() if key != "bytes"}
        sentences.append(f"{failure}: {shown_failure}")
    return ". ".join(sentences)


def gpu_target_checks(payload: dict) -> dict[str, str]:
    """Each target with its figure and verdict, then the ablations (text, for the summary)."""
    verdicts = gpu_verdicts(payload)
    checks = {target: f"{figure_text(value)} ({verdict})" for target, value, verdict in verdicts}
    return checks | {f"{name} (ablation)": text for name, text in gpu_ablations(payload).items()}


def gpu_report(payload: dict, source: str = "benchmarks/gpu/gpu-targets.json") -> str:
    """A `--gpu-targets` run as BENCHMARKS.md text: the verdicts, every served scenario with
    where the server's CPU went, the ablations, the stages' durations and failures. `source`:
    where the raw results are kept in the repository."""
    resumed = payload.get("resumed_on")
    lines = [
        f"Run of {payload['date']} on {payload['machine']} (`bash scripts/gpu_bench.sh`, default "
        f"settings, {payload.get('model', 'random-weight ViT-B/32')}); server on cores "
        f"{payload['server_cpus']}, the 4-core server on {payload['confined_cpus']}, the load "
        f"generator on {payload['client_cpus']}"
        + (f"; finished by resumed runs on {', '.join(resumed)}" if resumed else "")
        + f". Raw results: `{source}`.",
        "",
        "| target | measured | verdict |",
        "|---|---|---|",
    ]
    lines += [
        f"| {target} | {figure_text(value)} | **{verdict}** |"
        for target, value, verdict in gpu_verdicts(payload)
    ]
    lines += [
        "",
        "| server | scenario | images/s | p50 ms | p95 ms | p99 ms | errors | answers' largest "
        "change at load (classifications changed) | server CPU cores "
        "(API / runner) | API workers | images per runner call | load generator cores "
        "(processes) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in payload.get("rows", []):
        by_process = row["cpu_cores_by_process"]
        lines.append(
            f"| {row['server']} | {row['name']} | {row['images_per_s']} | {row['p50_ms']} | "
            f"{row['p95_ms']} | {row['p99_ms']} | {row['errors']} | "
            f"{shown(row.get('largest_probability_change'))} "
            f"({shown(row.get('classification_changes'))}) | {row['server_cpu_cores']} "
            f"({by_process.get('api', 0)} / {by_process.get('runner', 0)}) | "
            f"{row['api_workers']} | {shown(row.get('images_per_runner_call'))} | "
            f"{row['client_cpu_cores']} ({row['load_generator_processes']}) |"
        )
    lines += [
        "",
        "Where the time went (means over each window, from the service's /metrics): a request "
        "in the API; its image work there (none when JPEGs go to the device); a runner call as "
        "the API waited for it; a forward pass inside it (the device decode of forwarded JPEGs "
        "included), and of it the decode (Pillow or nvJPEG, then queueing the copy to the "
        "device and the resize, which run in the pass's time); images (or prompts) per pass; "
        "forward passes in progress on average.",
        "",
        "| server | scenario | API ms per request | image work ms per image | runner call ms | "
        "forward pass ms | of it, device decode ms | images (prompts) per pass | model busy |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    lines += [
        f"| {row['server']} | {row['name']} | {shown(row.get('api_ms_per_request'))} | "
        f"{shown(row.get('preprocess_ms_per_image'))} | {shown(row.get('runner_call_ms'))} | "
        f"{shown(row.get('forward_pass_ms'))} | {shown(row.get('decode_ms_per_pass'))} | "
        f"{rows_per_pass(row)} | {shown(row.get('model_busy'))} |"
        for row in payload.get("rows", [])
    ]
    lines += gil_profile_text(payload)
    lines += ["", "Ablations and reported figures:", ""]
    lines += [f"- {name}: {text}" for name, text in gpu_ablations(payload).items()]
    fidelity = payload.get("fidelity", {}).get("paths", {})
    batched = payload.get("fidelity", {}).get("same_pixels_batched")
    if batched:
        lines.append(
            f"- not preprocessing: CLIPImageProcessor's pixels encoded as one batch of "
            f"{batched['images']} against one at a time (what batching alone moves): largest "
            f"probability change {batched['max_probability_change_scale_100']}, cosine "
            f"{batched['min_cosine']}"
        )
    if "runner_calls" in payload:
        lines.append(f"- {RUNNER_CALLS_BOTH_WAYS}: {runner_calls_text(payload['runner_calls'])}")
    if "broken_jpegs" in payload:
        lines.append(f"- {BROKEN_JPEGS}: {broken_jpegs_text(payload['broken_jpegs'])}")
    refused = payload.get("fidelity", {}).get("jpegs_refused_by_nvjpeg")
    if refused is not None:
        lines.append(
            f"- nvJPEG refused {refused} of the hard set's JPEGs in the fidelity stage (Pillow "
            "decoded those, as in the runner)"
        )
    lines += [
        f"- {path} (opt-in, no bound): largest probability change "
        f"{measured['max_probability_change_scale_100']} ({measured['worst_image']}), cosine "
        f"{measured['min_cosine']}"
        for path, measured in fidelity.items()
        if is_opt_in_approximation(path)
    ]
    starts = payload.get("server_start_seconds", {})
    stops = payload.get("server_stop_seconds", {})

    def server_overhead(name: str) -> str:
        if name not in starts:  # not a server's stage
            return ""
        stop = f", stop {stops[name]}" if name in stops else ""
        return f" (start-up {starts[name]}{stop})"

    stages = "; ".join(
        f"{name}: {seconds}{server_overhead(name)}"
        for name, seconds in payload.get("stage_seconds", {}).items()
    )
    lines += ["", f"Stages, seconds each (a server's start-up and stop included): {stages}."]
    timelines = {server: t for server, t in payload.get("server_start_timelines", {}).items() if t}
    if timelines:
        lines += [
            "",
            "Where each server's start went, seconds after it was started (its log's timestamps, "
            "whole seconds):",
            "",
        ]
        lines += [
            f"- {server}: "
            + ", ".join(f"{event} {seconds}" for event, seconds in timeline.items())
            + (f"; `/ping` 200 at {starts[server]}" if server in starts else "")
            for server, timeline in timelines.items()
        ]
    runner_starts = {server: w for server, w in payload.get("runner_start_ups", {}).items() if w}
    if runner_starts:
        lines += ["", "Where each runner worker's start-up went (its log):", ""]
        lines += [f"- {server}: {'; '.join(workers)}" for server, workers in runner_starts.items()]
    if payload.get("stage_errors"):
        failed = ", ".join(payload["stage_errors"])
        lines.append(f"Failed stages (their tracebacks are in the JSON): {failed}.")
    ran = payload.get("stage_seconds", {}).keys() | payload.get("stage_errors", {}).keys()
    if unreached := [name for name in payload.get("stages_planned", []) if name not in ran]:
        lines.append(f"Stages the run did not reach: {', '.join(unreached)}.")
    return "\n".join(lines)


# A runner worker's lines in BentoML's log, "[service:clip_runner:<worker>]".
RUNNER_SOURCE = "service:clip_runner:"
# Moments of a server's start, each the first log line of its kind: (name, source, text).
START_EVENTS = (
    ("supervisor's first line", "cli", ""),
    ("first API worker line", "entry_service:", ""),
    ("first runner worker ready", RUNNER_SOURCE, f"runner {STARTUP_LINE_PREFIX}"),
    ("an API worker saw the runner", "entry_service:", "runner ready"),
)
LOG_LINE = re.compile(
    r"^(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d[+-]\d{4}) \[\w+\] \[([^\]]+)\] (.*)$", re.M
)


def start_timeline(log: str, started_at: float) -> dict[str, int]:
    """Seconds from a server's start (`started_at`, epoch) to each of `START_EVENTS` in its log
    (BentoML's timestamps are whole seconds): which process the start-up waited for. On the
    first H200 run no runner touched the GPU until 33-42 s after its server was started."""
    timeline: dict[str, int] = {}
    for stamp, source, text in LOG_LINE.findall(log):
        for name, wanted_source, wanted_text in START_EVENTS:
            if name not in timeline and source.startswith(wanted_source) and wanted_text in text:
                at = datetime.datetime.strptime(stamp, "%Y-%m-%dT%H:%M:%S%z").timestamp()
                timeline[name] = round(at - started_at)
    return {name: timeline[name] for name, _, _ in START_EVENTS if name in timeline}


def runner_start_ups(log: str) -> list[str]:
    """A server log's runner start-up lines (model/startup_phases.py), one per runner worker:
    `["worker 1: 41.2 s since the process began (...)", ...]`."""
    prefix = f"runner {STARTUP_LINE_PREFIX} "
    return [
        f"worker {source.removeprefix(RUNNER_SOURCE)}: {text.removeprefix(prefix)}"
        for _, source, text in LOG_LINE.findall(log)
        if source.startswith(RUNNER_SOURCE) and text.startswith(prefix)
    ]


def gil_profile_text(payload: dict, functions: int = 6) -> list[str]:
    """The py-spy windows (GIL_PROFILED) as report lines: per server and role, the share of the
    window each process held its GIL (near 1: that process is the limit), and the functions
    that held it most (gil_profile.summary)."""
    lines = []
    for row in payload.get("rows", []):
        if "gil_profile_error" in row:
            lines.append(f"- {row['server']}: not profiled ({row['gil_profile_error']})")
        for role, seen in row.get("gil_profile", {}).items():
            held = ", ".join(f"{share:.2f}" for share in seen["gil_held_share"])
            own = "; ".join(
                f"{name} {share:.0%}" for name, share in list(seen["own_code"].items())[:functions]
            )
            innermost = "; ".join(
                f"{name} {share:.0%}" for name, share in list(seen["self"].items())[:functions]
            )
            lines.append(
                f"- {row['server']}, {role} ({seen['processes']} process(es)): GIL held {held} "
                f"of the window; the project's: {own or 'none'}; innermost: {innermost}"
            )
    if not lines:
        return []
    return [
        "",
        f'Where the GIL was held (the rows "{GIL_PROFILED}": py-spy sampling every server '
        "process over the window, scripts/gil_profile.py). Functions as shares of each role's "
        "GIL samples: the project's innermost (what called the code holding it), and the "
        "innermost of all:",
        "",
        *lines,
    ]


RATIOS = {
    # name: (numerator scenario, numerator field, denominator scenario, denominator field)
    "service seed c32 / bare model limit (best configuration)": (
        "service seed c32",
        "images_per_s",
        "bare model",
        "batched_limit_images_per_s",
    ),
    "service seed c32 / bare model, best single pass": (
        "service seed c32",
        "images_per_s",
        "bare model",
        "single_pass_limit_images_per_s",
    ),
    "service seed c32 / bare model batch 32": (
        "service seed c32",
        "images_per_s",
        "bare model",
        "batch32_images_per_s",
    ),
    "service embed_images c32 / bare model limit (best configuration)": (
        "service embed_images c32",
        "images_per_s",
        "bare model",
        "batched_limit_images_per_s",
    ),
    "service seed c32 / baseline seed c32": (
        "service seed c32",
        "images_per_s",
        "baseline seed c32",
        "images_per_s",
    ),
    "p95 service seed c32 / baseline seed c32": (
        "service seed c32",
        "p95_ms",
        "baseline seed c32",
        "p95_ms",
    ),
    "time per request, 50 classes / 1 class (c8)": (
        "service 1 class c8",
        "requests_per_s",
        "service 50 classes c8",
        "requests_per_s",
    ),
    "small-JPEG / large-JPEG throughput (c32)": (
        "service small JPEG 224x224 c32",
        "images_per_s",
        "service large JPEG 1834x2750 c32",
        "images_per_s",
    ),
    "large JPEG: fast (opt-in) / reference (default) preprocessing throughput (c32)": (
        "service large JPEG c32, CLIP_PREPROCESS=fast",
        "images_per_s",
        "service large JPEG 1834x2750 c32",
        "images_per_s",
    ),
    "seed c32: text cache on / off throughput": (
        "service seed c32",
        "images_per_s",
        "service seed c32, text cache off",
        "images_per_s",
    ),
    "seed c32: torch.compile on / off throughput": (
        "service seed c32, CLIP_TORCH_COMPILE=on",
        "images_per_s",
        "service seed c32",
        "images_per_s",
    ),
    "seed c32: CLIP_DTYPE=bfloat16 (opt-in) / float32 (default) throughput": (
        "service seed c32, CLIP_DTYPE=bfloat16",
        "images_per_s",
        "service seed c32",
        "images_per_s",
    ),
    "service seed c32, CLIP_DTYPE=bfloat16 / bare bfloat16 model limit (best configuration)": (
        "service seed c32, CLIP_DTYPE=bfloat16",
        "images_per_s",
        "bare model, bfloat16",
        "batched_limit_images_per_s",
    ),
}


def ratios_of(rows: dict[str, dict]) -> dict[str, float]:
    """The target ratios whose two sides were both measured (a partial run gives fewer)."""
    ratios = {}
    for name, (top, top_field, bottom, bottom_field) in RATIOS.items():
        if top in rows and bottom in rows:
            ratios[name] = round(rows[top][top_field] / max(rows[bottom][bottom_field], 1e-9), 3)
    return ratios


def headline_rounds_text(rounds: list[dict]) -> str:
    """The interleaved rounds behind the headline ratios, each with its own ratios."""
    parts = [
        f"{r['bare_limit_images_per_s']} / {r['service_images_per_s']} / "
        f"{r['baseline_images_per_s']} (service/bare "
        f"{r['service_images_per_s'] / r['bare_limit_images_per_s']:.2f}, service/baseline "
        f"{r['service_images_per_s'] / r['baseline_images_per_s']:.2f})"
        for r in rounds
    ]
    return (
        "Headline rounds, taking turns (bare model, best configuration / service seed c32 / "
        "baseline seed "
        "c32, images/s): " + "; ".join(parts) + ". The table's seed c32 rows are the median rounds."
    )


def configuration_label(name: str) -> str:
    """'batch8' -> 'batch 8'; 'two_passes_batch8' -> 'two passes of batch 8 at once';
    'resident_batch256' -> 'batch 256 already on the device'."""
    batch = name.rsplit("batch", 1)[1]
    if name.startswith("two_passes"):
        return f"two passes of batch {batch} at once"
    if name.startswith("resident"):
        return f"batch {batch} already on the device"
    return f"batch {batch}"


def bare_model_text(limit: dict) -> str:
    """The limit's configurations, each with its median images/s, and which one is the limit."""
    configurations = [
        f"{configuration_label(key.removesuffix('_images_per_s'))} {value}"
        for key, value in limit.items()
        if key.endswith("_images_per_s") and "limit" not in key
    ]
    threads_each = limit["torch_threads"] // 2
    two_passes = (
        f"; two passes at once: two threads of {threads_each} torch thread"
        f"{'s' if threads_each > 1 else ''} each"
        if any(key.startswith("two_passes") for key in limit)
        else ""
    )
    return (
        f"Bare model in-process (the limit, on {limit['device']}, {limit['torch_threads']} torch "
        f"threads{two_passes}), images/s: "
        + ", ".join(configurations)
        + f". The limit in the ratios: {configuration_label(limit['best'])}; the best single "
        f"pass: {configuration_label(limit['best_single_pass'])} (medians of {limit['rounds']} "
        "rounds)."
    )


def cpu_budget_text(row: dict, limit: dict, cores: int) -> str:
    """Where the machine's CPU went at the seed load, and the ceiling that leaves the model.

    Everything the API worker and the load generator use is taken from the model's cores (on
    CPU the model is the bottleneck), so the service can reach at most (cores - their use) /
    cores of the limit, and less once the runner's own HTTP work is counted.
    """
    by_process = row["cpu_cores_by_process"]
    api, client = by_process.get("api", 0.0), row["client_cpu_cores"]
    idle = cores - row["server_cpu_cores"] - client
    text = (
        f"Where the {cores} cores went at seed load, 32 clients (the median round): runner "
        f"{by_process.get('runner', 0.0):.2f} cores (forward passes in progress: "
        f"{row.get('model_busy', 0):.2f} on average), API worker {api:.2f} "
        f"({api * 1000 / max(row['requests_per_s'], 1e-9):.1f} ms of CPU per request), "
        f"supervisor {by_process.get('server', 0.0):.2f}, load generator {client:.2f}, idle "
        f"{max(idle, 0):.2f}."
    )
    if limit["device"] != "CPU":
        return text
    ceiling = (cores - api - client) / cores
    return text + (
        f" The cores the API worker and the load generator use are the model's loss: they cap "
        f"the service at about {ceiling:.2f} x the limit before the runner's own HTTP work "
        f"(measured {row['images_per_s'] / limit['batched_limit_images_per_s']:.2f} x)."
    )


def overhead_text(overhead: dict) -> str:
    """The tiny-model scenario: each round's ratio, and where the CPU went per request."""
    median = overhead["median"]
    rounds = ", ".join(
        f"{r['requests_per_s']} / {r['pillow_images_per_s']} ({r['ratio']})"
        for r in overhead["rounds"]
    )
    costs = ", ".join(f"{role} {ms} ms" for role, ms in median["cpu_ms_per_request"].items())
    return (
        "The work around the model (tiny model; the seed request, 32 clients; rounds of plain "
        "Pillow's decode + resize of the same JPEGs in-process, one thread per core, then the "
        "service): requests/s / Pillow images/s (ratio) per round: "
        f"{rounds}; median of the ratios {overhead.get('median_ratio', '-')}. Median round (by "
        f"throughput): CPU per request by process: {costs}; images per runner call "
        f"{median.get('images_per_runner_call', '-')} (runner calls per image "
        f"{round(1 / max(median.get('images_per_runner_call') or 1, 1e-9), 2)}); mean forward pass "
        f"{median.get('mean_runner_batch', '-')} images. On one thread, Pillow's work costs "
        f"{overhead['pillow_cpu_ms_per_image']} ms of CPU per image and the tiny model's "
        f"(normalisation + forward pass) {overhead['model_cpu_ms_per_image']} ms: with no other "
        f"work at all a server would reach {overhead['ceiling_ratio']} x Pillow's rate."
    )


def fidelity_text(fidelity: dict) -> str:
    """One line per preprocessing path: its worst case against CLIPImageProcessor."""
    lines = [
        f"Preprocessing fidelity against CLIPImageProcessor over the hard-image set "
        f"({fidelity['images']} images: stripes, checkerboards, fabric, noise, text, photos, "
        f"extreme aspect ratios; PNG, and JPEG at 4:2:0 with the colour ones at 4:2:2 and "
        f"4:4:4 too; CLIPImageProcessor "
        f"{fidelity['clip_processor_ms_per_image']} ms/image):",
        "",
        "| path | images | ms/image | max probability change (logit scale 100) | worst image "
        "| min embedding cosine |",
        "|---|---|---|---|---|---|",
    ]
    for path, row in fidelity["paths"].items():
        lines.append(
            f"| {path} | {row['images']} | {row['ms_per_image']} | "
            f"{row['max_probability_change_scale_100']} | {row['worst_image']} | "
            f"{row['min_cosine']} |"
        )
    return "\n".join(lines)


def dtype_text(fidelity: dict | None, limit: dict | None, ratios: dict[str, float]) -> str:
    """The opt-in half type on CPU (CLIP_DTYPE=bfloat16): its bare speed, its served speed
    against the default's, and how far its answers move from float32's."""
    if not fidelity or not limit:
        return ""
    served = ratios.get("seed c32: CLIP_DTYPE=bfloat16 (opt-in) / float32 (default) throughput")
    return (
        f"The model in {fidelity['dtype']} (`CLIP_DTYPE={fidelity['dtype']}`, an opt-in), "
        f"in-process, images/s: batch 8 {limit.get('batch8_images_per_s')}, batch 32 "
        f"{limit.get('batch32_images_per_s')} (one round); served at the seed load, 32 clients: "
        f"{served} x the default's throughput. Its answers against {fidelity['against']}'s over "
        f"the hard-image set ({fidelity['images']} images, default pixels, each with its own "
        f"dtype's prompt embeddings): max probability change (logit scale 100) "
        f"{fidelity['max_probability_change_scale_100']} ({fidelity['worst_image']}), min "
        f"embedding cosine {fidelity['min_cosine']} ({fidelity['worst_cosine_image']})."
    )


def fold_text(fidelity: dict | None) -> str:
    """The CPU's default arithmetic against float64: how far float rounding alone (the folded
    normalisation's included) moves the answers, so that readers see the default is exact."""
    if not fidelity:
        return ""
    return (
        f"The default arithmetic ({fidelity['dtype']}, the pixels' normalisation folded into the "
        f"first layer) against {fidelity['against']} with the pixels normalised as "
        f"CLIPImageProcessor does, over the hard-image set ({fidelity['images']} images): max "
        f"probability change (logit scale 100) {fidelity['max_probability_change_scale_100']} "
        f"({fidelity['worst_image']}), min embedding cosine {fidelity['min_cosine']} "
        f"({fidelity['worst_cosine_image']})."
    )


def summary_block(payload: dict) -> str:
    """The BENCHMARKS.md text of one run: table, limit, ratios, fidelity, plot."""
    limit, fidelity, ratios = payload["limit"], payload["fidelity"], payload["ratios"]
    rows = {row["name"]: row for row in payload["scenarios"]}
    return "\n".join(
        [
            f"Run of {payload['date']} on {payload['machine']} (`{payload['command']}`), "
            "random-weight ViT-B/32, all numbers from this one run.",
            "",
            markdown_table(payload["scenarios"]),
            "",
            bare_model_text(limit),
            "",
            headline_rounds_text(payload["headline_rounds"]),
            "",
            cpu_budget_text(rows["service seed c32"], limit, payload["cpu_cores"]),
            "",
            "| ratio | value |",
            "|---|---|",
            *[f"| {k} | {v} |" for k, v in ratios.items()],
            "",
            fidelity_text(fidelity),
            "",
            dtype_text(fidelity.get("dtype"), payload.get("limit_bfloat16"), ratios),
            "",
            fold_text(fidelity.get("fold")),
            "",
            overhead_text(payload["overhead"]) if "overhead" in payload else "",
            "",
            f"![throughput and p95 vs concurrency]({payload['plot']})",
        ]
    )


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="a smoke run: fewer requests per scenario, results in a temporary folder unless "
        "--out is given, BENCHMARKS.md left alone",
    )
    parser.add_argument("--max-seconds", type=float, default=20, help="per scenario")
    parser.add_argument(
        "--max-requests",
        type=int,
        default=400,
        help="per scenario (a GPU answers 400 in about a second: raise it there)",
    )
    parser.add_argument("--out", type=Path, help="where results go (default: benchmarks/)")
    parser.add_argument(
        "--bare-only",
        action="store_true",
        help="only the in-process measurements (for a machine without BentoML, e.g. a GPU box)",
    )
    parser.add_argument(
        "--long-run",
        type=float,
        metavar="MINUTES",
        help="only a long run of the seed load (8 clients), sampling each process's RSS a minute",
    )
    parser.add_argument(
        "--gpu-targets",
        action="store_true",
        help="only the GPU targets (scripts/gpu_bench.sh runs this): seed load at 1/32/64 "
        "clients, on 4 cores, uncached /embed_texts, bare encoders, fidelity",
    )
    parser.add_argument(
        "--resume",
        type=Path,
        metavar="GPU_TARGETS_JSON",
        help="with --gpu-targets: an earlier run's gpu-targets.json from a machine of this kind; "
        "only the stages it did not finish (cut short or failed) run, and the results are merged",
    )
    parser.add_argument(
        "--gpu-report",
        type=Path,
        metavar="GPU_TARGETS_JSON",
        help="only write a --gpu-targets run's results (brought back from the GPU machine) "
        "into BENCHMARKS.md's GPU section, with each target's verdict",
    )
    parser.add_argument(
        "--overhead",
        action="store_true",
        help="only the tiny-model scenario: seed load at 32 clients vs plain Pillow's rate",
    )
    parser.add_argument(
        "--runner-calls",
        action="store_true",
        help="only the runner-call comparison: one runner called through BentoML's client and "
        "in the wire format, alternating (tiny model)",
    )
    parser.add_argument(
        "--runner-workers",
        type=int,
        nargs="+",
        metavar="N",
        help="only the runner-worker sweep: seed/embedding load with CLIP_RUNNER_WORKERS=N each",
    )
    args = parser.parse_args()
    if args.out is None:
        # A smoke run must not overwrite the committed results.
        args.out = (
            Path(tempfile.mkdtemp(prefix="clip-bench-quick-"))
            if args.quick
            else REPO / "benchmarks"
        )
    if args.bare_only:
        return bare_only(args.out)
    if args.long_run:
        return long_run(args.out, args.long_run)
    if args.gpu_report:
        write_gpu_report(args.gpu_report)
        return 0
    if args.resume and not args.gpu_targets:
        parser.error("--resume goes with --gpu-targets")
    if args.gpu_targets:
        payload = gpu_targets(args.out, 3 if args.quick else args.max_seconds, args.resume)
        print(json.dumps(payload["targets"], indent=1), flush=True)
        erred = any(row["errors"] for row in payload["rows"])
        return 1 if payload.get("stage_errors") or erred else 0
    if args.overhead:
        overhead(args.out, 3, 10**6, 8 if args.quick else args.max_seconds)
        return 0
    if args.runner_calls:
        runner_calls_comparison(args.out, 4 if args.quick else 16, 50)
        return 0
    max_requests = 60 if args.quick else args.max_requests
    max_seconds = 8 if args.quick else args.max_seconds
    if args.runner_workers:
        return runner_worker_sweep(args.out, args.runner_workers, max_requests, max_seconds)
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    home, tag, model_dir = import_random_model()
    fidelity = preprocessing_fidelity(model_dir)
    print(json.dumps(fidelity), flush=True)
    gpu = torch.cuda.is_available()
    if not gpu:
        fidelity["dtype"] = dtype_fidelity(model_dir, "bfloat16")
        fidelity["fold"] = fold_fidelity(model_dir)
        print(json.dumps({name: fidelity[name] for name in ("dtype", "fold")}), flush=True)
    bare = BareModel(model_dir)
    payload = {
        "date": time.strftime("%Y-%m-%d"),
        "machine": f"{device_name()}, {os.cpu_count()} CPU cores ({cpu_name()}), "
        f"torch {torch.__version__}",
        "command": "bash scripts/gpu_bench.sh" if gpu else "python scripts/bench.py",
        "plot": "benchmarks/gpu/throughput.png" if gpu else "benchmarks/throughput.png",
        "api_workers": os.environ.get("CLIP_API_WORKERS", "default"),
        "cpu_cores": os.cpu_count(),
        "limit": {},
        "headline_rounds": [],
        "fidelity": fidelity,
        "ratios": {},
        "scenarios": [],
    }

    small = [jpeg_base64(640, 480, seed) for seed in range(4)]
    large = [jpeg_base64(1834, 2750, seed) for seed in range(4)]
    tiny = [jpeg_base64(224, 224, seed) for seed in range(4)]

    def bodies(images: list[str], classes: list, per_request: int = 1) -> list[bytes]:
        return [
            json.dumps(
                {"images": images[i : i + per_request] or images[:per_request], "classes": classes}
            ).encode()
            for i in range(0, len(images))
        ]

    seed_bodies = seed_request_bodies()
    large_bodies = bodies(large, SEED_CLASSES)
    eight = [json.dumps({"images": (small * 2)[:8], "classes": SEED_CLASSES}).encode()]
    seed_c32 = Scenario("service seed c32", seed_bodies, 1, 32)
    baseline_c32 = Scenario("baseline seed c32", seed_bodies, 1, 32)
    scenarios = [
        Scenario("service seed c1", seed_bodies, 1, 1),
        Scenario("service seed c8", seed_bodies, 1, 8),
        Scenario("service 8 images/request c8", eight, 8, 8),
        Scenario("service large JPEG 1834x2750 c32", large_bodies, 1, 32),
        Scenario("service small JPEG 224x224 c32", bodies(tiny, SEED_CLASSES), 1, 32),
        Scenario("service 1 class c8", bodies(small, [["person", 1]]), 1, 8),
        Scenario("service 50 classes c8", bodies(small, FIFTY_CLASSES), 1, 8),
        Scenario(
            "service embed_images c32",
            seed_request_bodies(classes=None),
            1,
            32,
            "/embed_images",
        ),
    ]
    # One server per variant, each measured on the scenario it changes; compilation last
    # (its start-up is the longest).
    variants = [
        (
            {"CLIP_PREPROCESS": "fast"},
            Scenario("service large JPEG c32, CLIP_PREPROCESS=fast", large_bodies, 1, 32),
        ),
        (
            {"CLIP_TEXT_CACHE_SIZE": "0"},
            Scenario("service seed c32, text cache off", seed_bodies, 1, 32),
        ),
    ]
    if not gpu:  # the opt-in half type on CPU (on a GPU the default is float16 already)
        variants.append(
            (
                {"CLIP_DTYPE": "bfloat16"},
                Scenario("service seed c32, CLIP_DTYPE=bfloat16", seed_bodies, 1, 32),
            )
        )
    compiled = (
        {"CLIP_TORCH_COMPILE": "on"},
        Scenario("service seed c32, CLIP_TORCH_COMPILE=on", seed_bodies, 1, 32),
    )

    def record(row: dict) -> None:
        payload["scenarios"].append(row)
        rows = {r["name"]: r for r in payload["scenarios"]}
        bare_rows = {"bare model": payload["limit"]}
        if "limit_bfloat16" in payload:
            bare_rows["bare model, bfloat16"] = payload["limit_bfloat16"]
        payload["ratios"] = ratios_of({**bare_rows, **rows})
        print(json.dumps(row), flush=True)
        (out / "results.json").write_text(json.dumps(payload, indent=1))  # partial until done

    def run(url: str, pid: int, scenario: Scenario, metrics: bool) -> None:
        record(measure(url, pid, scenario, max_requests, max_seconds, metrics))

    with tempfile.TemporaryDirectory() as tmp:
        with (
            bento_server(home, tag, Path(tmp) / "service.log") as (url, pid),
            baseline_server(model_dir, Path(tmp) / "baseline.log") as (baseline_url, baseline_pid),
        ):
            # The headline ratios first (a run cut short on a lent machine still has them). The
            # bare model, the service and the baseline take turns, round after round, so the
            # minutes-long swings of a shared machine hit all three alike; each reports its
            # median round. The server not being driven sits idle.
            bare_rounds, service_rows, baseline_rows = [], [], []
            for number in range(1, HEADLINE_ROUNDS + 1):
                print(f"headline round {number}: bare model, service, baseline", flush=True)
                bare_rounds.append(bare.round())
                service_rows.append(
                    measure(url, pid, seed_c32, max_requests, max_seconds, metrics=True)
                )
                baseline_rows.append(
                    measure(
                        baseline_url, baseline_pid, baseline_c32, max_requests, max_seconds, False
                    )
                )
                payload["headline_rounds"].append(
                    {
                        "bare_limit_images_per_s": round(batched_best(bare_rounds[-1])[1], 2),
                        "service_images_per_s": service_rows[-1]["images_per_s"],
                        "baseline_images_per_s": baseline_rows[-1]["images_per_s"],
                    }
                )
                print(json.dumps(payload["headline_rounds"][-1]), flush=True)
            payload["limit"] = limit_of(bare_rounds)
            print(json.dumps(payload["limit"]), flush=True)
            if not gpu:  # CLIP_DTYPE=bfloat16's own limit, one round (its variant's ratio)
                half = BareModel(model_dir, dtype_choice="bfloat16")
                payload["limit_bfloat16"] = limit_of([half.round()])
                del half
                print(json.dumps(payload["limit_bfloat16"]), flush=True)
            record(median_row(service_rows))
            record(median_row(baseline_rows))
            for scenario in scenarios:
                run(url, pid, scenario, True)
            for concurrency in (1, 8):
                scenario = Scenario(f"baseline seed c{concurrency}", seed_bodies, 1, concurrency)
                run(baseline_url, baseline_pid, scenario, False)
        for index, (env, scenario) in enumerate([*variants, compiled]):
            with bento_server(home, tag, Path(tmp) / f"variant{index}.log", **env) as (url, pid):
                run(url, pid, scenario, True)

    print("the work around the model: tiny model vs plain Pillow ...", flush=True)
    payload["overhead"] = overhead(out, HEADLINE_ROUNDS, 10**6, max_seconds)
    payload["ratios"]["tiny model seed c32 requests/s / plain Pillow images/s (median round)"] = (
        payload["overhead"]["median"]["ratio"]
    )
    payload["ratios"]["tiny model seed c32 requests/s / plain Pillow images/s (median ratio)"] = (
        payload["overhead"]["median_ratio"]
    )
    (out / "results.json").write_text(json.dumps(payload, indent=1))
    print(json.dumps(payload["ratios"], indent=1), flush=True)
    write_plot(payload["scenarios"], out / "throughput.png")
    block = summary_block(payload)
    (out / "summary.md").write_text(block + "\n")
    if args.quick:
        print(f"smoke run: results in {out}; BENCHMARKS.md left alone", flush=True)
    else:
        update_benchmarks_md(block, "bench-gpu" if gpu else "bench")
    return 0


if __name__ == "__main__":
    sys.exit(main())
