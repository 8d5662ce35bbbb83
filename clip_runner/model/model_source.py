"""Which CLIP checkpoint the service serves: one in CLIP_MODEL_DIR, or the baked-in one.

SageMaker extracts a model's `ModelDataUrl` (a model.tar.gz in S3) into /opt/ml/model before it
starts the container, so users can swap in a fine-tuned CLIP without rebuilding the image. The
SageMaker Python SDK's local mode mounts an empty directory there, so an empty (or absent)
directory keeps the model baked into the image. Anything else there must be a CLIP checkpoint in
transformers' `save_pretrained` layout, or the service refuses to start: silently serving the
baked-in model when the user asked for theirs would be worse than not starting.

The supervisor checks the directory before any worker starts (and sizes the API workers by its
checkpoint, config.py); without one, it checks the store's CLIP_MODEL_TAG entry by the same rules
(a model that is not a CLIP checkpoint, or one an interrupted import left half-written, otherwise
crashed the runner again at each restart, forever). The runner loads it. The API workers
tokenize with the tokenizer the runner sends them, so both sides always use the same checkpoint.
"""

from __future__ import annotations

import json
import logging
import os
import struct
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bentoml.exceptions import BentoMLConfigException

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


class ModelSourceError(ValueError, BentoMLConfigException):
    """What would be served is not a CLIP checkpoint: the service must not start.

    A BentoML configuration error, so that `bentoml serve` stops with its one line (`Error:
    [serve] `serve` failed: ...`, as config.py's SettingError) rather than a long traceback.
    """


class ModelDirError(ModelSourceError):
    """CLIP_MODEL_DIR holds something that is not a CLIP checkpoint: the service must not start."""


class StoredModelError(ModelSourceError):
    """CLIP_MODEL_TAG names a store entry that is not a CLIP checkpoint: the service must not
    start (its runner would fail to load it at every restart, forever)."""


def _listing(path: Path, limit: int = 12) -> str:
    names = sorted(p.name + ("/" if p.is_dir() else "") for p in path.iterdir())
    shown = ", ".join(names[:limit])
    return shown + (f" (+{len(names) - limit} more)" if len(names) > limit else "")


def _holds_files(path: Path) -> bool:
    """Whether any file lies below `path` (empty folders such as lost+found don't count)."""
    return any(p.is_file() for p in path.rglob("*"))


def checkpoint_problem(path: Path) -> str | None:
    """Why `path` is not a CLIP checkpoint in transformers' format, or None when it is one.

    Reads config files, and the weights' headers only, so the supervisor can afford it at every
    start: what would otherwise fail (or worse, load with random values) in the runner, at each
    of its restarts, is refused once, saying what is wrong.
    """
    if not (path / "config.json").is_file():
        return _missing_config_problem(path)
    try:
        config = _read_json(path / "config.json")
        return (
            model_type_problem(config)
            or _weights_problem(path)
            or _tokenizer_problem(path)
            or _image_processor_problem(path, config)
        )
    except ValueError as exc:  # a config file that is not JSON
        return str(exc)


def _missing_config_problem(path: Path) -> str:
    archives = [p.name for p in path.iterdir() if p.name.endswith((".tar.gz", ".tgz", ".tar"))]
    if archives:
        return (
            f"it holds the archive {archives[0]} instead of its contents (SageMaker extracts "
            "ModelDataUrl's model.tar.gz itself; mount the extracted files)"
        )
    return "there is no config.json"


def _unreadable(file: Path, exc: OSError) -> str:
    """Why a checkpoint file could not be opened, said as such: save_pretrained writes the
    weights readable by their owner only, and a server running as another user (the image's
    uid 1034) had been told its weights were not a complete safetensors file."""
    reason = f"{file.name} cannot be read: {exc.strerror or exc}"
    if isinstance(exc, PermissionError):
        reason += f" (the server runs as uid {os.getuid()}: make the checkpoint readable by it)"
    return reason


def _read_json(file: Path) -> Any:
    try:
        return json.loads(file.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ValueError(_unreadable(file, exc)) from exc
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{file.name} is not readable JSON ({exc})") from exc


def model_type_problem(config: Any) -> str | None:
    """Why a checkpoint's config.json is not a CLIPModel's. `CLIPModel.from_pretrained` only warns
    on another model type, then builds a default-shaped CLIP with random weights."""
    model_type = config.get("model_type") if isinstance(config, dict) else None
    if model_type != "clip":
        return f"config.json says model_type {model_type!r}, not 'clip'"
    return None


def _weights_problem(path: Path) -> str | None:
    """No weights file, or a safetensors file cut short (an interrupted copy, download or import:
    BentoML leaves a half-copied entry in its store when the import is interrupted)."""
    present = [name for name in WEIGHT_FILES if (path / name).is_file()]
    if not present:
        return f"there are no weights (one of {', '.join(WEIGHT_FILES)})"
    if present[0] == "model.safetensors":  # what transformers loads first
        return _safetensors_problem(path / "model.safetensors")
    if present[0] == "model.safetensors.index.json":
        return _shards_problem(path, _read_json(path / present[0]))
    return None  # pytorch_model.bin: torch's own format, left to the loader


def _shards_problem(path: Path, index: Any) -> str | None:
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not weight_map:
        return "model.safetensors.index.json has no weight_map"
    for shard in sorted(set(map(str, weight_map.values()))):
        if not (path / shard).is_file():
            return f"the weights shard {shard} (model.safetensors.index.json) is missing"
        problem = _safetensors_problem(path / shard)
        if problem is not None:
            return problem
    return None


def _safetensors_problem(file: Path) -> str | None:
    """Checks the file's length against its header (8 bytes of length, then JSON naming each
    tensor's byte range): a cut-short file otherwise passed for weights until the runner read
    it."""
    size = file.stat().st_size
    try:
        with file.open("rb") as handle:
            (header_length,) = struct.unpack("<Q", handle.read(8))
            if 8 + header_length > size:
                raise ValueError("header longer than the file")
            header = json.loads(handle.read(header_length))
        tensors = [entry for key, entry in header.items() if key != "__metadata__"]
        end = max((int(entry["data_offsets"][1]) for entry in tensors), default=0)
    except OSError as exc:
        return _unreadable(file, exc)
    except (ValueError, struct.error, KeyError, TypeError, IndexError, AttributeError):
        return f"{file.name} is not a complete safetensors file ({size:,} bytes)"
    expected = 8 + header_length + end
    if size < expected:
        return (
            f"{file.name} is cut short: {size:,} of the {expected:,} bytes its header lists "
            "(an interrupted copy, download or import)"
        )
    return None


def _tokenizer_problem(path: Path) -> str | None:
    has_tokenizer = (path / "tokenizer.json").is_file() or all(
        (path / name).is_file() for name in ("vocab.json", "merges.txt")
    )
    if not has_tokenizer:
        return "there is no tokenizer (tokenizer.json, or vocab.json + merges.txt)"
    return None


def _image_processor_config(path: Path) -> dict | None:
    """The image processor's settings as transformers reads them: processor_config.json's
    nested `image_processor` (transformers 5), else preprocessor_config.json (older ones)."""
    if (path / "processor_config.json").is_file():
        nested = _read_json(path / "processor_config.json")
        if isinstance(nested, dict) and isinstance(nested.get("image_processor"), dict):
            return nested["image_processor"]
    if (path / "preprocessor_config.json").is_file():
        config = _read_json(path / "preprocessor_config.json")
        return config if isinstance(config, dict) else None
    return None


def _image_processor_problem(path: Path, config: dict) -> str | None:
    """No image processor, or one this server would not follow (image_processor_problem), its
    settings read as transformers reads them: a setting left out (or null) is CLIP's default."""
    processor = _image_processor_config(path)
    if processor is None:
        return f"there is no image processor config ({' or '.join(PROCESSOR_FILES)})"
    vision = config.get("vision_config") or {}
    image_size = vision.get("image_size", 224) if isinstance(vision, dict) else 224
    given = {name: value for name, value in processor.items() if value is not None}
    return image_processor_problem({**CLIP_PROCESSOR_DEFAULTS, **given}, image_size)


# Pillow's number for bicubic resampling: what CLIP's image processors resize with.
BICUBIC = 3
# What transformers' CLIPImageProcessor takes for a setting its config leaves out.
CLIP_PROCESSOR_DEFAULTS: dict[str, Any] = {
    "do_resize": True,
    "size": {"shortest_edge": 224},
    "resample": BICUBIC,
    "do_center_crop": True,
    "crop_size": {"height": 224, "width": 224},
    "do_rescale": True,
    "do_normalize": True,
}


def image_processor_problem(processor: Mapping[str, Any], image_size: object) -> str | None:
    """What in an image processor's settings (`to_dict()`'s, or its config's with CLIP's
    defaults) this server would not do as transformers does, or cannot serve at all; None when
    it serves it exactly.

    The server resizes every image's shortest edge bicubically (the API workers, the runner, on
    a GPU too), then crops, rescales and normalises: a processor that resized otherwise, or
    skipped a step, had been served with answers transformers would not give, unsaid; one whose
    size was a fixed height and width, or whose crop was not the model's input size, had the
    runner fail at every start."""
    if processor.get("do_resize") is False:
        return "its image processor does not resize images (do_resize false); this server does"
    size = processor.get("size")
    if served_shortest_edge(processor) is None:
        return (
            f"its image processor resizes images to {size!r}, not by their shortest edge "
            "alone (size.shortest_edge), which is how this server resizes"
        )
    resample = processor.get("resample")
    if resample != BICUBIC:
        return (
            f"its image processor resamples with Pillow's filter {resample}; this server "
            f"resizes bicubically ({BICUBIC}) only, as CLIP's processors do"
        )
    for step in ("do_rescale", "do_normalize"):
        if processor.get(step) is False:
            return f"its image processor skips a step ({step} false); this server does not"
    crop = served_crop(processor)
    if crop is None:
        return f"its image processor center-crops to {processor.get('crop_size')!r}: no size"
    if not isinstance(image_size, int) or crop == (image_size, image_size):
        return None
    return (
        f"the image processor crops images to {crop[0]}x{crop[1]} pixels, but the model takes "
        f"{image_size}x{image_size} (config.json vision_config.image_size {image_size}): a "
        "processor saved from another CLIP?"
    )


def served_shortest_edge(processor: Mapping[str, Any]) -> int | None:
    """The size an image's shortest edge is resized to; None where the processor resizes
    otherwise (a height and width, or a longest edge's cap as well)."""
    size = processor.get("size")
    if isinstance(size, int):  # transformers 4's configs
        return size
    if not isinstance(size, Mapping):
        return None
    others = {name for name, value in size.items() if value is not None} - {"shortest_edge"}
    shortest = size.get("shortest_edge")
    return shortest if isinstance(shortest, int) and not others else None


def served_crop(processor: Mapping[str, Any]) -> tuple[int, int] | None:
    """(height, width) of the pixels the model is given: the center crop (an int in older
    configs), or without one the resized image itself, cropped square as the model takes it
    (transformers would refuse a non-square one). None where neither can be read."""
    if processor.get("do_center_crop") is False:
        shortest = served_shortest_edge(processor)
        return None if shortest is None else (shortest, shortest)
    crop = processor.get("crop_size")
    if isinstance(crop, int):
        return crop, crop
    if isinstance(crop, Mapping) and isinstance(crop.get("height"), int):
        return crop["height"], crop.get("width", crop["height"])
    return None


# Where SageMaker extracts a model's data (CLIP_MODEL_DIR's default); absent without any.
SAGEMAKER_MODEL_DIR = "/opt/ml/model"


def find_checkpoint(model_dir: str) -> Path | None:
    """The checkpoint to serve from `model_dir`, or None to serve the baked-in model.

    None when the setting is blank, or the directory holds no files, or it is SageMaker's
    (SAGEMAKER_MODEL_DIR) and absent (an endpoint without model data). Another directory that
    does not exist is a setting mistyped: a typo had silently served the baked-in model. A
    tarball made with its folder (`tar czf model.tar.gz my-clip/`) extracts one level down, so a
    lone sub-directory holding the checkpoint is accepted as well. Anything else raises
    ModelDirError.
    """
    if not model_dir.strip():
        return None
    root = Path(model_dir)
    if not root.exists():
        if root == Path(SAGEMAKER_MODEL_DIR):
            return None
        raise ModelDirError(
            f"CLIP_MODEL_DIR {root} does not exist: point it at a checkpoint's directory, or "
            "leave it unset (or blank) to serve the model in the image"
        )
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
        try:
            return load_clip(stored)
        except Exception as exc:  # as below: weights lacking or unreadable, each its own kind
            raise StoredModelError(
                f"CLIP_MODEL_TAG {stored.tag}: the stored model does not load: "
                f"{type(exc).__name__}: {exc}"
            ) from exc
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


def stored_model_problem(model_tag: str) -> str | None:
    """Why the store's entry `model_tag` is not a CLIP checkpoint, or None when it is one.

    Raises bentoml.exceptions.NotFound when the store has no such entry: what that means is the
    caller's to say (the runner refuses to start; `--if-missing` imports one).
    """
    import bentoml

    try:
        stored = bentoml.models.get(model_tag)
    except bentoml.exceptions.NotFound:
        raise
    except bentoml.exceptions.BentoMLException as exc:  # e.g. an entry without its model.yaml
        return f"BentoML cannot read its store entry ({str(exc).strip()})"
    except OSError:  # the store itself unreadable: the caller's to say
        raise
    except Exception as exc:  # noqa: BLE001 - a model.yaml cut short, in a line or after one
        # BentoML lets PyYAML's error through, or cattrs', or a KeyError or TypeError, as where
        # the file was cut: each had been a traceback (make serve could not get past it).
        reason = " ".join(f"{type(exc).__name__}: {exc}".split())[:200]
        return f"BentoML cannot read its store entry (its model.yaml is not whole: {reason})"
    problem = checkpoint_problem(Path(stored.path))
    return None if problem is None else f"{stored.tag} in {stored.path}: {problem}"


def check_served_model(model_tag: str, model_dir: str) -> None:
    """Refuse to start unless what the runner will serve is a CLIP checkpoint: the one in
    `model_dir` (ModelDirError), else the store's `model_tag` (StoredModelError).

    Run by the supervisor before any worker starts; reads config files and headers only.
    """
    if find_checkpoint(model_dir) is not None:
        return
    import bentoml

    try:
        problem = stored_model_problem(model_tag)
    except bentoml.exceptions.NotFound:
        return  # the runner's `BentoModel(model_tag)` refuses the start, naming the tag
    if problem is not None:
        raise StoredModelError(
            f"CLIP_MODEL_TAG {model_tag} is not a CLIP checkpoint in transformers' format: "
            f"{problem}. Import one with scripts/import_model.py (`--from-dir DIR`, `--hub-id "
            "ID`), or set CLIP_MODEL_TAG to another model in the store (`bentoml models list`)."
        )
