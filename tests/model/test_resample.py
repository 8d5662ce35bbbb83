"""The shared fixed-point arithmetic, and the runner's torch resize against Pillow itself: every
pixel equal, on the hardest inputs, at every pass order, direction and aspect ratio (the API
workers' compiled resize: tests/images/test_compiled_resample.py)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from clip_runner.model import device_resample
from clip_runner.model.device_resample import resize_and_crop
from clip_runner.model.resample import (
    BYTE_SHIFTS,
    DEVICE_MAX_DOWNSCALE,
    byte_planes,
    fixed_point_weights,
)
from tests.hard_images import PASS_ORDER_SIZES, hard_images, noise, stripes
from tests.helpers import pillow_resize_and_crop


def torch_resize_and_crop(image: Image.Image, edge: int, crop_h: int, crop_w: int) -> np.ndarray:
    pixels = torch.from_numpy(np.array(image)).permute(2, 0, 1).contiguous()
    return resize_and_crop(pixels, edge, crop_h, crop_w).permute(1, 2, 0).numpy()


@pytest.mark.parametrize(
    "image", [image for _, image in hard_images(scale=0.25)], ids=[n for n, _ in hard_images(0.25)]
)
def test_equals_pillow_on_the_hard_set(image: Image.Image):
    np.testing.assert_array_equal(
        torch_resize_and_crop(image, 224, 224, 224), pillow_resize_and_crop(image, 224, 224, 224)
    )


@pytest.mark.parametrize("size", PASS_ORDER_SIZES)
def test_equals_pillow_at_every_pass_order_and_direction(size: tuple[int, int]):
    image = noise(*size, seed=size[0] * 7 + size[1])
    np.testing.assert_array_equal(
        torch_resize_and_crop(image, 224, 224, 224), pillow_resize_and_crop(image, 224, 224, 224)
    )


@pytest.mark.parametrize("geometry", [(100, 120, 160), (64, 64, 96), (64, 67, 97)])
def test_crop_larger_than_the_resized_image_is_zero_padded_like_the_cpu_path(geometry):
    image = stripes(1043, 699, period=3)  # resized to 149x100 or 95x64: odd paddings too
    np.testing.assert_array_equal(
        torch_resize_and_crop(image, *geometry), pillow_resize_and_crop(image, *geometry)
    )


def test_weights_are_pillows_fixed_point_and_sum_to_one():
    weights = fixed_point_weights(640, 298, 0, 298)
    assert np.array_equal(weights, np.round(weights))  # integers
    sums = weights.sum(axis=1) / 2**22
    np.testing.assert_allclose(sums, 1.0, atol=2e-6)  # each row rounds to ~1.0 in fixed point


@pytest.mark.parametrize("out_size", [1, 77, 224, 336, 448])
def test_byte_planes_recombine_to_the_weights_and_stay_float32_exact(out_size):
    """Up to DEVICE_MAX_DOWNSCALE every plane's row of byte x 255 sums below 2^24 (else
    byte_planes raises), and the planes give back the fixed-point weights exactly."""
    weights = fixed_point_weights(out_size * DEVICE_MAX_DOWNSCALE, out_size, 0, out_size)
    planes = byte_planes(weights).astype(np.int64)
    shifts = np.array([1 << shift for shift in BYTE_SHIFTS]).reshape(3, 1, 1)
    np.testing.assert_array_equal((planes * shifts).sum(axis=0), weights.astype(np.int64))


def test_a_downscale_float32_cannot_sum_exactly_is_refused():
    weights = fixed_point_weights(224 * 4 * DEVICE_MAX_DOWNSCALE, 224, 0, 224)
    with pytest.raises(ValueError, match="decode such an image on the CPU"):
        byte_planes(weights)


@pytest.mark.parametrize("geometry", [(224, 224, 224), (100, 120, 160)])
@pytest.mark.parametrize("size", [(640, 480), (300, 900), (90, 60)])
def test_a_batch_of_same_size_images_equals_each_resized_alone(size, geometry):
    images = torch.stack(
        [torch.from_numpy(np.array(noise(*size, seed=s))).permute(2, 0, 1) for s in range(3)]
    )
    together = resize_and_crop(images, *geometry)
    alone = torch.stack([resize_and_crop(image, *geometry) for image in images])
    assert together.shape == (3, 3, geometry[1], geometry[2])
    torch.testing.assert_close(together, alone, rtol=0, atol=0)


def test_the_weights_go_to_the_device_as_queued_copies(monkeypatch):
    """A blocking copy waits for (on a GPU: polls through) every pass queued before it, at each
    image size not seen before; the weights' copies are queued like the pixels'."""
    copies: list[tuple[torch.dtype, torch.device]] = []

    def queued(host: torch.Tensor, device: torch.device) -> torch.Tensor:
        copies.append((host.dtype, device))
        return host

    monkeypatch.setattr(device_resample, "to_device", queued)
    weights = device_resample._device_weights.__wrapped__(640, 298, 37, 224, "cuda")
    assert copies == [(torch.float32, torch.device("cuda"))] * 2  # both layouts of the planes
    span = weights.last - weights.first
    assert 0 < weights.first < weights.last <= 640 and span < 640
    assert weights.on_the_right.shape == (span, 3 * 224)
    assert weights.on_the_left.shape == (3 * 224, span)
