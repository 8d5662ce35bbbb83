"""Memory and CPU speed of the CLIP architectures the service serves, for README "Models".

    python scripts/model_sizes.py                 # every architecture in clip_runner.model.store
    python scripts/model_sizes.py vit-b32 vit-l14

Each architecture is measured in its own subprocess (so one's memory does not hide another's):
random weights of the published shapes (memory and speed do not depend on weight values), the
process's RSS with torch imported, after the model is built, and at the peak of encoding a batch
of images and six prompts in fp32 on the CPU. fp16 weights on a GPU take half the fp32 size.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def measure(name: str) -> dict:
    """Runs in the child process: build, encode, report."""
    import numpy as np
    import psutil
    import torch

    from clip_runner.model.encoding import ClipEncoder
    from clip_runner.model.store import build_random_architecture

    process = psutil.Process()
    base_rss = process.memory_info().rss
    model, processor = build_random_architecture(name)
    parameters = sum(p.numel() for p in model.parameters())
    encoder = ClipEncoder(model, processor, torch.device("cpu"), torch.float32)
    loaded_rss = process.memory_info().rss
    size = encoder.crop_height
    batch = 8 if parameters < 300e6 else 2
    pixels = np.random.default_rng(0).integers(0, 256, (batch, size, size, 3), dtype=np.uint8)
    encoder.encode_images(pixels)  # warm-up
    started = time.perf_counter()
    encoder.encode_images(pixels)
    seconds = time.perf_counter() - started
    encoder.encode_texts([f"a photo of a {w}" for w in "cat dog car bag man woman".split()])
    peak_rss = psutil.Process().memory_info().rss
    return {
        "architecture": name,
        "image_size": size,
        "parameters_m": round(parameters / 1e6, 1),
        "fp32_weights_mb": round(parameters * 4 / 2**20),
        "rss_torch_mb": round(base_rss / 2**20),
        "rss_loaded_mb": round(loaded_rss / 2**20),
        "rss_peak_mb": round(peak_rss / 2**20),
        "batch": batch,
        "cpu_images_per_s": round(batch / seconds, 2),
        "torch_threads": torch.get_num_threads(),
    }


def main() -> int:
    if sys.argv[1:2] == ["--child"]:
        print(json.dumps(measure(sys.argv[2])))
        return 0
    from clip_runner.model.store import ARCHITECTURES

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "names",
        nargs="*",
        metavar="ARCHITECTURE",
        help=f"any of {', '.join(ARCHITECTURES)} (default: all but tiny)",
    )
    names = parser.parse_args().names
    if unknown := [name for name in names if name not in ARCHITECTURES]:
        parser.error(
            f"unknown architecture {', '.join(unknown)}: any of {', '.join(ARCHITECTURES)}"
        )
    names = names or [name for name in ARCHITECTURES if name != "tiny"]
    rows = []
    for name in names:
        output = subprocess.run(
            [sys.executable, __file__, "--child", name], capture_output=True, text=True, check=True
        ).stdout
        rows.append(json.loads(output.strip().splitlines()[-1]))
        print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    print(
        "| architecture | image size | parameters | fp32 weights | process RSS loaded | "
        "RSS peak (batch) | CPU images/s |"
    )
    print("|---|---|---|---|---|---|---|")
    for row in rows:
        print(
            f"| {row['architecture']} | {row['image_size']} | {row['parameters_m']} M | "
            f"{row['fp32_weights_mb']} MB | {row['rss_loaded_mb']} MB | "
            f"{row['rss_peak_mb']} MB ({row['batch']}) | {row['cpu_images_per_s']} |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
