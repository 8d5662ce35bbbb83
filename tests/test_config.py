"""Settings read from the environment, with the batching bound kept under the request timeout."""

from __future__ import annotations

import os

import pytest

from clip_runner.config import get_settings


@pytest.fixture(autouse=True)
def fresh_settings():
    get_settings.cache_clear()
    yield
    get_settings.cache_clear()


def test_defaults_match_sagemaker(monkeypatch):
    for name in ("CLIP_PORT", "CLIP_REQUEST_TIMEOUT_S", "CLIP_MAX_LATENCY_MS"):
        monkeypatch.delenv(name, raising=False)
    settings = get_settings()
    assert settings.port == 8080 and settings.request_timeout_s == 55  # under SageMaker's 60
    assert settings.max_body_bytes == 6 * 1024 * 1024
    assert settings.fast_preprocessing is False and settings.runner_threads == 0  # exact
    assert settings.decode_jpegs_on == "auto"
    assert settings.runner_workers == 1 and settings.api_workers == 1  # on CPU
    assert settings.runner_passes == 0 and settings.max_batch_size == 0  # 0: chosen per device
    assert settings.torch_compile is False
    assert settings.max_latency_ms < settings.request_timeout_s * 1000


def test_environment_overrides(monkeypatch):
    monkeypatch.setenv("CLIP_MAX_BATCH_SIZE", "8")
    monkeypatch.setenv("CLIP_MODEL_TAG", "clip:abc")
    monkeypatch.setenv("CLIP_FETCH_ALLOW", " 10.0.0.0/8, images.lan ,")
    monkeypatch.setenv("CLIP_TORCH_COMPILE", "ON")
    monkeypatch.setenv("CLIP_RUNNER_WORKERS", "3")
    monkeypatch.setenv("CLIP_RUNNER_PASSES", "4")
    settings = get_settings()
    assert settings.runner_workers == 3 and settings.runner_passes == 4
    assert settings.torch_compile is True
    assert settings.max_batch_size == 8 and settings.model_tag == "clip:abc"
    assert settings.fetch_allow == ("10.0.0.0/8", "images.lan")


@pytest.mark.parametrize(
    ("name", "value", "message"),
    [
        ("CLIP_MAX_BATCH_SIZE", "many", "must be an integer"),
        ("CLIP_MAX_BATCH_SIZE", "-1", "must be >= 0"),
        ("CLIP_RUNNER_PASSES", "two", "must be an integer"),
        ("CLIP_RUNNER_WORKERS", "-1", "must be >= 0"),
        ("CLIP_API_WORKERS", "-2", "must be >= 0"),
        ("CLIP_DECODE", "gpu", "must be one of auto, api, runner"),
        ("CLIP_REQUEST_TIMEOUT_S", "-3", "must be >= 0.001"),
        ("CLIP_FETCH_TIMEOUT_S", "soon", "must be a number"),
        ("CLIP_MAX_LATENCY_MS", "50000", "below half of CLIP_REQUEST_TIMEOUT_S"),
        ("CLIP_FETCH_TIMEOUT_S", "90", "below CLIP_REQUEST_TIMEOUT_S"),
        ("CLIP_FETCH_CONNECT_TIMEOUT_S", "20", "must not exceed CLIP_FETCH_TIMEOUT_S"),
        ("CLIP_PREPROCESS", "quick", "must be one of reference, fast"),
        ("CLIP_TORCH_COMPILE", "yes", "must be one of off, on"),
        ("CLIP_BODY_TIMEOUT_S", "0", "must be >= 0.001"),
        ("CLIP_MAX_WAITING_BODIES", "0", "must be >= 1"),
        ("CLIP_MAX_WAITING_BODY_BYTES", "1000", "at least CLIP_MAX_BODY_BYTES"),
        ("CLIP_MAX_REQUEST_PIXELS", "lots", "must be an integer"),
    ],
)
def test_bad_values_are_refused_with_the_variable_name(monkeypatch, name, value, message):
    monkeypatch.setenv(name, value)
    with pytest.raises(ValueError, match=message):
        get_settings()


@pytest.mark.parametrize(
    ("kind", "timeout_s", "body_mib"),
    [("realtime", 55, 6), ("async", 895, 1024), ("batch", 3595, 6)],
)
def test_request_timeout_and_body_limit_follow_the_endpoint_kind(
    monkeypatch, kind, timeout_s, body_mib
):
    """SageMaker waits 60 s on a real-time call, 15 min on an async one and up to an hour on a
    Batch Transform mini-batch; async payloads come from S3 and may reach 1 GB."""
    for name in ("CLIP_REQUEST_TIMEOUT_S", "CLIP_MAX_BODY_BYTES"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("CLIP_ENDPOINT_KIND", kind.upper())
    settings = get_settings()
    assert settings.endpoint_kind == kind
    assert settings.request_timeout_s == timeout_s
    assert settings.max_body_bytes == body_mib * 1024 * 1024
    get_settings.cache_clear()
    monkeypatch.setenv("CLIP_REQUEST_TIMEOUT_S", "120")  # an explicit value still wins
    assert get_settings().request_timeout_s == 120


def test_unknown_endpoint_kind_is_refused(monkeypatch):
    monkeypatch.setenv("CLIP_ENDPOINT_KIND", "serverless")
    with pytest.raises(
        ValueError, match="CLIP_ENDPOINT_KIND must be one of realtime, async, batch"
    ):
        get_settings()


def test_workers_by_machine(monkeypatch):
    """On CPU one API and one runner worker; where torch sees a GPU, half the usable cores (at
    least two) of API workers and two runner workers (CUDA's presence is what is stubbed here)."""
    import torch

    from clip_runner.config import default_api_workers, default_runner_workers

    assert (default_api_workers(), default_runner_workers()) == (1, 1)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    for cores, api_workers in ((16, 8), (12, 6), (4, 2), (2, 2)):
        monkeypatch.setattr(os, "sched_getaffinity", lambda _pid, n=cores: set(range(n)))
        assert default_api_workers() == api_workers
    assert default_runner_workers() == 2


def test_abuse_bounds_default_and_the_api_key_is_off_unless_set(monkeypatch):
    for name in ("CLIP_BODY_TIMEOUT_S", "CLIP_MAX_WAITING_BODIES", "CLIP_MAX_REQUEST_PIXELS"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("CLIP_API_KEY", "  ")
    settings = get_settings()
    assert settings.api_key is None  # blank is unset: SageMaker endpoints rely on IAM
    assert settings.body_timeout_s == 10 and settings.max_waiting_bodies == 512
    assert settings.max_waiting_body_bytes >= settings.max_body_bytes
    assert settings.max_request_pixels == 200_000_000  # 32 photos of 5 Mpx, the seed's size
    get_settings.cache_clear()
    monkeypatch.setenv("CLIP_API_KEY", " s3cret ")
    assert get_settings().api_key == "s3cret"
