"""Which CLIP checkpoint the service serves: one in CLIP_MODEL_DIR, or the baked-in one.

SageMaker extracts a model's `ModelDataUrl` (a model.tar.gz in S3) into /opt/ml/model before it
starts the container, so users can swap in a fine-tuned CLIP without rebuilding the image. The
SageMaker Python SDK's local mode mounts an empty directory there, so an empty (or absent)
directory keeps the model baked into the image. Anything else there must be a CLIP checkpoint in
transformers' `save_pretrained` layout, or the service refuses to start: silently serving the
baked-in model when the user asked for theirs would be worse than not starting.

The supervisor checks the directory before any worker starts (and sizes the API workers by its
checkpoint, config.py); the runner loads it. The API workers tokenize with the tokenizer the
runner sends them, so both sides always use the same checkpoint.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import bentoml

    from clip_runner.model.store import LoadedClip

logger = logging.getLogger(__name__)

MODEL_DIR_TAG_PREFIX = "model-dir:"
WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)
# transformers 5 saves a processor as processor_config.json; older versions, and image
# processors saved on their own, as preprocessor_config.json.
PROCESSOR_FILES = ("processor_config.json", "preprocessor_config.json")
ADVICE = (
    "Put the save_pretrained output of a transformers CLIPModel and its CLIPProcessor there "
    "(config.json, weights, tokenizer and image processor config), or leave the directory "
    "empty to serve the model built into the image."
)


class ModelDirError(ValueError):
    """CLIP_MODEL_DIR holds something that is not a CLIP checkpoint: the service must not start."""


def _listing(path: Path, limit: int = 12) -> str:
    names = sorted(p.name + ("/" if p.is_dir() else "") for p in path.iterdir())
    shown = ", ".join(names[:limit])
    return shown + (f" (+{len(names) - limit} more)" if len(names) > limit else "")


def _holds_files(path: Path) -> bool:
    """Whether any file lies below `path` (empty folders such as lost+found don't count)."""
    return any(p.is_file() for p in path.rglob("*"))


def checkpoint_problem(path: Path) -> str | None:
    """Why `path` is not a CLIP checkpoint in transformers' format, or None when it is one."""
    config_file = path / "config.json"
    if not config_file.is_file():
        archives = [p.name for p in path.iterdir() if p.name.endswith((".tar.gz", ".tgz", ".tar"))]
        if archives:
            return (
                f"it holds the archive {archives[0]} instead of its contents (SageMaker extracts "
                "ModelDataUrl's model.tar.gz itself; mount the extracted files)"
            )
        return "there is no config.json"
    try:
        config = json.loads(config_file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        return f"config.json is not readable JSON ({exc})"
    model_type = config.get("model_type") if isinstance(config, dict) else None
    if model_type != "clip":
        return f"config.json says model_type {model_type!r}, not 'clip'"
    if not any((path / name).is_file() for name in WEIGHT_FILES):
        return f"there are no weights (one of {', '.join(WEIGHT_FILES)})"
    has_tokenizer = (path / "tokenizer.json").is_file() or all(
        (path / name).is_file() for name in ("vocab.json", "merges.txt")
    )
    if not has_tokenizer:
        return "there is no tokenizer (tokenizer.json, or vocab.json + merges.txt)"
    if not any((path / name).is_file() for name in PROCESSOR_FILES):
        return f"there is no image processor config ({' or '.join(PROCESSOR_FILES)})"
    return None


def find_checkpoint(model_dir: str) -> Path | None:
    """The checkpoint to serve from `model_dir`, or None to serve the baked-in model.

    None when the setting is blank, or the directory is absent or holds no files. A tarball made
    with its folder (`tar czf model.tar.gz my-clip/`) extracts one level down, so a lone
    sub-directory holding the checkpoint is accepted as well. Anything else raises ModelDirError.
    """
    if not model_dir.strip():
        return None
    root = Path(model_dir)
    if not root.exists():
        return None
    if not root.is_dir():
        raise ModelDirError(f"CLIP_MODEL_DIR {root} is not a directory")
    if not _holds_files(root):
        return None
    entries = list(root.iterdir())
    candidate = root
    if len(entries) == 1 and entries[0].is_dir() and (entries[0] / "config.json").is_file():
        candidate = entries[0]
    problem = checkpoint_problem(candidate)
    if problem is not None:
        raise ModelDirError(
            f"CLIP_MODEL_DIR {root} holds no CLIP checkpoint in transformers' format: {problem}. "
            f"It holds: {_listing(root)}. {ADVICE}"
        )
    return candidate


def load_served_clip(stored: bentoml.Model, model_dir: str) -> LoadedClip:
    """The checkpoint in `model_dir` when there is one, else the baked-in `stored` model.

    A checkpoint from the model directory is tagged `model-dir:<path>`: that tag is what
    `describe` and every answer's `model` field report.
    """
    # Here, not at the top: the directory rules above run in the supervisor and the API workers,
    # which never load the model, nor torch and transformers with it (store.py).
    from clip_runner.model.store import LoadedClip, load_checkpoint, load_clip

    checkpoint = find_checkpoint(model_dir)
    if checkpoint is None:
        if model_dir.strip() and Path(model_dir).is_dir():  # a warning: BentoML hides info
            logger.warning("%s is empty: serving the baked-in model %s", model_dir, stored.tag)
        return load_clip(stored)
    try:
        model, processor = load_checkpoint(checkpoint)
    except Exception as exc:  # torch, safetensors, transformers: each raises its own kind
        raise ModelDirError(
            f"CLIP_MODEL_DIR {model_dir}: the CLIP checkpoint in {checkpoint} does not load: "
            f"{type(exc).__name__}: {exc}"
        ) from exc
    tag = MODEL_DIR_TAG_PREFIX + str(checkpoint)
    logger.warning(
        "serving the CLIP checkpoint in %s (CLIP_MODEL_DIR; on SageMaker: the model's "
        "ModelDataUrl) as %s, instead of the baked-in model %s",
        checkpoint,
        tag,
        stored.tag,
    )
    return LoadedClip(tag=tag, model=model, processor=processor, random_weights=False)


def served_checkpoint(model_tag: str, model_dir: str) -> Path | None:
    """The directory of the checkpoint the runner will serve, before it loads it: None when
    there is none yet (an empty store, or a model directory the runner will refuse)."""
    import bentoml

    try:
        return find_checkpoint(model_dir) or Path(bentoml.models.get(model_tag).path)
    except (ModelDirError, bentoml.exceptions.NotFound):
        return None
