"""Settings read from the environment, with the batching bound kept under the request timeout."""

from __future__ import annotations

import dataclasses
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from bentoml.exceptions import BentoMLConfigException

from clip_runner import config
from clip_runner.config import get_settings
from tests.helpers import REPO_ROOT


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
    assert settings.decode_jpegs_on == "auto" and settings.runner_jpeg_decoder == "pillow"
    assert settings.runner_workers == 1  # on CPU; API workers: test_workers_by_machine
    assert settings.runner_passes == 0 and settings.max_batch_size == 0  # 0: chosen per device
    assert settings.max_text_batch_size == 0  # 0: a multiple of the image batch
    assert settings.runner_calls == 0
    assert settings.torch_compile is False and settings.cuda_graphs is False  # on CPU
    assert settings.access_log is True  # on CPU
    assert settings.direct_runner_calls is True
    assert settings.switch_interval_ms == 5.0  # Python's own
    assert settings.cuda_wait == "block"  # a thread waiting for the GPU sleeps
    assert settings.stalled_pass_s == 0  # on CPU a large model's pass may be slow: no watch
    assert settings.dtype == "auto"  # the original's: float32 on CPU, float16 on a GPU
    assert settings.max_latency_ms < settings.request_timeout_s * 1000


def test_a_bentos_manifest_names_the_model_served_by_default(tmp_path, monkeypatch):
    """Run from a bento (its manifest beside src/), CLIP_MODEL_TAG defaults to the model it was
    built with: a local bento had served the store's newest model instead."""
    manifest = tmp_path / "bento.yaml"
    built = {
        "service": "service:ClipService",
        "services": [
            {"name": "clip_service", "models": []},
            {"name": "clip_runner", "models": [{"tag": "clip:built0000000001"}]},
        ],
    }
    manifest.write_text(yaml.safe_dump(built))
    assert config.built_model_tag(manifest) == "clip:built0000000001"
    assert config.built_model_tag(tmp_path / "none.yaml") is None  # a checkout
    for other in ({**built, "service": "other:Service"}, {"service": "service:ClipService"}):
        manifest.write_text(yaml.safe_dump(other))
        assert config.built_model_tag(manifest) is None
    manifest.write_text("services: [unclosed")
    assert config.built_model_tag(manifest) is None
    assert config.BENTO_MANIFEST == REPO_ROOT.parent / "bento.yaml"  # not in a checkout
    monkeypatch.setattr(config, "built_model_tag", lambda: "clip:built0000000001")
    monkeypatch.delenv("CLIP_MODEL_TAG", raising=False)
    assert get_settings().model_tag == "clip:built0000000001"
    monkeypatch.setenv("CLIP_MODEL_TAG", "clip:chosen")  # the variable still wins
    get_settings.cache_clear()
    assert get_settings().model_tag == "clip:chosen"


def test_environment_overrides(monkeypatch):
    monkeypatch.setenv("CLIP_MAX_BATCH_SIZE", "8")
    monkeypatch.setenv("CLIP_MAX_TEXT_BATCH_SIZE", "40")
    monkeypatch.setenv("CLIP_MODEL_TAG", "clip:abc")
    monkeypatch.setenv("CLIP_FETCH_ALLOW", " 10.0.0.0/8, images.lan ,")
    monkeypatch.setenv("CLIP_TORCH_COMPILE", "ON")
    monkeypatch.setenv("CLIP_RUNNER_WORKERS", "3")
    monkeypatch.setenv("CLIP_RUNNER_PASSES", "4")
    monkeypatch.setenv("CLIP_RUNNER_CALLS", "5")
    monkeypatch.setenv("CLIP_RUNNER_JPEG_DECODER", "NVJPEG")
    monkeypatch.setenv("CLIP_ACCESS_LOG", "off")
    monkeypatch.setenv("CLIP_DIRECT_RUNNER_CALLS", "off")
    monkeypatch.setenv("CLIP_SWITCH_INTERVAL_MS", "0.2")
    monkeypatch.setenv("CLIP_CUDA_WAIT", "Spin")
    monkeypatch.setenv("CLIP_DTYPE", "BFloat16")
    monkeypatch.setenv("CLIP_STALLED_PASS_S", "600")
    settings = get_settings()
    assert settings.stalled_pass_s == 600
    assert settings.cuda_wait == "spin"
    assert settings.dtype == "bfloat16"
    assert settings.switch_interval_ms == 0.2
    assert settings.access_log is False
    assert settings.direct_runner_calls is False
    assert settings.runner_workers == 3 and settings.runner_passes == 4
    assert settings.runner_jpeg_decoder == "nvjpeg"
    assert settings.runner_calls == 5
    assert settings.torch_compile is True
    assert settings.max_batch_size == 8 and settings.model_tag == "clip:abc"
    assert settings.max_text_batch_size == 40
    assert settings.fetch_allow == ("10.0.0.0/8", "images.lan")


def test_cuda_graphs_can_be_asked_for_on_cpu_but_not_with_torch_compile(monkeypatch):
    monkeypatch.setenv("CLIP_CUDA_GRAPHS", "on")
    assert get_settings().cuda_graphs is True
    get_settings.cache_clear()
    monkeypatch.setenv("CLIP_TORCH_COMPILE", "on")
    with pytest.raises(ValueError, match="CLIP_TORCH_COMPILE and CLIP_CUDA_GRAPHS"):
        get_settings()


def test_nvjpeg_is_refused_where_the_api_workers_decode_every_jpeg(monkeypatch):
    monkeypatch.setenv("CLIP_RUNNER_JPEG_DECODER", "nvjpeg")
    for decode in ("auto", "runner"):  # auto: nvJPEG where the runner has a GPU
        monkeypatch.setenv("CLIP_DECODE", decode)
        get_settings.cache_clear()
        assert get_settings().runner_jpeg_decoder == "nvjpeg"
    monkeypatch.setenv("CLIP_DECODE", "api")
    get_settings.cache_clear()
    with pytest.raises(config.SettingError, match="CLIP_DECODE=api forwards none"):
        get_settings()


def test_on_a_gpu_graphs_replay_and_the_access_log_is_off_unless_asked_otherwise(monkeypatch):
    monkeypatch.setattr(config, "usable_gpus", lambda: 1)
    settings = get_settings()
    assert settings.cuda_graphs is True and settings.access_log is False
    assert settings.runner_jpeg_decoder == "pillow"  # exact on a GPU too; nvJPEG is an opt-in
    assert settings.stalled_pass_s == 60  # a GPU pass takes milliseconds
    get_settings.cache_clear()
    monkeypatch.setenv("CLIP_STALLED_PASS_S", "0")
    assert get_settings().stalled_pass_s == 0  # turned off
    get_settings.cache_clear()
    monkeypatch.delenv("CLIP_STALLED_PASS_S")
    monkeypatch.setenv("CLIP_TORCH_COMPILE", "on")  # replaces the same forward pass: no graphs
    monkeypatch.setenv("CLIP_ACCESS_LOG", "on")
    settings = get_settings()
    assert settings.cuda_graphs is False and settings.access_log is True
    assert settings.stalled_pass_s == 0  # torch.compile may compile anew mid-serving
    get_settings.cache_clear()
    monkeypatch.delenv("CLIP_TORCH_COMPILE")
    monkeypatch.setenv("CLIP_CUDA_GRAPHS", "off")
    assert get_settings().cuda_graphs is False


@pytest.mark.parametrize(
    ("name", "value", "message"),
    [
        ("CLIP_MAX_BATCH_SIZE", "many", "must be an integer"),
        ("CLIP_PORT", "70000", "must be <= 65535"),
        ("CLIP_PORT", "0", "must be >= 1"),
        ("CLIP_MAX_BATCH_SIZE", "-1", "must be >= 0"),
        ("CLIP_MAX_TEXT_BATCH_SIZE", "-1", "must be >= 0"),
        ("CLIP_RUNNER_PASSES", "two", "must be an integer"),
        ("CLIP_RUNNER_WORKERS", "-1", "must be >= 0"),
        ("CLIP_RUNNER_CALLS", "-1", "must be >= 0"),
        ("CLIP_API_WORKERS", "-2", "must be >= 0"),
        ("CLIP_KEEPALIVE_REQUESTS", "-1", "must be >= 0"),
        ("CLIP_DECODE", "gpu", "must be one of auto, api, runner"),
        ("CLIP_RUNNER_JPEG_DECODER", "auto", "must be one of pillow, nvjpeg"),  # the old default
        ("CLIP_REQUEST_TIMEOUT_S", "-3", "must be >= 2.0"),
        # Its runner calls get half of it less a second: at 1 s the server never became ready.
        ("CLIP_REQUEST_TIMEOUT_S", "1", "must be >= 2.0"),
        # Past a float's range (an OverflowError that named no variable), and cut short.
        (
            "CLIP_REQUEST_TIMEOUT_S",
            "1" + "0" * 400,
            r"must be a finite number, got '1000.*\.\.\. \(401 characters\)'$",
        ),
        (
            "CLIP_MODEL_TAG",
            "clip:two words",
            "CLIP_MODEL_TAG 'clip:two words' is not a BentoML tag",
        ),
        ("CLIP_FETCH_ALLOW", "images.lan, 10.0.0.0/33", "entry '10.0.0.0/33' is neither a CIDR"),
        ("CLIP_FETCH_ALLOW", "*.internal", "entry '\\*.internal' is neither"),
        ("CLIP_FETCH_ALLOW", "http://images.lan", "entry 'http://images.lan' is neither"),
        ("CLIP_FETCH_TIMEOUT_S", "soon", "must be a number"),
        ("CLIP_MAX_LATENCY_MS", "50000", "below half of CLIP_REQUEST_TIMEOUT_S"),
        ("CLIP_FETCH_TIMEOUT_S", "90", "below CLIP_REQUEST_TIMEOUT_S"),
        (
            "CLIP_FETCH_CONNECT_TIMEOUT_S",
            "20",
            r"must not exceed CLIP_FETCH_TIMEOUT_S \(20 s vs 10 s",
        ),
        ("CLIP_PREPROCESS", "quick", "must be one of reference, fast"),
        ("CLIP_TORCH_COMPILE", "yes", "must be one of off, on"),
        ("CLIP_CUDA_GRAPHS", "yes", "must be one of auto, on, off"),
        ("CLIP_ACCESS_LOG", "false", "must be one of auto, on, off"),
        ("CLIP_DIRECT_RUNNER_CALLS", "bentoml", "must be one of on, off"),
        ("CLIP_BODY_TIMEOUT_S", "0", "must be >= 0.001"),
        ("CLIP_SEND_TIMEOUT_S", "0", "must be >= 0.001"),
        ("CLIP_SWITCH_INTERVAL_MS", "0", "must be >= 0.01"),
        ("CLIP_SWITCH_INTERVAL_MS", "fast", "must be a number"),
        ("CLIP_CUDA_WAIT", "sleep", "must be one of block, spin"),
        ("CLIP_STALLED_PASS_S", "-1", "must be >= 0"),
        ("CLIP_STALLED_PASS_S", "0.01", r"must be 0 \(off\) or at least 1 s, got 0.01"),
        ("CLIP_STALLED_PASS_S", "nan", "must be a finite number"),
        ("CLIP_REQUEST_TIMEOUT_S", "inf", "must be a finite number"),
        ("CLIP_DTYPE", "fp16", "must be one of auto, float32, bfloat16, float16"),
        ("CLIP_MAX_WAITING_BODIES", "0", "must be >= 1"),
        ("CLIP_MAX_WAITING_BODY_BYTES", "1000", r"at least CLIP_MAX_BODY_BYTES \(1000 vs 6291456"),
        ("CLIP_MAX_REQUEST_PIXELS", "lots", "must be an integer"),
        # Python's int() and float() read these as 10, 1 and 10.5.
        ("CLIP_MAX_BATCH_SIZE", "1_0", "must be an integer in ASCII digits, got '1_0'"),
        ("CLIP_RUNNER_PASSES", "\u0661", "must be an integer in ASCII digits"),
        ("CLIP_FETCH_TIMEOUT_S", "1_0.5", "must be a number in ASCII digits"),
        ("CLIP_MAX_LINES", "0", "must be >= 1"),
        ("CLIP_API_KEY", "s3cret-clé", "must be printable ASCII without spaces"),
        ("CLIP_API_KEY", "two words", "must be printable ASCII without spaces"),
        # Counts past any machine's use: torch overflowed on 10**23 threads and BentoML
        # restarted the runner for ever; 10**23 API workers grew the supervisor by 4 GB.
        ("CLIP_RUNNER_THREADS", "1" + "0" * 23, "CLIP_RUNNER_THREADS must be <= 1024"),
        ("CLIP_RUNNER_THREADS", "100000", "must be <= 1024"),
        ("CLIP_API_WORKERS", "1" + "0" * 23, "CLIP_API_WORKERS must be <= 256"),
        ("CLIP_RUNNER_WORKERS", "1000", "CLIP_RUNNER_WORKERS must be <= 64"),
        ("CLIP_RUNNER_PASSES", "1" + "0" * 23, "CLIP_RUNNER_PASSES must be <= 16"),
        ("CLIP_RUNNER_CALLS", "100000", "CLIP_RUNNER_CALLS must be <= 256"),
        ("CLIP_MAX_BATCH_SIZE", "100000", "CLIP_MAX_BATCH_SIZE must be <= 4096"),
        ("CLIP_MAX_TEXT_BATCH_SIZE", "100000", "CLIP_MAX_TEXT_BATCH_SIZE must be <= 16384"),
        ("CLIP_SWITCH_INTERVAL_MS", "1e20", "CLIP_SWITCH_INTERVAL_MS must be <= 1000"),
    ],
)
def test_bad_values_are_refused_with_the_variable_name(monkeypatch, name, value, message):
    monkeypatch.setenv(name, value)
    # A BentoML configuration error: `bentoml serve` stops with its one line, no traceback.
    with pytest.raises(config.SettingError, match=message) as refused:
        get_settings()
    assert isinstance(refused.value, BentoMLConfigException)


@pytest.mark.parametrize(
    ("timeout_s", "queue_ms", "fetch_s", "connect_s"),
    [
        (55, 20_000, 10, 3),
        (41, 20_000, 10, 3),
        (40, 10_000, 10, 3),
        (30, 7_500, 10, 3),
        (10, 2_500, 5, 3),
        (2, 500, 1, 1),
    ],
)
def test_a_request_timeout_alone_brings_the_defaults_it_bounds_under_it(
    monkeypatch, timeout_s, queue_ms, fetch_s, connect_s
):
    """The queue bound (below half the deadline), the image fetch's (below it) and its
    connection's follow a shorter deadline: CLIP_REQUEST_TIMEOUT_S=30 alone had been refused,
    naming CLIP_MAX_LATENCY_MS, which the operator never set."""
    monkeypatch.setenv("CLIP_REQUEST_TIMEOUT_S", str(timeout_s))
    settings = get_settings()
    assert settings.max_latency_ms == queue_ms
    assert (settings.fetch_timeout_s, settings.fetch_connect_timeout_s) == (fetch_s, connect_s)


@pytest.mark.parametrize(
    ("clip_port", "bentoml_port", "port"),
    [(None, None, 8080), ("9000", None, 9000), (None, "9001", 9001), ("9002", "9002", 9002)],
)
def test_the_port_is_bentomls_where_it_sets_one(monkeypatch, clip_port, bentoml_port, port):
    for name, value in (("CLIP_PORT", clip_port), ("BENTOML_PORT", bentoml_port)):
        if value is None:
            monkeypatch.delenv(name, raising=False)
        else:
            monkeypatch.setenv(name, value)
    assert get_settings().port == port


def test_a_clip_port_beside_another_bentoml_port_is_refused(monkeypatch):
    """BentoML listens on BENTOML_PORT (the image sets it; `PORT` overrides it there): a
    CLIP_PORT beside it had no effect."""
    monkeypatch.setenv("CLIP_PORT", "9000")
    monkeypatch.setenv("BENTOML_PORT", "8080")
    with pytest.raises(config.SettingError, match=r"CLIP_PORT \(9000\) and BENTOML_PORT \(8080\)"):
        get_settings()


@pytest.mark.parametrize("tag", ["", "  ", " clip:latest "])
def test_a_blank_or_padded_model_tag_is_the_default(monkeypatch, tag):
    monkeypatch.setenv("CLIP_MODEL_TAG", tag)
    assert get_settings().model_tag == "clip:latest"


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("BENTOML_CONFIG_OPTIONS", "services.clip_service.workers=1"),
        ("BENTOML_CONFIG_OVERRIDES", '{"services": {"clip_runner": {"workers": 3}}}'),
        ("BENTOML_CONFIG", "services:\n  clip_service:\n    workers: cpu_count\n"),
    ],
)
def test_a_bentoml_configuration_that_sets_worker_counts_is_refused(
    monkeypatch, tmp_path, variable, value
):
    """BentoML's configuration wins over the service's worker count, but what is sized by that
    count (runner calls in flight, keep-alive recycling, MaxConcurrentTransforms) kept the
    settings': one API worker forced so ran one runner call at a time. Read by BentoML's own
    configuration code from each of its three sources."""
    if variable == "BENTOML_CONFIG":
        (tmp_path / "bentoml.yaml").write_text(value)
        value = str(tmp_path / "bentoml.yaml")
    workers = {"clip_service": ("CLIP_API_WORKERS", 2), "clip_runner": ("CLIP_RUNNER_WORKERS", 1)}
    config.refuse_bentoml_worker_counts(workers)  # nothing set: nothing to refuse
    monkeypatch.setenv(variable, value)
    with pytest.raises(
        config.SettingError, match=r"sets services\.clip_\w+\.workers to .*; set CLIP_"
    ):
        config.refuse_bentoml_worker_counts(workers)
    # The same counts as the settings', or other keys, are no conflict.
    monkeypatch.setenv("BENTOML_CONFIG_OPTIONS", "services.clip_service.workers=2")
    monkeypatch.delenv("BENTOML_CONFIG_OVERRIDES", raising=False)
    monkeypatch.delenv("BENTOML_CONFIG", raising=False)
    config.refuse_bentoml_worker_counts(workers)


@pytest.mark.parametrize(
    ("kind", "timeout_s", "body_mib", "queue_ms", "queue_ms_at_120_s"),
    [
        ("realtime", 55, 6, 20_000, 20_000),
        ("async", 895, 1024, 20_000, 20_000),
        ("batch", 3595, 6, 600_000, 30_000),
    ],
)
def test_request_timeout_body_limit_and_queue_bound_follow_the_endpoint_kind(
    monkeypatch, kind, timeout_s, body_mib, queue_ms, queue_ms_at_120_s
):
    """SageMaker waits 60 s on a real-time call, 15 min on an async one and up to an hour on a
    Batch Transform mini-batch; async payloads come from S3 and may reach 1 GB. A mini-batch's
    lines queue behind each other, and a line shed fails the whole mini-batch: 10 minutes of
    queue (a quarter of a shorter deadline) there."""
    for name in ("CLIP_REQUEST_TIMEOUT_S", "CLIP_MAX_BODY_BYTES", "CLIP_MAX_LATENCY_MS"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("CLIP_ENDPOINT_KIND", kind.upper())
    settings = get_settings()
    assert settings.endpoint_kind == kind
    assert settings.request_timeout_s == timeout_s
    assert settings.max_body_bytes == body_mib * 1024 * 1024
    assert settings.max_latency_ms == queue_ms
    get_settings.cache_clear()
    monkeypatch.setenv("CLIP_REQUEST_TIMEOUT_S", "120")  # an explicit value still wins
    assert get_settings().request_timeout_s == 120
    assert get_settings().max_latency_ms == queue_ms_at_120_s
    get_settings.cache_clear()
    monkeypatch.setenv("CLIP_MAX_LATENCY_MS", "5000")
    assert get_settings().max_latency_ms == 5000


def test_the_send_deadline_follows_the_body_deadline_unless_set(monkeypatch):
    """An answer may wait for its reader as long as a body may take to arrive: 10 s, and two
    minutes on an async endpoint, whose answers are as large as its payloads."""
    for name in ("CLIP_BODY_TIMEOUT_S", "CLIP_SEND_TIMEOUT_S"):
        monkeypatch.delenv(name, raising=False)
    assert get_settings().send_timeout_s == 10
    get_settings.cache_clear()
    monkeypatch.setenv("CLIP_ENDPOINT_KIND", "async")
    assert get_settings().send_timeout_s == get_settings().body_timeout_s == 120
    get_settings.cache_clear()
    monkeypatch.setenv("CLIP_BODY_TIMEOUT_S", "30")
    assert get_settings().send_timeout_s == 30
    get_settings.cache_clear()
    monkeypatch.setenv("CLIP_SEND_TIMEOUT_S", "45")
    assert (get_settings().send_timeout_s, get_settings().body_timeout_s) == (45, 30)


def test_unknown_endpoint_kind_is_refused(monkeypatch):
    monkeypatch.setenv("CLIP_ENDPOINT_KIND", "serverless")
    with pytest.raises(
        ValueError, match="CLIP_ENDPOINT_KIND must be one of realtime, async, batch"
    ):
        get_settings()


def test_workers_by_machine(monkeypatch, tiny_stored_model):
    """On CPU one runner worker and API workers by the model's cost: every core for the tiny
    model (the image work is its limit), one for ViT-B/32 or an unknown model. Where torch sees
    a GPU, half the usable cores (at least two) of API workers and two runner workers per GPU
    (the GPUs and the usable cores, affinity and quota, are what is stubbed here)."""
    from clip_runner.config import default_api_workers, default_runner_workers

    def use_cores(cores: int) -> None:
        monkeypatch.setattr(config, "usable_cores", lambda: cores)

    tag = str(tiny_stored_model.tag)
    assert default_runner_workers() == 1
    for cores in (1, 2, 4):
        use_cores(cores)
        assert default_api_workers(tag, "") == cores
    assert default_api_workers("clip:not-in-the-store", "") == 1
    unset = dataclasses.replace(get_settings(), api_workers=0, model_tag=tag, model_dir="")
    assert unset.api_worker_count == 4  # the cores above
    assert dataclasses.replace(unset, api_workers=3).api_worker_count == 3  # CLIP_API_WORKERS
    monkeypatch.setattr(config, "usable_gpus", lambda: 1)
    for cores, api_workers in ((16, 8), (12, 6), (4, 2), (2, 2)):
        use_cores(cores)
        assert default_api_workers(tag, "") == api_workers
    for gpus in (1, 4):
        monkeypatch.setattr(config, "usable_gpus", lambda gpus=gpus: gpus)
        assert default_runner_workers() == 2 * gpus


def test_connections_are_recycled_only_where_several_api_workers_share_the_port(monkeypatch):
    from clip_runner.config import KEEPALIVE_REQUESTS_WITH_SEVERAL_WORKERS

    monkeypatch.delenv("CLIP_KEEPALIVE_REQUESTS", raising=False)
    settings = get_settings()
    assert settings.keepalive_requests == -1  # unset: by API workers
    one, two = (dataclasses.replace(settings, api_workers=n) for n in (1, 2))
    assert one.answers_per_connection == 0
    assert two.answers_per_connection == KEEPALIVE_REQUESTS_WITH_SEVERAL_WORKERS
    assert dataclasses.replace(two, keepalive_requests=0).answers_per_connection == 0
    assert dataclasses.replace(one, keepalive_requests=50).answers_per_connection == 50
    get_settings.cache_clear()
    monkeypatch.setenv("CLIP_KEEPALIVE_REQUESTS", "7")
    assert get_settings().answers_per_connection == 7


@pytest.mark.parametrize("cores", [1, 2, 8, 16, 64])
def test_api_workers_on_cpu_follow_the_models_rate(cores):
    """ViT-B/32 (4.4 GMAC an image) runs slower than one API worker's image work on up to 16
    cores (about 35 GMAC/s a core); on 64 its rate needs more. A free model would want a worker
    per core, never more; a cheaper model never gets fewer."""
    from clip_runner.config import cpu_api_workers

    assert (cpu_api_workers(cores, 4.4) == 1) == (cores <= 16)
    assert cpu_api_workers(cores, 1e-6) == cores
    assert cpu_api_workers(cores, None) == 1
    by_cost = [cpu_api_workers(cores, gmacs) for gmacs in (1e-3, 1e-2, 0.1, 1.0, 10.0)]
    assert by_cost == sorted(by_cost, reverse=True)
    assert all(1 <= workers <= cores for workers in by_cost)


@pytest.mark.parametrize(
    ("cores", "runner_workers", "threads"),
    [(1, 1, 1), (2, 1, 2), (4, 2, 2), (12, 2, 6), (16, 1, 8), (64, 2, 8), (3, 4, 1)],
)
def test_each_runner_decodes_with_its_share_of_the_cores(cores, runner_workers, threads):
    from clip_runner.config import runner_decode_threads

    assert runner_decode_threads(cores, runner_workers) == threads


def test_abuse_bounds_default_and_the_api_key_is_off_unless_set(monkeypatch):
    for name in (
        "CLIP_BODY_TIMEOUT_S",
        "CLIP_MAX_WAITING_BODIES",
        "CLIP_MAX_REQUEST_PIXELS",
        "CLIP_MAX_LINES",
    ):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("CLIP_API_KEY", "  ")
    settings = get_settings()
    assert settings.api_key is None  # blank is unset: SageMaker endpoints rely on IAM
    assert settings.body_timeout_s == 10 and settings.max_waiting_bodies == 512
    assert settings.max_waiting_body_bytes >= settings.max_body_bytes
    assert settings.max_request_pixels == 200_000_000  # 32 photos of 5 Mpx, the seed's size
    assert settings.max_lines == 200_000  # every 6 MB mini-batch of lines naming an image
    get_settings.cache_clear()
    monkeypatch.setenv("CLIP_MAX_BODY_BYTES", str(100 * 2**20))  # MaxPayloadInMB 100
    assert get_settings().max_lines == 100 * 2**20 // 32
    get_settings.cache_clear()
    monkeypatch.setenv("CLIP_MAX_BODY_BYTES", str(2**30))  # an async endpoint's: no more lines
    assert get_settings().max_lines == 100 * 2**20 // 32
    monkeypatch.delenv("CLIP_MAX_BODY_BYTES")
    get_settings.cache_clear()
    monkeypatch.setenv("CLIP_API_KEY", " s3cret ")
    assert get_settings().api_key == "s3cret"
    get_settings.cache_clear()
    every_printable = "".join(chr(code) for code in range(0x21, 0x7F))
    monkeypatch.setenv("CLIP_API_KEY", every_printable)
    assert get_settings().api_key == every_printable


def test_every_setting_has_its_row_in_the_readmes_configuration_table():
    """The README names every setting (the house rule): each CLIP_ variable config.py reads has
    a row of its own in the table, and the table names none it does not read."""
    read = set(
        re.findall(r'"(CLIP_[A-Z0-9_]+)"', (REPO_ROOT / "clip_runner/config.py").read_text())
    )
    documented = re.findall(
        r"^\| `(CLIP_[A-Z0-9_]+)` \|", (REPO_ROOT / "README.md").read_text(), re.M
    )
    assert "CLIP_DTYPE" in read and len(read) > 30
    assert sorted(documented) == sorted(read)


def bentoml_serve_output(**env: str) -> tuple[int, str]:
    """`bentoml serve` of the service with these variables, to its end: (status, what it said)."""
    bentoml_cli = Path(sys.executable).with_name("bentoml")
    result = subprocess.run(
        [str(bentoml_cli), "serve", "service:ClipService", "--host", "127.0.0.1"],
        cwd=REPO_ROOT,
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=120,
    )
    return result.returncode, result.stdout + result.stderr


def test_bentoml_serve_stops_on_a_bad_setting_with_one_line_naming_it(tmp_path):
    """It had been a 70-line traceback, the one line saying what was wrong at its end."""
    status, said = bentoml_serve_output(BENTOML_HOME=str(tmp_path), CLIP_MAX_CONCURRENCY="abc")
    assert status == 1
    assert said.strip().splitlines() == [
        "Error: [serve] `serve` failed: CLIP_MAX_CONCURRENCY must be an integer, got 'abc'"
    ]


def test_bentoml_serve_stops_in_one_line_where_its_port_is_taken(tiny_stored_model, bentoml_home):
    """A second `make serve`, or the first one still running: circus's OSError had ended the
    start in a 58-line traceback."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        status, said = bentoml_serve_output(
            BENTOML_HOME=str(bentoml_home),
            CLIP_MODEL_TAG=str(tiny_stored_model.tag),
            CLIP_PORT=str(port),
        )
    assert status == 1, said
    assert "Traceback" not in said, said
    assert (
        f"Error: [serve] `serve` failed: cannot listen on 127.0.0.1:{port}: another process "
        "has the port"
    ) in said
