"""The torch resampler against Pillow itself: every pixel equal, on the hardest inputs."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from clip_runner.resample import fixed_point_weights, resize_and_crop, resized_size
from tests.hard_images import hard_images, noise, stripes


def pillow_resize_and_crop(image: Image.Image, edge: int, crop_h: int, crop_w: int) -> np.ndarray:
    """What CLIPImageProcessor does: Pillow's bicubic resize of the whole image, center crop."""
    new_w, new_h = resized_size(*image.size, edge)
    resized = np.asarray(image.resize((new_w, new_h), Image.Resampling.BICUBIC))
    out_w, out_h = min(crop_w, new_w), min(crop_h, new_h)
    left, top = (new_w - out_w) // 2, (new_h - out_h) // 2
    canvas = np.zeros((crop_h, crop_w, 3), dtype=np.uint8)
    pad_top, pad_left = (crop_h - out_h) // 2, (crop_w - out_w) // 2
    canvas[pad_top : pad_top + out_h, pad_left : pad_left + out_w] = resized[
        top : top + out_h, left : left + out_w
    ]
    return canvas


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


@pytest.mark.parametrize(
    "size",
    [
        (640, 480),  # the seed's photos
        (480, 640),
        (300, 600),  # exactly twice as tall: Pillow still resizes horizontally first
        (300, 601),  # just over: Pillow resizes vertically first
        (300, 5000),
        (5000, 300),
        (224, 224),  # no resize at all
        (225, 224),
        (100, 70),  # upscaling
        (90, 400),  # upscaling a tall image: horizontal first
    ],
)
def test_equals_pillow_at_every_pass_order_and_direction(size: tuple[int, int]):
    image = noise(*size, seed=size[0] * 7 + size[1])
    np.testing.assert_array_equal(
        torch_resize_and_crop(image, 224, 224, 224), pillow_resize_and_crop(image, 224, 224, 224)
    )


def test_crop_larger_than_the_resized_image_is_zero_padded_like_the_cpu_path():
    image = stripes(300, 200, period=3)
    np.testing.assert_array_equal(
        torch_resize_and_crop(image, 100, 120, 160), pillow_resize_and_crop(image, 100, 120, 160)
    )


def test_weights_are_pillows_fixed_point_and_sum_to_one():
    weights = fixed_point_weights(640, 298, 0, 298)
    assert np.array_equal(weights, np.round(weights))  # integers
    sums = weights.sum(axis=1) / 2**22
    np.testing.assert_allclose(sums, 1.0, atol=2e-6)  # each row rounds to ~1.0 in fixed point
