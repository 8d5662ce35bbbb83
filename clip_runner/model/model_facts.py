"""What the API service needs to know about the served model: the runner's `describe` answer.

Its own module, free of torch: the API workers build it from that answer and never load the
model's libraries (encoding.py fills it in on the runner).
"""

from __future__ import annotations

from dataclasses import dataclass

# What decodes the JPEGs the API workers forward (`ModelFacts.jpeg_decoder`): Pillow, in the
# runner's threads, the same libjpeg-turbo as the API workers' own decode, or nvJPEG on the GPU
# (the opt-in CLIP_RUNNER_JPEG_DECODER=nvjpeg).
PILLOW = "pillow"
NVJPEG = "nvjpeg"


@dataclass(frozen=True)
class ModelFacts:
    """What the API service needs to know about the served model."""

    tag: str
    embedding_dim: int
    logit_scale: float
    shortest_edge: int
    crop_height: int
    crop_width: int
    max_text_tokens: int
    random_weights: bool
    # How the runner works (engine.py fills these in): where the model runs and in what dtype,
    # how many forward passes it runs at once and how large, how long a full text pass takes,
    # and what decodes forwarded JPEGs.
    device: str = "cpu"
    dtype: str = "float32"
    passes: int = 1
    max_batch: int = 32
    max_text_batch: int = 128
    text_pass_s: float = 0.0  # a full text pass, timed at the warm-up (0: not timed)
    jpeg_decoder: str = PILLOW
