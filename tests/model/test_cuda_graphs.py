"""Image passes replayed per batch bucket (CLIP_CUDA_GRAPHS=on).

Recording a CUDA graph needs a GPU; everything around it (buckets, padding, splitting, copying
out under the lock) is the same code on CPU, where each bucket runs eagerly. These tests hold
that staging to the plain forward pass, in process and through a real `bentoml serve`.
"""

from __future__ import annotations

import base64
import copy
import re
import threading

import httpx
import numpy as np
import pytest
import torch

from clip_runner.model.cuda_graphs import ReplayedForward, batch_buckets, bucket_for
from clip_runner.model.encoding import ClipEncoder
from tests.helpers import (
    SEED_CLASSES,
    assert_same_answer,
    encode,
    photo_like,
)


def channel_means(pixels: torch.Tensor) -> torch.Tensor:
    """A stand-in forward pass whose rows each depend on their own image only."""
    return pixels.float().mean(dim=(2, 3))


def random_pixels(rows: int, seed: int, size: int = 8) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (rows, 3, size, size), dtype=torch.uint8, generator=generator)


def test_buckets_are_powers_of_two_up_to_the_largest_batch():
    assert batch_buckets(1) == (1,)
    assert batch_buckets(32) == (1, 2, 4, 8, 16, 32)
    assert batch_buckets(24) == (1, 2, 4, 8, 16, 24)
    assert [bucket_for(rows, batch_buckets(24)) for rows in (1, 3, 8, 9, 17, 24)] == [
        1,
        4,
        8,
        16,
        24,
        24,
    ]
    with pytest.raises(ValueError, match="largest bucket"):
        bucket_for(25, batch_buckets(24))
    with pytest.raises(ValueError, match="at least 1"):
        batch_buckets(0)


@pytest.mark.parametrize("rows", [1, 3, 4, 5, 8, 11, 16, 19])
def test_padded_and_split_replays_give_each_row_its_own_answer(rows):
    replayed = ReplayedForward(channel_means, (3, 8, 8), torch.device("cpu"), batch_buckets(8))
    assert replayed.recorded is False  # no GPU here: the same staging, run eagerly
    replayed(random_pixels(8, seed=99))  # leaves other images' rows in every buffer
    pixels = random_pixels(rows, seed=rows)
    np.testing.assert_array_equal(replayed(pixels), channel_means(pixels).numpy())


def test_an_answer_is_a_copy_that_later_replays_do_not_change():
    replayed = ReplayedForward(channel_means, (3, 8, 8), torch.device("cpu"), batch_buckets(4))
    first_pixels = random_pixels(2, seed=1)
    first = replayed(first_pixels)
    replayed(random_pixels(2, seed=2))
    np.testing.assert_array_equal(first, channel_means(first_pixels).numpy())


@pytest.fixture(scope="module")
def encoders(tiny_clip) -> tuple[ClipEncoder, ClipEncoder]:
    """The tiny model's encoder as served by default, and one replaying its image passes."""
    plain, replaying = (
        ClipEncoder(
            copy.deepcopy(tiny_clip.model), tiny_clip.processor, torch.device("cpu"), torch.float32
        )
        for _ in range(2)
    )
    replaying.replay_image_passes(max_batch=8)
    return plain, replaying


@pytest.mark.parametrize("rows", [1, 3, 8, 13])
def test_replayed_image_passes_equal_the_plain_ones(encoders, rows):
    plain, replaying = encoders
    pixels = random_pixels(rows, seed=rows, size=224)
    assert replaying.replayed is not None and replaying.replayed.buckets == (1, 2, 4, 8)
    ours = replaying.encode_pixels(pixels)
    assert ours.shape == (rows, 16) and ours.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(ours, axis=1), 1.0, atol=1e-6)
    np.testing.assert_allclose(ours, plain.encode_pixels(pixels), atol=1e-5)


def test_concurrent_callers_each_get_their_own_rows(encoders):
    """Two inference threads at once (CLIP_RUNNER_PASSES=2): the lock keeps one replay from
    overwriting the buffers another is reading."""
    plain, replaying = encoders
    batches = [random_pixels(3 + lane, seed=10 + lane, size=224) for lane in range(2)]
    expected = [plain.encode_pixels(pixels) for pixels in batches]
    answers: dict[int, list[np.ndarray]] = {0: [], 1: []}

    def lane(index: int) -> None:
        for _ in range(5):
            answers[index].append(replaying.encode_pixels(batches[index]))

    threads = [threading.Thread(target=lane, args=(index,)) for index in (0, 1)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for index in (0, 1):
        for answer in answers[index]:
            np.testing.assert_allclose(answer, expected[index], atol=1e-5)


def test_a_server_replaying_image_passes_answers_as_the_default_one(gpu_like, served):
    """Both of the runner's image paths go through the staged passes: JPEGs it decodes, and the
    pixels of the PNGs the API workers decode."""
    pictures = [photo_like(200 + 10 * i, 150, seed=60 + i) for i in range(11)]
    images = [
        base64.b64encode(encode(p, "PNG" if i % 3 == 0 else "JPEG", quality=90)).decode()
        for i, p in enumerate(pictures)
    ]
    body = {"images": images, "classes": SEED_CLASSES}
    replayed = httpx.post(f"{gpu_like.url}/invocations", json=body, timeout=60)
    default = httpx.post(f"{served.url}/invocations", json=body, timeout=60)
    assert replayed.status_code == default.status_code == 200
    assert_same_answer(replayed.json(), default.json(), tolerance=1e-6)
    log = gpu_like.log()
    assert "image passes per batch bucket [1, 2, 4, 8] from eager passes (no GPU)" in log
    # Recording them is a step of the runner's start of its own (startup_phases.py).
    assert re.search(r"runner start-up: .*, warm-up [\d.]+, CUDA graphs [\d.]+, garbage", log)
