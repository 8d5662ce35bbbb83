"""Every tunable of the service, read once from the environment.

BentoML evaluates service decorators at import time, so settings are plain values read when
the module is first asked for them; the README's configuration table lists each variable.
"""

from __future__ import annotations

import errno
import functools
import ipaddress
import math
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import yaml
from bentoml.exceptions import BentoMLConfigException, BentoMLException

from clip_runner.cpu_quota import usable_cores
from clip_runner.cuda_check import usable_gpus
from clip_runner.errors import quoted
from clip_runner.model.model_source import SAGEMAKER_MODEL_DIR

# A bento's manifest, where `bentoml build` writes it: beside src/, which holds this file
# (src/clip_runner/config.py); a checkout has none there.
BENTO_MANIFEST = Path(__file__).resolve().parents[2] / "bento.yaml"
RUNNER = "clip_runner"  # the runner service's name in a bento's manifest
DEFAULT_HUB_MODEL = "openai/clip-vit-base-patch32"
DEFAULT_TEMPLATE = "a photo of a {name}"
DEFAULT_TOP_K = 3
MAX_TEMPLATES = 100  # prompt ensembling: OpenAI's ImageNet list has 80
TIE_MARGIN = 0.02
MIB = 1024 * 1024
# With several API workers, about one answer in this many closes its connection, so keep-alive
# clients spread over the workers (connection_recycling.py).
KEEPALIVE_REQUESTS_WITH_SEVERAL_WORKERS = 20
# With several runner workers, about one runner call in this many closes its connection, so an
# API worker's calls are dealt out among them anew (answers/direct_runner.calls_per_connection).
RUNNER_CALLS_PER_CONNECTION_WITH_SEVERAL_RUNNERS = 8
# CLIP_ENDPOINT_KIND -> default (CLIP_REQUEST_TIMEOUT_S, CLIP_MAX_BODY_BYTES), from SageMaker's
# limits: real-time invocations answer within 60 s and carry at most 6 MB; asynchronous ones run
# up to 15 minutes (InvokeEndpointAsync's default InvocationTimeoutSeconds) on payloads of up to
# 1 GB read from S3; a Batch Transform mini-batch may take up to an hour
# (ModelClientConfig.InvocationsTimeoutInSeconds, which deploy_sagemaker.py sets to 3600) and is
# 6 MB by default (MaxPayloadInMB). Each timeout leaves SageMaker's own 5 s to spare.
# SageMaker's largest Batch Transform mini-batch (MaxPayloadInMB at most 100).
MAX_MINI_BATCH_BYTES = 100 * MIB
ENDPOINT_KINDS = {
    "realtime": (55.0, 6 * MIB),
    "async": (895.0, 1024 * MIB),
    "batch": (3595.0, 6 * MIB),
}


class SettingError(ValueError, BentoMLConfigException):
    """A setting refused. A BentoML configuration error, so that `bentoml serve` stops with its
    one line (`Error: [serve] `serve` failed: ...`) rather than a 70-line traceback that buried
    the one line saying what was wrong."""


# The shortest request deadline: an API worker's calls to the runner get half of it less a
# second each (service.py), so at one second or under they timed out at once, forever, and the
# server never became ready.
MIN_REQUEST_TIMEOUT_S = 2.0


def _env_number(
    name: str, default: float, cast: type, minimum: float, maximum: float = math.inf
) -> float:
    """A number from the environment (blank = default), refused with its name when invalid."""
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    kind = "an integer" if cast is int else "a number"
    # Python's int() and float() also read `1_0` as 10 and other scripts' digits (`١` as 1).
    if not raw.isascii() or "_" in raw:
        raise SettingError(f"{name} must be {kind} in ASCII digits, got {quoted(raw)!r}")
    try:
        value = cast(raw)
    except ValueError as exc:
        raise SettingError(f"{name} must be {kind}, got {quoted(raw)!r}") from exc
    # nan passes every comparison below, and inf is no time limit; an int is always finite
    # (math.isfinite refused one past a float's range with an OverflowError naming nothing).
    if isinstance(value, float) and not math.isfinite(value):
        raise SettingError(f"{name} must be a finite number, got {quoted(raw)!r}")
    if value < minimum:
        raise SettingError(f"{name} must be >= {minimum}, got {quoted(str(value))}")
    if value > maximum:
        raise SettingError(f"{name} must be <= {maximum}, got {quoted(str(value))}")
    return value


def _env_int(name: str, default: int, minimum: int = 1, maximum: float = math.inf) -> int:
    return int(_env_number(name, default, int, minimum, maximum))


def _env_seconds(name: str, default: float, minimum: float = 0.001) -> float:
    return _env_number(name, default, float, minimum)


def _env_list(name: str) -> tuple[str, ...]:
    """A comma-separated list from the environment (empty when unset)."""
    return tuple(item.strip() for item in os.environ.get(name, "").split(",") if item.strip())


def _env_choice(name: str, choices: tuple[str, ...]) -> str:
    """One of `choices` (the first is the default), refused with its name otherwise."""
    value = os.environ.get(name, "").strip().lower() or choices[0]
    if value not in choices:
        raise SettingError(f"{name} must be one of {', '.join(choices)}, got {quoted(value)!r}")
    return value


def _api_key() -> str | None:
    """CLIP_API_KEY (blank: none), refused unless printable ASCII without spaces: a header value
    is sent as bytes, and clients disagree on the bytes of any other character (a browser sends
    Latin-1, curl UTF-8, httpx refuses it), so such a key would match for some clients only."""
    key = os.environ.get("CLIP_API_KEY", "").strip()
    if key and not all("!" <= character <= "~" for character in key):
        raise SettingError(
            "CLIP_API_KEY must be printable ASCII without spaces (letters, digits, punctuation): "
            "HTTP clients send other characters as different bytes"
        )
    return key or None


def _fetch_allow() -> tuple[str, ...]:
    """CLIP_FETCH_ALLOW's entries, each a CIDR / IP address or a host name. Anything else (a
    prefix past 32 bits, `*.internal`, `http://x.com`, `host:8080`) was kept as a host name that
    no URL's host can equal: image URLs stayed refused, and nothing said why."""
    entries = _env_list("CLIP_FETCH_ALLOW")
    for entry in entries:
        try:
            ipaddress.ip_network(entry, strict=False)
        except ValueError:
            if any(mark in entry for mark in "/*:@ \t"):
                raise SettingError(
                    f"CLIP_FETCH_ALLOW entry {quoted(entry)!r} is neither a CIDR / IP address nor "
                    "a host name (wildcards, schemes, ports and paths never match a URL's host)"
                ) from None
    return entries


def built_model_tag(manifest: Path = BENTO_MANIFEST) -> str | None:
    """The model the bento this code runs from was built with (its runner's, in the bento's
    bento.yaml), or None outside one of this service's bentos.

    A local bento only refers to the store's models: `bentoml serve clip-bentoml:latest` had
    served the store's newest `clip` (CLIP_MODEL_TAG's default), not the model it was built
    with, whenever another had been imported since. An image holds only that model anyway."""
    if not manifest.is_file():
        return None
    try:
        built = yaml.safe_load(manifest.read_text(encoding="utf-8"))
        if built.get("service") != "service:ClipService":
            return None
        runner = next(service for service in built["services"] if service["name"] == RUNNER)
        return str(runner["models"][0]["tag"])
    except (
        OSError,
        yaml.YAMLError,
        AttributeError,
        KeyError,
        IndexError,
        TypeError,
        StopIteration,
    ):  # not a manifest this service wrote (or no runner in it)
        return None


def _model_tag() -> str:
    """CLIP_MODEL_TAG (blank: the model a bento was built with, else `clip:latest`), refused
    with its name when BentoML could not read it: an unset-looking `""` or a trailing space had
    failed as `Invalid Tag clip:latest `."""
    from bentoml import Tag

    tag = os.environ.get("CLIP_MODEL_TAG", "").strip() or built_model_tag() or "clip:latest"
    try:
        Tag.from_taglike(tag)
    except (ValueError, BentoMLException) as exc:
        raise SettingError(f"CLIP_MODEL_TAG {quoted(tag)!r} is not a BentoML tag: {exc}") from None
    return tag


def _port() -> int:
    """CLIP_PORT, else BentoML's BENTOML_PORT, else 8080; refused when the two differ. BentoML
    listens on BENTOML_PORT when it is set (the image sets it to 8080; its entrypoint copies
    `PORT` into it), so a CLIP_PORT beside a different one had no effect."""
    port = _env_int("CLIP_PORT", 0, maximum=65535)  # else refused only at the bind
    bentoml_port = os.environ.get("BENTOML_PORT", "").strip()
    if not port:
        return _env_int("BENTOML_PORT", 8080, maximum=65535)
    if bentoml_port and bentoml_port != str(port):
        raise SettingError(
            f"CLIP_PORT ({port}) and BENTOML_PORT ({quoted(bentoml_port)}) differ: BentoML "
            "listens on BENTOML_PORT (a container's `PORT` sets it), so set that one alone"
        )
    return port


def refuse_ports_it_cannot_listen_on() -> None:
    """Have BentoML's supervisor stop in one line, as for a setting refused, where it cannot
    listen on its port: one taken by another server (a second `make serve`, the first run's
    left running) or one it may not take (below 1024 without root) had ended the start in
    circus's `OSError` and a 58-line traceback."""
    from circus.sockets import CircusSocket

    bind_and_listen = CircusSocket.bind_and_listen
    if getattr(bind_and_listen, "refuses_in_one_line", False):
        return

    def bind_or_refuse(listener: CircusSocket) -> None:
        try:
            bind_and_listen(listener)
        except OSError as error:
            if listener.is_unix:
                raise
            where = f"{listener.host}:{listener.port}"
            if error.errno == errno.EADDRINUSE:
                raise SettingError(
                    f"cannot listen on {where}: another process has the port (a server still "
                    "running?); stop it, or serve on another port (CLIP_PORT)"
                ) from None
            raise SettingError(f"cannot listen on {where}: {error.strerror}") from None

    bind_or_refuse.refuses_in_one_line = True  # type: ignore[attr-defined]
    CircusSocket.bind_and_listen = bind_or_refuse  # type: ignore[method-assign]


def _env_switch(name: str, auto: Callable[[], bool]) -> bool:
    """`on`, `off`, or `auto` (the default): then `auto()` decides, from the machine."""
    choice = _env_choice(name, ("auto", "on", "off"))
    return auto() if choice == "auto" else choice == "on"


# Rates of this project's 2-core development machine (BENCHMARKS.md), used only to tell a model
# that outruns one API worker by far from one that does not: one core runs ViT-B/32's vision
# tower at about 35 GMAC/s (15.6 images/s at 4.4 GMAC on two), and one API worker decodes,
# resizes and answers about 250 seed requests/s when nothing else limits it.
CPU_CORE_GMACS_PER_S = 35.0
API_WORKER_IMAGES_PER_S = 250.0


def cpu_api_workers(cores: int, image_gmacs: float | None) -> int:
    """API workers on CPU: as many as the model's image rate on these cores needs, at most one
    per core; one when the model's cost is unknown.

    An API worker's event loop holds its own GIL, so one serves at most about 250 requests/s.
    Any real CLIP costs far more than that on a CPU (ViT-B/32 runs about 16 images/s on 2
    cores), and a second worker there only took CPU from the model and shrank the runner's
    calls: 0.86 x the bare model against 0.96 x with one (BENCHMARKS.md). A cheap model (the
    tiny test model, 0.006 GMAC) is limited by the image work instead, and two workers on 2
    cores served it about 1.2 x the requests.
    """
    if image_gmacs is None or image_gmacs <= 0:
        return 1
    model_images_per_s = cores * CPU_CORE_GMACS_PER_S / image_gmacs
    return max(1, min(cores, math.ceil(model_images_per_s / API_WORKER_IMAGES_PER_S)))


def default_api_workers(model_tag: str, model_dir: str) -> int:
    """API workers when CLIP_API_WORKERS is unset: on CPU by the served model's cost
    (`cpu_api_workers`); on a GPU half the cores this process may use (at least two).

    On a GPU the API workers' per-request Python work is the limit: with JPEGs forwarded one
    costs about 2.2 ms of CPU per request, so one tops out near 450 requests/s; the other half of
    the cores is left to the runner processes and the OS.
    """
    cores = usable_cores()  # its CPU affinity, capped by a CPU quota (cpu_quota.py)
    if usable_gpus() > 0:
        return max(2, cores // 2)
    from clip_runner.model.model_cost import checkpoint_image_gmacs
    from clip_runner.model.model_source import served_checkpoint

    checkpoint = served_checkpoint(model_tag, model_dir)
    return cpu_api_workers(cores, checkpoint_image_gmacs(checkpoint) if checkpoint else None)


def default_runner_workers() -> int:
    """Runner processes when CLIP_RUNNER_WORKERS is unset: one on CPU (a second only splits the
    cores); two per GPU, each pair sharing one (model/gpu_placement.py), so one process's Python
    work (HTTP, batching, decoding set-up) overlaps the other's forward pass (BENCHMARKS.md, GPU
    section: 1.5 x at 32 clients before call merging)."""
    gpus = usable_gpus()
    return 2 * gpus if gpus else 1


def runner_decode_threads(cores: int, runner_workers: int) -> int:
    """Threads each runner process decodes forwarded JPEGs with when Pillow does it (on CPU, or
    CLIP_RUNNER_JPEG_DECODER=pillow on a GPU): its share of the cores, at most 8. Pillow lets go
    of the GIL while it decodes, so a batch's JPEGs decode side by side."""
    return max(1, min(8, cores // max(1, runner_workers)))


@dataclass(frozen=True)
class Settings:
    """Service settings; see README "Configuration" for what each one does."""

    model_tag: str
    port: int
    api_workers: int  # 0: by machine and model (api_worker_count)
    keepalive_requests: int  # -1: by API workers (answers_per_connection); 0: never close
    request_timeout_s: float
    max_batch_size: int
    max_text_batch_size: int
    max_latency_ms: int
    max_concurrency: int
    max_lines: int
    max_body_bytes: int
    max_images_per_request: int
    max_classes_per_request: int
    max_class_name_chars: int
    max_image_bytes: int
    max_image_pixels: int
    fetch_timeout_s: float
    fetch_connect_timeout_s: float
    fetch_concurrency: int
    fetch_max_redirects: int
    fetch_allow: tuple[str, ...]
    text_cache_size: int
    fast_preprocessing: bool
    decode_jpegs_on: str  # auto (the runner where it has a GPU: forwards_jpegs), api, runner
    runner_jpeg_decoder: str  # pillow (libjpeg's exact pixels) or nvjpeg (opt-in: faster, inexact)
    runner_threads: int
    runner_passes: int
    runner_workers: int
    runner_calls: int  # per API worker; 0: by device and worker counts (calls_in_flight)
    direct_runner_calls: bool  # the runner's wire format (answers/direct_runner.py), not BentoML's
    torch_compile: bool
    dtype: str  # the model's: auto (float16 on a GPU, float32 on CPU), float32, bfloat16, float16
    cuda_graphs: bool  # auto: on a GPU, unless torch_compile
    access_log: bool  # BentoML's access log, a line per request; auto: on CPU only
    switch_interval_ms: float  # how long Python runs before a waiting thread gets the GIL
    cuda_wait: str  # block (a thread waiting for the GPU sleeps) or spin (it polls, a core busy)
    stalled_pass_s: float  # a pass running longer ends the runner process; 0: never
    endpoint_kind: str
    # Abuse bounds (issue 15): slow uploads, costly images, an optional API key.
    body_timeout_s: float
    header_timeout_s: float
    send_timeout_s: float  # an answer's client may read nothing of it this long (send_deadline.py)
    max_header_bytes: int
    max_waiting_bodies: int
    max_waiting_body_bytes: int
    max_request_pixels: int
    max_decoding_pixels: int  # per API worker, summed over the images its threads decode
    api_key: str | None
    model_dir: str  # blank: always the baked-in model

    @functools.cached_property
    def api_worker_count(self) -> int:
        """CLIP_API_WORKERS, or the default for this machine and model.

        Looked up on first use, not with the other settings: sizing by the model reads the model
        store, which must not happen as a side effect of importing a module that reads settings.
        """
        return self.api_workers or default_api_workers(self.model_tag, self.model_dir)

    @functools.cached_property
    def answers_per_connection(self) -> int:
        """About how many answers a keep-alive connection carries before it is closed (0: no
        bound): CLIP_KEEPALIVE_REQUESTS, or a bound only where several API workers share the
        port (one worker gains nothing from reconnects)."""
        if self.keepalive_requests >= 0:
            return self.keepalive_requests
        return KEEPALIVE_REQUESTS_WITH_SEVERAL_WORKERS if self.api_worker_count > 1 else 0

    def __post_init__(self) -> None:
        # The batching window must leave most of the request budget for the work itself.
        if self.max_latency_ms >= self.request_timeout_s * 1000 / 2:
            raise SettingError(
                "CLIP_MAX_LATENCY_MS must be below half of CLIP_REQUEST_TIMEOUT_S "
                f"({self.max_latency_ms} ms vs {self.request_timeout_s} s)"
            )
        if self.decode_jpegs_on == "api" and self.runner_jpeg_decoder == "nvjpeg":
            raise SettingError(
                "CLIP_RUNNER_JPEG_DECODER=nvjpeg decodes the JPEGs forwarded to the runner, and "
                "CLIP_DECODE=api forwards none: it would have no effect; unset one of them"
            )
        if self.torch_compile and self.cuda_graphs:
            raise SettingError(
                "CLIP_TORCH_COMPILE and CLIP_CUDA_GRAPHS both replace the image tower's forward "
                "pass: turn one of them on, not both"
            )
        # Each says both values: either may be a default derived from another setting.
        if self.fetch_timeout_s >= self.request_timeout_s:
            raise SettingError(
                "CLIP_FETCH_TIMEOUT_S must be below CLIP_REQUEST_TIMEOUT_S "
                f"({self.fetch_timeout_s:g} s vs {self.request_timeout_s:g} s)"
            )
        if self.fetch_connect_timeout_s > self.fetch_timeout_s:
            raise SettingError(
                "CLIP_FETCH_CONNECT_TIMEOUT_S must not exceed CLIP_FETCH_TIMEOUT_S "
                f"({self.fetch_connect_timeout_s:g} s vs {self.fetch_timeout_s:g} s; the fetch "
                "timeout's default is half of CLIP_REQUEST_TIMEOUT_S, at most 10 s)"
            )
        # A pass takes milliseconds on a GPU: under a second, every pass would look stalled and
        # the runner exit (status 70) at each, BentoML restarting it for ever.
        if 0 < self.stalled_pass_s < 1:
            raise SettingError(
                f"CLIP_STALLED_PASS_S must be 0 (off) or at least 1 s, got {self.stalled_pass_s:g}"
            )
        # One largest body must fit, or no request of that size could ever be admitted.
        if self.max_waiting_body_bytes < self.max_body_bytes:
            raise SettingError(
                "CLIP_MAX_WAITING_BODY_BYTES must be at least CLIP_MAX_BODY_BYTES "
                f"({self.max_waiting_body_bytes} vs {self.max_body_bytes} bytes; the body limit's "
                "default follows CLIP_ENDPOINT_KIND)"
            )


# The most of each count a setting may ask for: far past any machine's use, short of what
# cannot start (torch refused 10**23 threads with an overflow, and BentoML restarted the runner
# for ever; 10**23 API workers grew the supervisor by 4 GB in 10 s; a batch of 100,000 images
# built 400,000 warm-up prompts and passed 5 GB). Refused at start, as any invalid value.
MOST_API_WORKERS = 256
MOST_RUNNER_WORKERS = 64
MOST_RUNNER_THREADS = 1024
MOST_RUNNER_PASSES = 16
MOST_RUNNER_CALLS = 256
MOST_IMAGE_BATCH = 4096
MOST_TEXT_BATCH = 16384
# Python keeps a larger interval silently as 0.0 (a switch at every chance: the opposite).
MOST_SWITCH_INTERVAL_MS = 1000.0

# Where BentoML reads its own configuration from (a YAML file, key=value options, JSON).
BENTOML_CONFIG_VARIABLES = ("BENTOML_CONFIG", "BENTOML_CONFIG_OPTIONS", "BENTOML_CONFIG_OVERRIDES")


def refuse_bentoml_worker_counts(workers: dict[str, tuple[str, int]]) -> None:
    """Refuse a BentoML configuration that sets a service's `workers` (`services.NAME.workers`):
    `workers` maps each service's name to the setting that sizes it and its value. BentoML's
    configuration wins over the service's own count, but everything sized by that count (the
    runner calls in flight, keep-alive recycling, Batch Transform's MaxConcurrentTransforms)
    kept the count the settings gave: one API worker forced so ran one runner call at a time.
    """
    if not any(os.environ.get(name) for name in BENTOML_CONFIG_VARIABLES):
        return
    from bentoml._internal.configuration import (
        get_bentoml_config_file_from_env,
        get_bentoml_override_config_from_env,
        get_bentoml_override_config_json_from_env,
    )
    from bentoml._internal.configuration.containers import BentoMLConfiguration

    ours = {name: {"workers": count} for name, (_, count) in workers.items()}
    merged = BentoMLConfiguration(
        override_config_file=get_bentoml_config_file_from_env(),
        override_config_values=get_bentoml_override_config_from_env(),
        override_defaults={"services": ours},
        override_config_json=get_bentoml_override_config_json_from_env(),
        use_version=2,
    ).to_dict()
    for name, (variable, count) in workers.items():
        theirs = merged["services"][name]["workers"]
        if theirs != count:
            raise SettingError(
                f"BentoML's configuration sets services.{name}.workers to {theirs!r}; set "
                f"{variable} instead (what else is sized by the worker count follows it)"
            )


@functools.cache
def get_settings() -> Settings:
    """The process-wide settings, read from the environment on first use."""
    endpoint_kind = _env_choice("CLIP_ENDPOINT_KIND", tuple(ENDPOINT_KINDS))
    kind_timeout_s, kind_body_bytes = ENDPOINT_KINDS[endpoint_kind]
    max_body_bytes = _env_int("CLIP_MAX_BODY_BYTES", kind_body_bytes)
    # An async endpoint's payload (up to 1 GB, from S3 through SageMaker's own network) gets two
    # minutes to arrive; a real-time or batch body (6 MB) ten seconds.
    body_timeout_s = _env_seconds(
        "CLIP_BODY_TIMEOUT_S", 120.0 if endpoint_kind == "async" else 10.0
    )
    request_timeout_s = _env_seconds(
        "CLIP_REQUEST_TIMEOUT_S", kind_timeout_s, minimum=MIN_REQUEST_TIMEOUT_S
    )
    # A Batch Transform mini-batch's lines queue for the runner behind each other, and shedding
    # one (503) fails the whole mini-batch, which SageMaker retries as it was: the queue bound is
    # ten minutes of its hour there (a quarter of a shorter deadline), 20 s where a caller waits
    # for the answer, or a quarter of a deadline under 40 s (it must stay below half of it: a
    # CLIP_REQUEST_TIMEOUT_S of 30 alone had been refused, naming CLIP_MAX_LATENCY_MS).
    quarter_ms = int(request_timeout_s * 1000 / 4)
    max_latency_ms = 20_000 if request_timeout_s * 1000 / 2 > 20_000 else quarter_ms
    if endpoint_kind == "batch":
        max_latency_ms = min(600_000, quarter_ms)
    # An image fetch has 10 s, or half a shorter deadline; its connection 3 s of that.
    fetch_timeout_s = _env_seconds("CLIP_FETCH_TIMEOUT_S", min(10.0, request_timeout_s / 2))
    max_image_pixels = _env_int("CLIP_MAX_IMAGE_PIXELS", 40_000_000)
    torch_compile = _env_choice("CLIP_TORCH_COMPILE", ("off", "on")) == "on"
    return Settings(
        model_tag=_model_tag(),
        port=_port(),
        api_workers=_env_int("CLIP_API_WORKERS", 0, minimum=0, maximum=MOST_API_WORKERS),
        keepalive_requests=_env_int("CLIP_KEEPALIVE_REQUESTS", -1, minimum=0),
        request_timeout_s=request_timeout_s,
        max_batch_size=_env_int("CLIP_MAX_BATCH_SIZE", 0, minimum=0, maximum=MOST_IMAGE_BATCH),
        max_text_batch_size=_env_int(
            "CLIP_MAX_TEXT_BATCH_SIZE", 0, minimum=0, maximum=MOST_TEXT_BATCH
        ),
        max_latency_ms=_env_int("CLIP_MAX_LATENCY_MS", max_latency_ms),
        max_concurrency=_env_int("CLIP_MAX_CONCURRENCY", 64),
        # One line per 32 bytes of the largest body up to Batch Transform's largest mini-batch
        # (the shortest line naming an image is about 46 bytes), at least 200,000: a raised body
        # limit, advertised as MaxPayloadInMB, is filled; an async endpoint's 1 GB limit would
        # have allowed 33 million lines, some 9 GB of answers to blank lines.
        max_lines=_env_int(
            "CLIP_MAX_LINES", max(200_000, min(max_body_bytes, MAX_MINI_BATCH_BYTES) // 32)
        ),
        max_body_bytes=max_body_bytes,
        max_images_per_request=_env_int("CLIP_MAX_IMAGES_PER_REQUEST", 32),
        max_classes_per_request=_env_int("CLIP_MAX_CLASSES_PER_REQUEST", 1000),
        max_class_name_chars=_env_int("CLIP_MAX_CLASS_NAME_CHARS", 300),
        max_image_bytes=_env_int("CLIP_MAX_IMAGE_BYTES", 10 * 1024 * 1024),
        max_image_pixels=max_image_pixels,
        fetch_timeout_s=fetch_timeout_s,
        fetch_connect_timeout_s=_env_seconds(
            "CLIP_FETCH_CONNECT_TIMEOUT_S", min(3.0, fetch_timeout_s)
        ),
        fetch_concurrency=_env_int("CLIP_FETCH_CONCURRENCY", 8),
        fetch_max_redirects=_env_int("CLIP_FETCH_MAX_REDIRECTS", 5, minimum=0),
        fetch_allow=_fetch_allow(),
        text_cache_size=_env_int("CLIP_TEXT_CACHE_SIZE", 4096, minimum=0),
        fast_preprocessing=_env_choice("CLIP_PREPROCESS", ("reference", "fast")) == "fast",
        decode_jpegs_on=_env_choice("CLIP_DECODE", ("auto", "api", "runner")),
        runner_jpeg_decoder=_env_choice("CLIP_RUNNER_JPEG_DECODER", ("pillow", "nvjpeg")),
        runner_threads=_env_int("CLIP_RUNNER_THREADS", 0, minimum=0, maximum=MOST_RUNNER_THREADS),
        runner_passes=_env_int("CLIP_RUNNER_PASSES", 0, minimum=0, maximum=MOST_RUNNER_PASSES),
        runner_workers=_env_int("CLIP_RUNNER_WORKERS", 0, minimum=0, maximum=MOST_RUNNER_WORKERS)
        or default_runner_workers(),
        runner_calls=_env_int("CLIP_RUNNER_CALLS", 0, minimum=0, maximum=MOST_RUNNER_CALLS),
        direct_runner_calls=_env_choice("CLIP_DIRECT_RUNNER_CALLS", ("on", "off")) == "on",
        torch_compile=torch_compile,
        dtype=_env_choice("CLIP_DTYPE", ("auto", "float32", "bfloat16", "float16")),
        # On an H200 graphs doubled the seed load at 64 clients and halved one client's p50
        # (BENCHMARKS.md, GPU); torch.compile replaces the same forward pass, so not with it.
        cuda_graphs=_env_switch(
            "CLIP_CUDA_GRAPHS", lambda: usable_gpus() > 0 and not torch_compile
        ),
        # On a GPU the line's CPU is what the API workers run out of: without it the 4-core
        # server served 1.47 x the seed load (BENCHMARKS.md, GPU).
        access_log=_env_switch("CLIP_ACCESS_LOG", lambda: usable_gpus() == 0),
        switch_interval_ms=_env_number(
            "CLIP_SWITCH_INTERVAL_MS", 5.0, float, 0.01, MOST_SWITCH_INTERVAL_MS
        ),
        cuda_wait=_env_choice("CLIP_CUDA_WAIT", ("block", "spin")),
        # A GPU pass takes milliseconds; one a minute old waits for a device that stopped
        # (device_health.py). A CPU pass of a large model on a small machine may be slow, and
        # torch.compile may compile again for a new shape in the middle of serving.
        stalled_pass_s=_env_number(
            "CLIP_STALLED_PASS_S",
            60.0 if usable_gpus() > 0 and not torch_compile else 0.0,
            float,
            0.0,
        ),
        endpoint_kind=endpoint_kind,
        body_timeout_s=body_timeout_s,
        header_timeout_s=_env_seconds("CLIP_HEADER_TIMEOUT_S", 10.0),
        # As long as a body may take to arrive: an async endpoint's answers are as large.
        send_timeout_s=_env_seconds("CLIP_SEND_TIMEOUT_S", body_timeout_s),
        max_header_bytes=_env_int("CLIP_MAX_HEADER_BYTES", 64 * 1024),
        max_waiting_bodies=_env_int("CLIP_MAX_WAITING_BODIES", 512),
        max_waiting_body_bytes=_env_int(
            "CLIP_MAX_WAITING_BODY_BYTES", max(256 * 1024 * 1024, max_body_bytes)
        ),
        max_request_pixels=_env_int("CLIP_MAX_REQUEST_PIXELS", 200_000_000),
        # One image at the pixel limit decodes alone, or several smaller ones at once: a 12-Mpx
        # photo takes less than a third (images/decode_budget.py has the bytes a pixel costs).
        max_decoding_pixels=_env_int("CLIP_MAX_DECODING_PIXELS", 0, minimum=0) or max_image_pixels,
        api_key=_api_key(),
        model_dir=os.environ.get("CLIP_MODEL_DIR", SAGEMAKER_MODEL_DIR).strip(),
    )
