"""Slow uploads against a running server: are good requests still answered, and how fast?

    python scripts/slow_uploads.py                       # against `make serve` on 127.0.0.1:8080
    python scripts/slow_uploads.py --url http://127.0.0.1:3000 --slow 200 --phase-s 20
    python scripts/slow_uploads.py --stall headers      # slowloris: the headers trickle

The attack of issue 15: connections that send their headers with `Content-Length: 100000` and
then one byte every `--interval-s` seconds; each one that the server answers (408 at its body
deadline) is reopened at once, so `--slow` of them are open all the time. With `--stall
headers` they trickle a header instead, which never ends (408 at the header deadline); with
`--stall nothing` they send nothing at all (closed at the header deadline). Phases take turns:
good requests alone, then the same good load with the slow uploads open, `--rounds` times. The
good load is `--clients` concurrent clients sending the seed's request (two small base64 JPEGs,
the seed's six classes); the slow uploads run in a separate process. Reported per phase: good
requests' statuses and latency p50/p95, and for the attack, how many slow connections were open
(min/max while measuring), how they ended (statuses) and after how long; then the p95 of all
good requests of each kind of phase, and their ratio. Only loopback addresses are accepted;
everything is bounded by `--phase-s` and `--rounds`. Prints one JSON document; the README's
reliability table quotes it.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import json
import multiprocessing as mp
import os
import statistics
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import httpx
import numpy as np
from PIL import Image

from clip_runner.web.schemas import SEED_CLASSES

LOOPBACK = {"127.0.0.1", "localhost", "::1"}


def small_jpeg(seed: int, size: int = 320) -> str:
    """A noisy gradient as base64 JPEG: a stand-in for a photo, small enough to be cheap."""
    rng = np.random.default_rng(seed)
    ramp = np.linspace(0, 255, size, dtype=np.float32)
    pixels = ramp[None, :, None] * rng.uniform(0.3, 1, 3) + rng.normal(0, 20, (size, size, 3))
    buffer = io.BytesIO()
    Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(buffer, "JPEG", quality=85)
    return base64.b64encode(buffer.getvalue()).decode()


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else float("nan")


@dataclass(frozen=True)
class Stall:
    """What a slow request sends at once, and the byte it then trickles."""

    opening: bytes
    trickle: bytes


def stalled_request(kind: str, host: str, declared: int, auth: dict[str, str]) -> Stall:
    """`body`: whole headers declaring `declared` bytes of JSON body, then the body trickled.
    `headers`: the request line and some headers, then a header value trickled (no end).
    `nothing`: a connection that sends no byte at all."""
    head = (
        f"POST /invocations HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {declared}\r\n"
        + "".join(f"{name}: {value}\r\n" for name, value in auth.items())
    ).encode()
    if kind == "headers":
        return Stall(head + b"X-Slow: ", b"a")
    if kind == "nothing":
        return Stall(b"", b"")
    return Stall(head + b"\r\n{", b" ")


@dataclass
class SlowStats:
    open_now: int = 0
    opened: int = 0
    endings: Counter = field(default_factory=Counter)
    lifetimes_s: list[float] = field(default_factory=list)


async def slow_upload(
    host: str, port: int, stall: Stall, interval_s: float, stats: SlowStats, stop: asyncio.Event
) -> None:
    """Keep one slow request open: send its opening, trickle a byte per interval; reopen when
    the server answers."""
    loop = asyncio.get_running_loop()
    stopped = asyncio.ensure_future(stop.wait())
    while not stop.is_set():
        reader, writer = await asyncio.open_connection(host, port)
        started = loop.time()
        stats.open_now += 1
        stats.opened += 1
        try:
            writer.write(stall.opening)
            answer = asyncio.ensure_future(reader.read(4096))
            while not answer.done() and not stop.is_set():
                await asyncio.wait(
                    {answer, stopped}, timeout=interval_s, return_when=asyncio.FIRST_COMPLETED
                )
                if not answer.done() and not stop.is_set():
                    writer.write(stall.trickle)
            if answer.done():
                first = answer.result().split(b"\r\n", 1)[0].decode("latin-1")
                status = first.split(" ")[1] if first.startswith("HTTP/") else "closed"
                stats.endings[status] += 1
                stats.lifetimes_s.append(loop.time() - started)
            else:
                answer.cancel()
        except OSError as error:
            stats.endings[type(error).__name__] += 1
        finally:
            stats.open_now -= 1
            writer.close()
    stopped.cancel()


async def good_load(
    client: httpx.AsyncClient, body: dict, clients: int, duration_s: float
) -> tuple[Counter, list[float]]:
    """`clients` concurrent clients sending `body` to /invocations for `duration_s`."""
    statuses: Counter = Counter()
    latencies: list[float] = []
    deadline = time.monotonic() + duration_s

    async def one_client() -> None:
        while time.monotonic() < deadline:
            started = time.monotonic()
            try:
                response = await client.post("/invocations", json=body)
                statuses[str(response.status_code)] += 1
                if response.status_code == 200:
                    latencies.append(time.monotonic() - started)
            except httpx.HTTPError as error:
                statuses[type(error).__name__] += 1

    await asyncio.gather(*(one_client() for _ in range(clients)))
    return statuses, latencies


def attack(
    host: str, port: int, stall: Stall, args: argparse.Namespace, ready: Any, stop: Any, out: Any
) -> None:
    """The slow uploads, in a process of their own (so the good clients' timings are not the
    attacker's event loop): open them, say `ready`, sample how many are open until `stop`."""

    async def go() -> dict:
        stats, stopping, samples = SlowStats(), asyncio.Event(), []
        uploads = [
            asyncio.ensure_future(slow_upload(host, port, stall, args.interval_s, stats, stopping))
            for _ in range(args.slow)
        ]
        while stats.opened < args.slow:
            await asyncio.sleep(0.05)
        await asyncio.sleep(1)  # the server has read every header by now
        ready.set()
        while not stop.is_set():
            samples.append(stats.open_now)
            await asyncio.sleep(0.25)
        stopping.set()
        await asyncio.gather(*uploads)
        lifetimes = stats.lifetimes_s  # empty where the server answered none of them
        return {
            "slow_open_min": min(samples),
            "slow_open_max": max(samples),
            "slow_connections_opened": stats.opened,
            "slow_endings": dict(stats.endings),
            "slow_answered_after_s_median": (
                round(statistics.median(lifetimes), 2) if lifetimes else None
            ),
            "slow_answered_after_s_max": round(max(lifetimes), 2) if lifetimes else None,
        }

    out.put(asyncio.run(go()))


async def run(args: argparse.Namespace) -> dict:
    parts = urlsplit(args.url)
    if parts.hostname not in LOOPBACK:
        raise SystemExit(f"only loopback servers are measured here, not {parts.hostname}")
    host, port = parts.hostname, parts.port or 80
    auth = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    stall = stalled_request(args.stall, host, args.declared, auth)
    body = {"images": [small_jpeg(1), small_jpeg(2)], "classes": SEED_CLASSES}
    phases = []
    pooled: dict[bool, list[float]] = {False: [], True: []}
    limits = httpx.Limits(max_connections=args.clients)
    async with httpx.AsyncClient(
        base_url=args.url, headers=auth, timeout=60, limits=limits
    ) as client:
        warm = await client.post("/invocations", json=body)
        if warm.status_code != 200:
            raise SystemExit(f"the good request is answered {warm.status_code}: {warm.text}")
        await good_load(client, body, args.clients, 3)  # warm-up, not reported
        for round_index in range(args.rounds):
            for attacked in (False, True):
                if attacked:
                    ready, stop, out = mp.Event(), mp.Event(), mp.Queue()
                    attacker = mp.Process(
                        target=attack, args=(host, port, stall, args, ready, stop, out)
                    )
                    attacker.start()
                    while not ready.is_set():
                        await asyncio.sleep(0.05)
                statuses, latencies = await good_load(client, body, args.clients, args.phase_s)
                pooled[attacked] += latencies
                phase = {
                    "round": round_index + 1,
                    "slow_uploads": args.slow if attacked else 0,
                    "good_requests": sum(statuses.values()),
                    "good_statuses": dict(statuses),
                    "good_p50_ms": round(percentile(latencies, 50) * 1000, 1),
                    "good_p95_ms": round(percentile(latencies, 95) * 1000, 1),
                }
                if attacked:
                    stop.set()
                    phase |= await asyncio.to_thread(out.get, True, 60)
                    attacker.join(10)
                phases.append(phase)
                print(json.dumps(phase), file=sys.stderr)
    alone_p95, attacked_p95 = (percentile(pooled[key], 95) * 1000 for key in (False, True))
    return {
        "url": args.url,
        "settings": {
            key: getattr(args, key)
            for key in ("stall", "slow", "declared", "interval_s", "clients", "phase_s", "rounds")
        },
        "phases": phases,
        "good_p95_ms_alone": round(alone_p95, 1),
        "good_p95_ms_with_slow_uploads": round(attacked_p95, 1),
        "p95_ratio": round(attacked_p95 / alone_p95, 3),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", default="http://127.0.0.1:8080", help="a loopback server")
    parser.add_argument(
        "--stall",
        choices=("body", "headers", "nothing"),
        default="body",
        help="what the attack trickles",
    )
    parser.add_argument("--slow", type=int, default=200, help="slow requests kept open")
    parser.add_argument("--declared", type=int, default=100_000, help="their Content-Length")
    parser.add_argument("--interval-s", type=float, default=5.0, help="one byte per this")
    parser.add_argument("--clients", type=int, default=4, help="concurrent good clients")
    parser.add_argument("--phase-s", type=float, default=20.0, help="length of each phase")
    parser.add_argument("--rounds", type=int, default=2, help="alone/attacked phase pairs")
    parser.add_argument(
        "--api-key", default=os.environ.get("CLIP_API_KEY"), help="default: $CLIP_API_KEY"
    )
    print(json.dumps(asyncio.run(run(parser.parse_args(argv))), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
