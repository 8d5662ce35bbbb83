"""The runner's model, loaded as its worker loads it: facts, tokenizer and the three batch
encoders, against the encoder underneath."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from tokenizers import Tokenizer

from clip_runner.model.engine import ServedModel
from tests.helpers import photo_like


@pytest.fixture(scope="module")
def served_model(tiny_stored_model) -> ServedModel:
    return ServedModel(tiny_stored_model)


def test_the_facts_name_the_model_and_how_it_is_served(served_model, tiny_stored_model):
    facts = served_model.facts
    assert facts.tag == str(tiny_stored_model.tag) and facts.random_weights
    assert facts.device == "cpu" and facts.jpeg_decoder == "pillow"
    assert (facts.passes, facts.max_batch) == (
        served_model.layout.passes,
        served_model.layout.max_batch,
    )


def test_a_full_text_pass_is_timed_on_one_pass_threads_and_the_threads_are_given_back(
    served_model,
):
    """The API workers size their text calls by `text_pass_s`; timing it sets the torch
    threads of one pass, and the runner's own count must be back afterwards."""
    assert served_model.facts.text_pass_s > 0
    assert served_model.facts.max_text_batch == served_model.layout.max_text_batch
    assert torch.get_num_threads() == served_model.torch_threads


def test_the_three_encoders_agree_with_the_encoder_underneath(served_model):
    image = photo_like(224, 224, seed=3)
    pixels = np.array(image)[None]
    jpeg = io.BytesIO()
    image.save(jpeg, "JPEG", quality=95)
    expected = served_model.encoder.encode_images(pixels)
    np.testing.assert_allclose(served_model.encode_images(pixels, 1), expected, atol=1e-6)
    decoded = served_model.encode_jpegs([jpeg.getvalue(), b"not a jpeg"], 1)
    assert np.isnan(decoded[1]).all()  # a JPEG that does not decode: a row of NaN, no error
    assert float(decoded[0] @ expected[0]) > 0.99  # the same photo, through JPEG
    tokens = Tokenizer.from_str(served_model.tokenizer_json).encode("a photo of a cat").ids
    np.testing.assert_allclose(
        served_model.encode_tokens([tokens], 1),
        served_model.encoder.encode_texts(["a photo of a cat"]),
        atol=1e-6,
    )


def test_how_the_gpu_is_waited_for_reaches_every_waiting_part(tiny_stored_model, monkeypatch):
    """CLIP_CUDA_WAIT (device_wait.py): the encoder's answers, the CUDA graphs' copies and the
    nvJPEG drain all wait the same way; asleep unless told to spin."""
    from clip_runner.config import get_settings

    assert served_model_waits(tiny_stored_model) == {False}
    monkeypatch.setenv("CLIP_CUDA_WAIT", "spin")
    monkeypatch.setenv("CLIP_CUDA_GRAPHS", "on")  # on CPU: the same staging, run eagerly
    get_settings.cache_clear()
    try:
        assert served_model_waits(tiny_stored_model) == {True}
    finally:
        get_settings.cache_clear()


def served_with(stored, monkeypatch, **env: str) -> ServedModel:
    """The runner's model loaded under these settings (then read again by the next test), with
    torch's thread count put back as it was."""
    from clip_runner.config import get_settings

    threads = torch.get_num_threads()
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    get_settings.cache_clear()
    try:
        return ServedModel(stored)
    finally:
        get_settings.cache_clear()
        torch.set_num_threads(threads)


def served_model_waits(stored) -> set[bool]:
    """How each part that waits for the device was told to wait."""
    model = ServedModel(stored)
    parts = [model.encoder, model.jpeg_decoder]
    if model.encoder.replayed is not None:
        parts.append(model.encoder.replayed)
    return {part.spin_waits for part in parts}


def test_a_cpu_quota_below_the_cores_caps_the_runners_threads(tiny_stored_model, monkeypatch):
    """torch counts the cores it may run on, not a container's CPU quota (`docker --cpus 1`):
    the runner then runs as many threads as the quota allows (cpu_quota.py)."""
    from clip_runner.model import engine

    threads = torch.get_num_threads()
    monkeypatch.setattr(engine, "usable_cores", lambda: 1)
    try:
        torch.set_num_threads(2)  # as torch starts on 2 cores (earlier tests may have set 1)
        model = ServedModel(tiny_stored_model)
        assert torch.get_num_threads() == model.torch_threads == 1
        assert model.layout.passes == 1 and model.jpeg_decoder.threads == 1
    finally:
        torch.set_num_threads(threads)


def test_passes_past_the_runners_threads_are_cut_to_them_with_a_warning(
    tiny_stored_model, monkeypatch, caplog
):
    model = served_with(
        tiny_stored_model, monkeypatch, CLIP_RUNNER_THREADS="1", CLIP_RUNNER_PASSES="4"
    )
    assert (model.torch_threads, model.layout.passes) == (1, 1)
    assert "CLIP_RUNNER_PASSES=4, but on CPU each pass needs a torch thread" in caplog.text


def test_clip_dtype_bfloat16_runs_every_encoder_in_it_and_answers_float32(
    tiny_stored_model, served_model, monkeypatch
):
    """CLIP_DTYPE=bfloat16 on CPU (an opt-in: its numbers move, BENCHMARKS.md): the facts say
    so, the model's weights are bfloat16, and all three encoders answer float32 unit rows near
    the float32 model's."""
    half = served_with(tiny_stored_model, monkeypatch, CLIP_DTYPE="bfloat16")
    assert half.facts.dtype == "bfloat16" and served_model.facts.dtype == "float32"
    assert {p.dtype for p in half.encoder.model.parameters()} == {torch.bfloat16}
    image = photo_like(224, 224, seed=5)
    pixels = np.array(image)[None]
    jpeg = io.BytesIO()
    image.save(jpeg, "JPEG", quality=95)
    tokens = Tokenizer.from_str(half.tokenizer_json).encode("a photo of a dog").ids
    for encode, rows in (
        ("encode_images", pixels),
        ("encode_jpegs", [jpeg.getvalue()]),
        ("encode_tokens", [tokens]),
    ):
        ours, theirs = getattr(half, encode)(rows, 1), getattr(served_model, encode)(rows, 1)
        assert ours.dtype == np.float32
        np.testing.assert_allclose(np.linalg.norm(ours, axis=1), 1.0, atol=1e-5)
        assert 0.99 < float(ours[0] @ theirs[0]) < 1.0  # near, and not the float32 numbers


def test_clip_stalled_pass_s_watches_every_encoder_and_is_named_at_start(
    tiny_stored_model, monkeypatch, caplog
):
    """With the watch on (by default on a GPU; here set, with a limit no pass reaches), each of
    the three encoders' batches is a pass in progress while it runs, and the ready line says
    what a stall does; by default on CPU there is no watch."""
    import logging

    from clip_runner.config import get_settings

    assert ServedModel(tiny_stored_model).stalled_pass_watch is None
    monkeypatch.setenv("CLIP_STALLED_PASS_S", "3600")
    get_settings.cache_clear()
    try:
        with caplog.at_level(logging.INFO, logger="clip_runner"):
            model = ServedModel(tiny_stored_model)
    finally:
        get_settings.cache_clear()
    watch = model.stalled_pass_watch
    assert watch is not None and watch.limit_s == 3600
    assert "a pass in progress over 3600 s ends this process" in caplog.text
    in_progress: list[bool] = []
    encode_pixels, encode_token_ids = model.encoder.encode_pixels, model.encoder.encode_token_ids

    def pixels_seen(crops):
        in_progress.append(watch.longest_s() > 0)
        return encode_pixels(crops)

    def tokens_seen(token_ids):
        in_progress.append(watch.longest_s() > 0)
        return encode_token_ids(token_ids)

    monkeypatch.setattr(model.encoder, "encode_pixels", pixels_seen)
    monkeypatch.setattr(model.encoder, "encode_token_ids", tokens_seen)
    jpeg = io.BytesIO()
    photo_like(64, 48, seed=3).save(jpeg, "JPEG")
    model.encode_images(np.zeros((1, 224, 224, 3), dtype=np.uint8), 1)
    model.encode_jpegs([jpeg.getvalue()], 1)
    model.encode_tokens(model.encoder.tokenizer(["a photo of a cat"])["input_ids"], 1)
    assert len(in_progress) == 3 and all(in_progress)
    assert watch.longest_s() == 0
