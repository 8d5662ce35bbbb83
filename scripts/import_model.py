"""Save a CLIP checkpoint into the BentoML model store as `clip:<version>`.

    python scripts/import_model.py                   # openai/clip-vit-base-patch32 from the hub
    python scripts/import_model.py --hub-id ID       # another hub checkpoint
    python scripts/import_model.py --from-dir DIR    # a save_pretrained directory
    python scripts/import_model.py --tiny            # small random-weight model (tests, offline)
    python scripts/import_model.py --random-vit-b32  # ViT-B/32 shapes, random weights (benchmarks)
    python scripts/import_model.py --random vit-l14  # other architectures' shapes, random weights

`--if-missing` does nothing when the store already has `clip:latest` (used by `make serve`),
unless that one is broken (an import interrupted while BentoML copied it in): then it imports.
`--for-bento` (used by `make build`) then refuses when the model the bento will pack
(`CLIP_MODEL_TAG`, else `clip:latest`) has random weights, unless this command asked for random
weights or `ALLOW_RANDOM_WEIGHTS=1`: an image of it would answer noise, its only sign a warning
in the runner's log.

What cannot be imported (not a whole CLIP checkpoint, an unwritable model store) ends with one
`error: ...` line and exit status 2, never a traceback or a stored model of random weights.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import bentoml

from clip_runner.config import DEFAULT_HUB_MODEL
from clip_runner.model.model_source import checkpoint_problem, stored_model_problem
from clip_runner.model.store import (
    ARCHITECTURES,
    MODEL_NAME,
    build_random_architecture,
    load_from_dir,
    load_from_hub,
    save_clip,
)

if TYPE_CHECKING:
    from transformers import CLIPModel, CLIPProcessor

LATEST_TAG = f"{MODEL_NAME}:latest"


class ImportRefused(Exception):
    """What stops the import, said in one line (exit status 2)."""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--hub-id", default=DEFAULT_HUB_MODEL, help="Hugging Face hub model id")
    source.add_argument("--from-dir", type=Path, help="directory in save_pretrained layout")
    source.add_argument("--tiny", action="store_true", help="tiny random-weight CLIP")
    source.add_argument(
        "--random-vit-b32", action="store_true", help="ViT-B/32 shapes with random weights"
    )
    source.add_argument(
        "--random",
        choices=sorted(ARCHITECTURES),
        help="any listed architecture's shapes with random weights (sizes, memory, speed)",
    )
    parser.add_argument(
        "--if-missing", action="store_true", help="skip when the store already has clip:latest"
    )
    parser.add_argument(
        "--for-bento",
        action="store_true",
        help="refuse when the model a bento would pack has random weights (ALLOW_RANDOM_WEIGHTS=1)",
    )
    return parser.parse_args(argv)


def asks_for_random_weights(args: argparse.Namespace) -> bool:
    return bool(args.tiny or args.random_vit_b32 or args.random)


def refuse_random_weights_in_a_bento(args: argparse.Namespace) -> None:
    """`--for-bento`: the model `bentoml build` packs (CLIP_MODEL_TAG, else clip:latest) must not
    have random weights unless asked for: `make serve IMPORT_ARGS=--tiny` offline, then `make
    build` later, had packed the tiny model into the image SageMaker serves, silently."""
    tag = os.environ.get("CLIP_MODEL_TAG", "").strip() or LATEST_TAG
    if asks_for_random_weights(args) or os.environ.get("ALLOW_RANDOM_WEIGHTS") == "1":
        return
    try:
        labels = bentoml.models.get(tag).info.labels
    except bentoml.exceptions.NotFound:
        return  # `bentoml build` refuses it, naming the tag
    except bentoml.exceptions.BentoMLException as exc:  # an entry without its model.yaml
        raise ImportRefused(f"cannot read {tag} from the model store: {exc}") from exc
    if str(labels.get("random_weights", "false")) == "true":
        # `make build IMPORT_ARGS=...` imports nothing while the store has clip:latest
        # (--if-missing): the import is a command of its own.
        raise ImportRefused(
            f"{tag} has random weights (source {labels.get('source', 'unknown')}): a bento of it "
            "answers noise. Import real weights first (`make import-model`, or `make "
            "import-model IMPORT_ARGS='--from-dir DIR'` / `'--hub-id ID'`), name another model "
            "with CLIP_MODEL_TAG, or set ALLOW_RANDOM_WEIGHTS=1 to pack it anyway (tests, "
            "offline trials)"
        )


def keeps_stored_model() -> bool:
    """`--if-missing`: whether the store's clip:latest is a CLIP checkpoint to keep. A broken one
    (an import interrupted while BentoML copied it in leaves one) is replaced, saying so."""
    try:
        problem = stored_model_problem(LATEST_TAG)
    except bentoml.exceptions.NotFound:
        return False
    except OSError as exc:  # BENTOML_HOME a file, or unreadable
        raise ImportRefused(
            f"cannot read the BentoML model store {store_location()}: {exc}"
        ) from exc
    if problem is not None:
        print(f"the stored {LATEST_TAG} is broken ({problem}); importing a new one", flush=True)
    return problem is None


def load_source(args: argparse.Namespace) -> tuple[CLIPModel, CLIPProcessor, str, bool]:
    """Model, processor, source label and whether the weights are random, as asked for."""
    if asks_for_random_weights(args):
        architecture = args.random or ("tiny" if args.tiny else "vit-b32")
        model, processor = build_random_architecture(architecture)
        return model, processor, f"random:{architecture}", True
    if args.from_dir is not None:
        return *load_checkpoint_dir(args.from_dir), f"dir:{args.from_dir.resolve()}", False
    print(f"downloading {args.hub_id} from the Hugging Face hub ...", flush=True)
    return *load_from_hub(args.hub_id), f"hub:{args.hub_id}", False


def load_checkpoint_dir(path: Path) -> tuple[CLIPModel, CLIPProcessor]:
    """The directory's checkpoint, refused (as the service refuses CLIP_MODEL_DIR) when it is
    not a whole CLIP checkpoint, rather than stored as one with random weights."""
    problem = checkpoint_problem(path) if path.is_dir() else None
    if problem is not None:
        raise ImportRefused(f"{path} is not a CLIP checkpoint in transformers' format: {problem}")
    return load_from_dir(path)


def store_location() -> Path:
    return Path(os.environ.get("BENTOML_HOME") or Path.home() / "bentoml") / "models"


def save(model: CLIPModel, processor: CLIPProcessor, source: str, random_weights: bool) -> str:
    """Saves into the store; an unwritable or invalid one (BENTOML_HOME a file, models/ read-only)
    is refused in one line naming where, not a traceback from deep inside BentoML."""
    try:
        stored = save_clip(model, processor, source=source, random_weights=random_weights)
        return f"saved {stored.tag} (source {source}) to {bentoml.models.get(stored.tag).path}"
    except OSError as exc:
        raise ImportRefused(
            f"cannot write to the BentoML model store {store_location()}: {exc}"
        ) from exc


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    args = parse_args(argv)
    try:
        if args.if_missing and keeps_stored_model():
            print(f"model store already has {LATEST_TAG}; nothing to import")
        else:
            model, processor, source, random_weights = load_source(args)
            print(save(model, processor, source, random_weights))
        if args.for_bento:
            refuse_random_weights_in_a_bento(args)
    except (ImportRefused, OSError, ValueError, RuntimeError) as exc:
        # HubUnavailableError, a missing directory, CheckpointError, what transformers raises on
        # files it cannot read or weights of other shapes (a SigLIP): each says what is wrong.
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
