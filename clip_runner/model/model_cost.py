"""What one image costs the served model's vision tower, known from its config.json alone.

The API worker count is fixed when the service is defined, before any model is loaded, yet the
right count depends on the model: with a cheap one the API workers' image work is the limit,
with a costly one the runner is. The config is enough to tell the two apart.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass, fields
from pathlib import Path

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class VisionShape:
    """The vision tower's sizes that set its cost, read from config.json's `vision_config`
    without transformers: this runs in the supervisor and every API worker, which never load
    transformers (and with it torch) otherwise.

    The defaults are `CLIPVisionConfig`'s own (ViT-B/32's), which a config.json may leave out;
    a test holds them to transformers'.
    """

    image_size: int = 224
    patch_size: int = 32
    hidden_size: int = 768
    intermediate_size: int = 3072
    num_hidden_layers: int = 12

    @classmethod
    def from_config(cls, vision: Mapping[str, object]) -> VisionShape:
        return cls(**{f.name: int(vision[f.name]) for f in fields(cls) if f.name in vision})


def image_encoder_gmacs(vision: VisionShape) -> float:
    """Multiply-accumulates (in billions) of one image through the vision tower: the patch
    embedding, then per layer the q/k/v/out projections, the MLP and the attention itself.

    Norms, softmax and the projection head are left out: they are under 1% for any CLIP.
    """
    side = vision.image_size // vision.patch_size
    tokens = side * side + 1  # the patches and the class token
    width, hidden = vision.hidden_size, vision.intermediate_size
    patch_embedding = side * side * 3 * vision.patch_size**2 * width
    per_layer = tokens * (4 * width * width + 2 * width * hidden) + 2 * tokens * tokens * width
    return (patch_embedding + vision.num_hidden_layers * per_layer) / 1e9


def checkpoint_image_gmacs(checkpoint: Path) -> float | None:
    """`image_encoder_gmacs` of the checkpoint in `checkpoint` (save_pretrained layout), or None
    when its config cannot be read (the runner then reports the problem when it loads it)."""
    try:
        config = json.loads((checkpoint / "config.json").read_text(encoding="utf-8"))
        shape = VisionShape.from_config(config.get("vision_config") or {})
    except (OSError, ValueError, TypeError, AttributeError) as exc:
        logger.warning("cannot read %s/config.json to size the API workers: %s", checkpoint, exc)
        return None
    return image_encoder_gmacs(shape)
