"""Every tunable of the service, read once from the environment.

BentoML evaluates service decorators at import time, so settings are plain values read when
the module is first asked for them; the README's configuration table lists each variable.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass

DEFAULT_HUB_MODEL = "openai/clip-vit-base-patch32"
DEFAULT_TEMPLATE = "a photo of a {name}"
DEFAULT_TOP_K = 3
MAX_TEMPLATES = 100  # prompt ensembling: OpenAI's ImageNet list has 80
TIE_MARGIN = 0.02


def _env_number(name: str, default: float, cast: type, minimum: float) -> float:
    """A number from the environment (blank = default), refused with its name when invalid."""
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    try:
        value = cast(raw)
    except ValueError as exc:
        kind = "an integer" if cast is int else "a number"
        raise ValueError(f"{name} must be {kind}, got {raw!r}") from exc
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return value


def _env_int(name: str, default: int, minimum: int = 1) -> int:
    return int(_env_number(name, default, int, minimum))


def _env_seconds(name: str, default: float) -> float:
    return _env_number(name, default, float, 0.001)


def _env_list(name: str) -> tuple[str, ...]:
    """A comma-separated list from the environment (empty when unset)."""
    return tuple(item.strip() for item in os.environ.get(name, "").split(",") if item.strip())


def _env_choice(name: str, choices: tuple[str, ...]) -> str:
    """One of `choices` (the first is the default), refused with its name otherwise."""
    value = os.environ.get(name, "").strip().lower() or choices[0]
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(choices)}, got {value!r}")
    return value


@dataclass(frozen=True)
class Settings:
    """Service settings; see README "Configuration" for what each one does."""

    model_tag: str
    port: int
    api_workers: int
    request_timeout_s: float
    max_batch_size: int
    max_latency_ms: int
    max_concurrency: int
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
    runner_threads: int
    runner_passes: int
    runner_workers: int
    torch_compile: bool
    model_dir: str  # blank: always the baked-in model

    def __post_init__(self) -> None:
        # The batching window must leave most of the request budget for the work itself.
        if self.max_latency_ms >= self.request_timeout_s * 1000 / 2:
            raise ValueError(
                "CLIP_MAX_LATENCY_MS must be below half of CLIP_REQUEST_TIMEOUT_S "
                f"({self.max_latency_ms} ms vs {self.request_timeout_s} s)"
            )
        if self.fetch_timeout_s >= self.request_timeout_s:
            raise ValueError("CLIP_FETCH_TIMEOUT_S must be below CLIP_REQUEST_TIMEOUT_S")
        if self.fetch_connect_timeout_s > self.fetch_timeout_s:
            raise ValueError("CLIP_FETCH_CONNECT_TIMEOUT_S must not exceed CLIP_FETCH_TIMEOUT_S")


@functools.cache
def get_settings() -> Settings:
    """The process-wide settings, read from the environment on first use."""
    return Settings(
        model_tag=os.environ.get("CLIP_MODEL_TAG", "clip:latest"),
        port=_env_int("CLIP_PORT", 8080),
        api_workers=_env_int("CLIP_API_WORKERS", 1),
        request_timeout_s=_env_seconds("CLIP_REQUEST_TIMEOUT_S", 55.0),
        max_batch_size=_env_int("CLIP_MAX_BATCH_SIZE", 0, minimum=0),
        max_latency_ms=_env_int("CLIP_MAX_LATENCY_MS", 20000),
        max_concurrency=_env_int("CLIP_MAX_CONCURRENCY", 64),
        max_body_bytes=_env_int("CLIP_MAX_BODY_BYTES", 6 * 1024 * 1024),
        max_images_per_request=_env_int("CLIP_MAX_IMAGES_PER_REQUEST", 32),
        max_classes_per_request=_env_int("CLIP_MAX_CLASSES_PER_REQUEST", 1000),
        max_class_name_chars=_env_int("CLIP_MAX_CLASS_NAME_CHARS", 300),
        max_image_bytes=_env_int("CLIP_MAX_IMAGE_BYTES", 10 * 1024 * 1024),
        max_image_pixels=_env_int("CLIP_MAX_IMAGE_PIXELS", 40_000_000),
        fetch_timeout_s=_env_seconds("CLIP_FETCH_TIMEOUT_S", 10.0),
        fetch_connect_timeout_s=_env_seconds("CLIP_FETCH_CONNECT_TIMEOUT_S", 3.0),
        fetch_concurrency=_env_int("CLIP_FETCH_CONCURRENCY", 8),
        fetch_max_redirects=_env_int("CLIP_FETCH_MAX_REDIRECTS", 5, minimum=0),
        fetch_allow=_env_list("CLIP_FETCH_ALLOW"),
        text_cache_size=_env_int("CLIP_TEXT_CACHE_SIZE", 4096, minimum=0),
        fast_preprocessing=_env_choice("CLIP_PREPROCESS", ("fast", "reference")) == "fast",
        runner_threads=_env_int("CLIP_RUNNER_THREADS", 0, minimum=0),
        runner_passes=_env_int("CLIP_RUNNER_PASSES", 0, minimum=0),
        runner_workers=_env_int("CLIP_RUNNER_WORKERS", 1),
        torch_compile=_env_choice("CLIP_TORCH_COMPILE", ("off", "on")) == "on",
        model_dir=os.environ.get("CLIP_MODEL_DIR", "/opt/ml/model").strip(),
    )
