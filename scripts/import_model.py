"""Save a CLIP checkpoint into the BentoML model store as `clip:<version>`.

    python scripts/import_model.py                   # openai/clip-vit-base-patch32 from the hub
    python scripts/import_model.py --hub-id ID       # another hub checkpoint
    python scripts/import_model.py --from-dir DIR    # a save_pretrained directory
    python scripts/import_model.py --tiny            # small random-weight model (tests, offline)
    python scripts/import_model.py --random-vit-b32  # ViT-B/32 shapes, random weights (benchmarks)
    python scripts/import_model.py --random vit-l14  # other architectures' shapes, random weights

`--if-missing` does nothing when the store already has `clip:latest` (used by `make serve`).
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import bentoml

from clip_runner.config import DEFAULT_HUB_MODEL
from clip_runner.model.store import (
    ARCHITECTURES,
    HubUnavailableError,
    build_random_architecture,
    has_stored_model,
    load_from_dir,
    load_from_hub,
    save_clip,
)


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
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    args = parse_args(argv)
    if args.if_missing and has_stored_model():
        print("model store already has clip:latest; nothing to import")
        return 0
    try:
        if args.tiny or args.random_vit_b32 or args.random:
            architecture = args.random or ("tiny" if args.tiny else "vit-b32")
            model, processor = build_random_architecture(architecture)
            source, random_weights = f"random:{architecture}", True
        elif args.from_dir is not None:
            model, processor = load_from_dir(args.from_dir)
            source, random_weights = f"dir:{args.from_dir.resolve()}", False
        else:
            print(f"downloading {args.hub_id} from the Hugging Face hub ...", flush=True)
            model, processor = load_from_hub(args.hub_id)
            source, random_weights = f"hub:{args.hub_id}", False
    except (HubUnavailableError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    stored = save_clip(model, processor, source=source, random_weights=random_weights)
    print(f"saved {stored.tag} (source {source}) to {bentoml.models.get(stored.tag).path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
