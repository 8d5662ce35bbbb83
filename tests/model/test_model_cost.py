"""The vision tower's cost per image from a config, checked against torch's own FLOP counter."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode
from transformers import CLIPVisionConfig, CLIPVisionModel

from clip_runner.model.model_cost import VisionShape, checkpoint_image_gmacs, image_encoder_gmacs


@pytest.mark.parametrize(
    "shape",
    [
        {"hidden_size": 32, "intermediate_size": 128, "num_hidden_layers": 2, "patch_size": 32},
        {
            "hidden_size": 64,
            "intermediate_size": 160,
            "num_hidden_layers": 3,
            "patch_size": 16,
            "image_size": 96,
        },
    ],
)
def test_the_estimate_is_what_torch_counts_in_a_forward_pass(shape):
    config = CLIPVisionConfig(num_attention_heads=2, **shape)
    config._attn_implementation = "eager"  # attention as matmuls, which the counter sees
    model = CLIPVisionModel(config).eval()
    with FlopCounterMode(display=False) as counter, torch.inference_mode():
        model(pixel_values=torch.zeros(1, 3, config.image_size, config.image_size))
    counted_gmacs = counter.get_total_flops() / 2 / 1e9  # a multiply-accumulate is two FLOPs
    shape = VisionShape.from_config(config.to_dict())
    assert image_encoder_gmacs(shape) == pytest.approx(counted_gmacs, rel=1e-3)


def test_vit_b32_costs_what_is_published():
    """VisionShape's defaults are ViT-B/32's; open_clip lists its image tower at 4.41 GMAC."""
    assert image_encoder_gmacs(VisionShape()) == pytest.approx(4.41, rel=0.01)


def test_the_defaults_of_a_config_that_leaves_sizes_out_are_transformers_own():
    assert VisionShape() == VisionShape.from_config(CLIPVisionConfig().to_dict())
    assert VisionShape.from_config({"hidden_size": 64}) == VisionShape(hidden_size=64)


def test_a_stored_checkpoint_is_sized_from_its_config(tiny_clip, tiny_stored_model, tmp_path):
    expected = image_encoder_gmacs(
        VisionShape.from_config(tiny_clip.model.config.vision_config.to_dict())
    )
    assert checkpoint_image_gmacs(Path(tiny_stored_model.path)) == pytest.approx(expected)
    assert expected < 0.01  # the tiny test model: cheap next to any image's decoding
    assert checkpoint_image_gmacs(tmp_path) is None  # no config.json: unknown
    (tmp_path / "config.json").write_text('{"vision_config": {"hidden_size": "wide"}}')
    assert checkpoint_image_gmacs(tmp_path) is None  # unreadable: unknown, not a crash
