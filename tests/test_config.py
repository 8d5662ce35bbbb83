"""Settings read from the environment, with the batching bound kept under the request timeout."""

from __future__ import annotations

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
    assert settings.fast_preprocessing is True and settings.runner_threads == 0
    assert settings.runner_workers == 1
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
        ("CLIP_RUNNER_WORKERS", "0", "must be >= 1"),
        ("CLIP_REQUEST_TIMEOUT_S", "-3", "must be >= 0.001"),
        ("CLIP_FETCH_TIMEOUT_S", "soon", "must be a number"),
        ("CLIP_MAX_LATENCY_MS", "50000", "below half of CLIP_REQUEST_TIMEOUT_S"),
        ("CLIP_FETCH_TIMEOUT_S", "90", "below CLIP_REQUEST_TIMEOUT_S"),
        ("CLIP_FETCH_CONNECT_TIMEOUT_S", "20", "must not exceed CLIP_FETCH_TIMEOUT_S"),
        ("CLIP_PREPROCESS", "quick", "must be one of fast, reference"),
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
