"""A load (the seed's by default): this checkout against another commit's, in alternating windows.

    python scripts/load_ab.py --baseline-rev 79914d3 --rounds 6
    python scripts/load_ab.py --baseline-rev 79914d3 CLIP_DECODE=runner   # settings for both
    python scripts/load_ab.py --baseline-rev 79914d3 --vit-b32 --seconds 25  # no regression?
    python scripts/load_ab.py --baseline-rev 79914d3 --load embed_texts  # uncached prompts

What a change to the work around the model buys, measured where the model costs nothing (the
`--overhead` scenario of bench.py: one 640x480 JPEG per request, six classes, 32 clients), or,
with `--vit-b32`, that it costs nothing where the model is the limit (random weights). Both
servers are up side by side for the whole run, each with its own BentoML home (two servers in
one home share their metrics' files), and the load windows take turns, so that this host's
drift over minutes falls on both alike. Per window: requests/s, p50, and each process's CPU per
request by role. Results: `--out` (JSON, every window), and the medians to stdout.

`--load embed_images` sends the seed's photos to `/embed_images`, `--load embed_texts` eight
prompts per request to `/embed_texts` that no window has sent before (each server's text cache
would otherwise answer the windows after its first), `--load phone_photos` the seed's request
with one 12-MP photo as phones store it (4032x3024, EXIF orientation 1, 3, 6 or 8), `--load
scans` with one greyscale JPEG of a page of text scanned at 200 dpi (A4, 1654x2339; a dense
page at 300 dpi passes the 6-MB body limit in base64), `--load progressive` the seed's load
with its photos stored as progressive JPEGs (as many web images are), `--load cmyk` with them
stored as CMYK JPEGs (as print and prepress files are).
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import json
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

from bench import (
    PHONE_PHOTOS,
    REPO,
    SEED_CLASSES,
    Scenario,
    bento_server,
    cpu_ms_per_request,
    import_random_model,
    measure,
    phone_photo_bodies,
    seed_request_bodies,
    uncached_text_bodies,
)
from startup_bench import worktree

from tests.hard_images import photo, text_page
from tests.helpers import encode

LOADS = ("seed", "embed_images", "embed_texts", "phone_photos", "scans", "progressive", "cmyk")
# Uncached prompts per window: more requests than any window sends.
TEXT_REQUESTS_PER_WINDOW = 50_000


def seed_body(jpeg: bytes) -> bytes:
    """The seed's request with this one image."""
    image = base64.b64encode(jpeg).decode()
    return json.dumps({"images": [image], "classes": SEED_CLASSES}).encode()


def scan_bodies() -> list[bytes]:
    """Four seed requests of one greyscale JPEG each (quality 90, about 2.8 MB): a page of text
    as a scanner at 200 dpi stores an A4 sheet, a different page each."""
    pages = (text_page(1654, 2339, seed).convert("L") for seed in range(4))
    return [seed_body(encode(page, "JPEG", quality=90)) for page in pages]


def cmyk_bodies() -> list[bytes]:
    """Four seed requests of the seed's 640x480 photos stored as CMYK JPEGs (quality 88; Pillow
    writes Adobe's inverted CMYK, as Photoshop does)."""
    photos = (photo(640, 480, seed).convert("CMYK") for seed in range(4))
    return [seed_body(encode(image, "JPEG", quality=88)) for image in photos]


def scenario(load: str, window_index: int) -> Scenario:
    """Window `window_index`'s load: the same requests each window, or for `embed_texts`
    prompts of this window's own."""
    if load == "embed_images":
        return Scenario(
            "embed_images c32", seed_request_bodies(classes=None), 1, 32, "/embed_images"
        )
    if load == "embed_texts":
        first = window_index * TEXT_REQUESTS_PER_WINDOW
        bodies = uncached_text_bodies(TEXT_REQUESTS_PER_WINDOW, first=first)
        return Scenario("embed_texts uncached c32", bodies, 8, 32, "/embed_texts")
    if load == "phone_photos":
        return Scenario(PHONE_PHOTOS, phone_photo_bodies(), 1, 32)
    if load == "scans":
        return Scenario("scanned pages c32", scan_bodies(), 1, 32)
    if load == "progressive":
        return Scenario("progressive seed c32", seed_request_bodies(progressive=True), 1, 32)
    if load == "cmyk":
        return Scenario("CMYK seed c32", cmyk_bodies(), 1, 32)
    return Scenario("seed c32", seed_request_bodies(), 1, 32)


def window(url: str, pid: int, load: Scenario, seconds: float) -> dict:
    """One load window's figures."""
    row = measure(url, pid, load, 1_000_000, seconds, metrics=True)
    return {
        "requests_per_s": row["requests_per_s"],
        "p50_ms": row["p50_ms"],
        "errors": row["errors"],
        "cpu_ms_per_request": cpu_ms_per_request(row),
    }


def medians(windows: list[dict]) -> dict:
    roles = windows[0]["cpu_ms_per_request"]
    return {
        "requests_per_s": statistics.median(w["requests_per_s"] for w in windows),
        "p50_ms": statistics.median(w["p50_ms"] for w in windows),
        "errors": sum(w["errors"] for w in windows),
        "cpu_ms_per_request": {
            role: statistics.median(w["cpu_ms_per_request"][role] for w in windows)
            for role in roles
        },
    }


def own_home(store: Path, home: Path) -> Path:
    """A BentoML home whose models are `store`'s: BentoML clears its home's metric files as a
    server starts, so the second server in a shared home took the first one's."""
    home.mkdir()
    (home / "models").symlink_to(store / "models", target_is_directory=True)
    return home


def alternating_rounds(
    baseline_rev: str,
    rounds: int,
    vit_b32: bool,
    settings: dict[str, str],
    run_round: Callable[[str, int, int], dict],
) -> dict[str, list[dict]]:
    """This checkout's server and `baseline_rev`'s, up side by side (each with its own BentoML
    home) for the whole run; `run_round(url, pid, index)` on each in turn, the order alternating
    round by round, `index` counting every call. Its figures, by server ("baseline",
    "current")."""
    scratch = Path(tempfile.mkdtemp(prefix="clip-load-ab-"))
    checkouts = {"baseline": worktree(baseline_rev, scratch), "current": REPO}
    figures: dict[str, list[dict]] = {name: [] for name in checkouts}
    try:
        with contextlib.ExitStack() as servers:
            urls = {}
            for name, checkout in checkouts.items():
                store, tag, _ = import_random_model(tiny=not vit_b32)
                log = scratch / f"{name}.log"
                home = own_home(store, scratch / f"home-{name}")
                urls[name] = servers.enter_context(
                    bento_server(home, tag, log, checkout=checkout, **settings)
                )
            for round_index in range(rounds):
                order = ["baseline", "current"] if round_index % 2 == 0 else ["current", "baseline"]
                for name in order:
                    index = len(figures["baseline"]) + len(figures["current"])
                    figures[name].append(run_round(*urls[name], index))
                    print(name, round_index, json.dumps(figures[name][-1]), flush=True)
    finally:
        subprocess.run(
            ["git", "-C", str(REPO), "worktree", "remove", "--force", str(checkouts["baseline"])],
            check=False,
        )
    return figures


def current_rev() -> str:
    return subprocess.run(
        ["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True, text=True
    ).stdout.strip()


def ab_parser(doc: str, rounds: int, out_name: str) -> argparse.ArgumentParser:
    """The arguments of every A/B script: the baseline, rounds, the output and settings."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--baseline-rev", required=True, help="the commit to compare against")
    parser.add_argument("--rounds", type=int, default=rounds, help="rounds of each server")
    parser.add_argument("--out", type=Path, default=Path(tempfile.gettempdir()) / out_name)
    parser.add_argument("settings", nargs="*", help="NAME=VALUE for both servers' environment")
    return parser


def settings_of(args: argparse.Namespace) -> dict[str, str]:
    return dict(setting.split("=", 1) for setting in args.settings)


def written(args: argparse.Namespace, result: dict) -> int:
    """`result`, after both revisions, to `args.out`; its medians to stdout."""
    result = {"baseline_rev": args.baseline_rev, "current_rev": current_rev(), **result}
    args.out.write_text(json.dumps(result, indent=1))
    print(json.dumps(result["medians"], indent=1))
    return 0


def main() -> int:
    parser = ab_parser(__doc__, rounds=6, out_name="load-ab.json")
    parser.add_argument("--seconds", type=float, default=15, help="each window")
    parser.add_argument("--vit-b32", action="store_true", help="ViT-B/32 instead of the tiny model")
    parser.add_argument("--load", choices=LOADS, default="seed", help="the requests sent")
    args = parser.parse_args()
    settings = settings_of(args)

    def run_window(url: str, pid: int, index: int) -> dict:
        return window(url, pid, scenario(args.load, index), args.seconds)

    windows = alternating_rounds(args.baseline_rev, args.rounds, args.vit_b32, settings, run_window)
    return written(
        args,
        {
            "model": "random-weight ViT-B/32" if args.vit_b32 else "random-weight tiny CLIP",
            "load": args.load,
            "settings": settings,
            "seconds_per_window": args.seconds,
            "medians": {name: medians(runs) for name, runs in windows.items()},
            "windows": windows,
        },
    )


if __name__ == "__main__":
    sys.exit(main())
