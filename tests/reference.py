"""The reference answer: transformers' CLIPProcessor + CLIPModel, computed directly."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from clip_runner.model.store import LoadedClip


def reference_probabilities(
    clip: LoadedClip, images: list[Image.Image], prompts: list[str]
) -> np.ndarray:
    """softmax(logits_per_image) exactly as `CLIPModel.forward` computes it."""
    inputs = clip.processor(text=prompts, images=images, return_tensors="pt", padding=True)
    with torch.inference_mode():
        output = clip.model(**inputs)
    return output.logits_per_image.softmax(dim=-1).numpy()


def assert_matches_reference(
    answer: list[dict], reference: np.ndarray, names: list[str], atol: float = 1e-5
) -> None:
    """Every returned probability equals the reference's, and the order is the reference's."""
    assert len(answer) == len(reference)
    for prediction, row in zip(answer, reference, strict=True):
        indices, returned_names, probabilities = prediction["prompts"]
        k = min(3, len(names))
        assert len(indices) == k
        assert returned_names == [names[i] for i in indices]
        np.testing.assert_allclose(probabilities, row[indices], atol=atol)
        assert prediction["confidence"] == probabilities[0]
        np.testing.assert_allclose(probabilities[0], row.max(), atol=atol)
        assert probabilities == sorted(probabilities, reverse=True)
