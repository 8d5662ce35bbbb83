"""Text requests beside a cold ensemble: this checkout against another commit's, alternating.

    python scripts/text_wait_ab.py --baseline-rev b9be958 --rounds 2   # ViT-B/32, random weights

How long a small text request waits while its API worker encodes a large ensemble, and what the
ensemble itself takes (ViT-B/32 on 2 cores gets one API worker, so the two clients share it;
with more, the probe may reach another worker). Per round and server: one client sends cold
ensembles to `/classify` (`--labels` x `--templates` prompts, labels no round has sent before)
one after another while another sends one new prompt at a time to `/embed_texts` (50 ms apart),
for `--seconds`; the one-prompt requests' p50, p95 and largest time, and each ensemble's time.
Then one more cold ensemble alone: its time. Both servers are up side by side for the whole run
and the rounds take turns (scripts/load_ab.py). Results: `--out` (JSON, every round) and the
medians to stdout.
"""

from __future__ import annotations

import asyncio
import base64
import statistics
import sys
import time

import httpx
import numpy as np
from load_ab import ab_parser, alternating_rounds, settings_of, written

from tests.hard_images import photo
from tests.helpers import encode

PROBE_PAUSE_S = 0.05


def ensemble_body(image: str, tag: str, labels: int, templates: int) -> dict:
    return {
        "images": [image],
        "labels": [f"{tag} thing {index}" for index in range(labels)],
        "templates": [f"a photo {index} of a {{}}." for index in range(templates)],
    }


async def posted_s(client: httpx.AsyncClient, url: str, body: dict) -> float:
    """Seconds to answer `body`; anything but a 200 stops the run."""
    start = time.perf_counter()
    response = await client.post(url, json=body)
    response.raise_for_status()
    return time.perf_counter() - start


async def text_beside_ensembles(
    url: str, image: str, tag: str, size: tuple[int, int], seconds: float
) -> dict:
    stop = time.perf_counter() + seconds
    probes: list[float] = []
    ensembles: list[float] = []

    async def ensemble_loop(client: httpx.AsyncClient) -> None:
        while time.perf_counter() < stop:
            body = ensemble_body(image, f"{tag}e{len(ensembles)}", *size)
            ensembles.append(await posted_s(client, f"{url}/classify", body))

    async def probe_loop(client: httpx.AsyncClient) -> None:
        await asyncio.sleep(0.5)  # the first ensemble under way
        while time.perf_counter() < stop:
            body = {"texts": [f"{tag} probe {len(probes)}"]}
            probes.append(await posted_s(client, f"{url}/embed_texts", body))
            await asyncio.sleep(PROBE_PAUSE_S)

    # One connection each, so the probe never queues behind the ensemble's connection.
    async with httpx.AsyncClient(timeout=600) as first, httpx.AsyncClient(timeout=600) as second:
        await asyncio.gather(ensemble_loop(first), probe_loop(second))
        alone = await posted_s(first, f"{url}/classify", ensemble_body(image, f"{tag}a", *size))
    waits = np.array(probes) * 1000
    return {
        "probes": len(probes),
        "probe_p50_ms": round(float(np.percentile(waits, 50)), 1),
        "probe_p95_ms": round(float(np.percentile(waits, 95)), 1),
        "probe_max_ms": round(float(waits.max()), 1),
        "ensembles_beside_s": [round(taken, 2) for taken in ensembles],
        "ensemble_alone_s": round(alone, 2),
    }


def medians(rounds: list[dict]) -> dict:
    return {
        name: statistics.median(row[name] for row in rounds)
        for name in ("probe_p50_ms", "probe_p95_ms", "ensemble_alone_s")
    }


def main() -> int:
    parser = ab_parser(__doc__, rounds=2, out_name="text-wait-ab.json")
    parser.add_argument("--seconds", type=float, default=60, help="each round's mixed load")
    parser.add_argument("--labels", type=int, default=100)
    parser.add_argument("--templates", type=int, default=20)
    parser.add_argument("--tiny", action="store_true", help="the tiny model instead of ViT-B/32")
    args = parser.parse_args()
    settings = settings_of(args)
    image = base64.b64encode(encode(photo(64, 64, seed=0), "JPEG")).decode()

    def run_round(url: str, _pid: int, index: int) -> dict:
        # Labels no round has sent (each server starts with empty caches), and short: a text
        # pass costs by its longest prompt, and an ensemble's prompts are short.
        tag = f"r{index}"
        size = (args.labels, args.templates)
        return asyncio.run(text_beside_ensembles(url, image, tag, size, args.seconds))

    rounds = alternating_rounds(args.baseline_rev, args.rounds, not args.tiny, settings, run_round)
    return written(
        args,
        {
            "model": "random-weight tiny CLIP" if args.tiny else "random-weight ViT-B/32",
            "ensemble": f"{args.labels} labels x {args.templates} templates",
            "settings": settings,
            "seconds_per_round": args.seconds,
            "medians": {name: medians(runs) for name, runs in rounds.items()},
            "rounds": rounds,
        },
    )


if __name__ == "__main__":
    sys.exit(main())
