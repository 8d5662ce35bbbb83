"""A bounded soak driver: mixed good and hostile requests at concurrency, on 127.0.0.1 only."""

from __future__ import annotations

import asyncio
import multiprocessing
import multiprocessing.synchronize
import random
import statistics
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

import httpx
import psutil


@dataclass(frozen=True)
class SoakRequest:
    content: bytes
    content_type: str
    check: Callable[[httpx.Response], bool]  # True when the answer is the right one
    good: bool


@dataclass
class SoakReport:
    requests: int = 0
    good_requests: int = 0
    bad_requests: int = 0
    wrong_answers: int = 0
    server_errors: int = 0
    statuses: Counter = field(default_factory=Counter)
    latencies_s: list[float] = field(default_factory=list)
    ping_latencies_s: list[float] = field(default_factory=list)
    ping_statuses: list[int] = field(default_factory=list)
    rss_before_mb: float = 0.0
    rss_after_mb: float = 0.0
    duration_s: float = 0.0

    def summary(self) -> dict:
        def pct(values: list[float], q: float) -> float:
            if len(values) < 2:
                return round(sum(values) * 1000, 1)
            return round(statistics.quantiles(values, n=100)[q - 1] * 1000, 1)

        return {
            "requests": self.requests,
            "good": self.good_requests,
            "bad": self.bad_requests,
            "wrong_answers": self.wrong_answers,
            "5xx": self.server_errors,
            "statuses": dict(sorted(self.statuses.items())),
            "p50_ms": pct(self.latencies_s, 50),
            "p99_ms": pct(self.latencies_s, 99),
            "ping_p50_ms": pct(self.ping_latencies_s, 50),
            "ping_p99_ms": pct(self.ping_latencies_s, 99),
            "ping_max_ms": round(max(self.ping_latencies_s, default=0) * 1000, 1),
            "pings_not_200": sum(status != 200 for status in self.ping_statuses),
            "rss_before_mb": round(self.rss_before_mb, 1),
            "rss_after_mb": round(self.rss_after_mb, 1),
            "rss_growth_mb": round(self.rss_after_mb - self.rss_before_mb, 1),
            "duration_s": round(self.duration_s, 1),
        }


def tree_rss_mb(pid: int) -> float:
    """Resident memory of a process and all its children (the API worker and the runner)."""
    root = psutil.Process(pid)
    processes = [root, *root.children(recursive=True)]
    return sum(p.memory_info().rss for p in processes if p.is_running()) / 2**20


def _ping_until(url: str, stop: multiprocessing.synchronize.Event, results: multiprocessing.Queue):
    """In its own process, so the load generator's busy event loop does not delay the pings."""
    latencies: list[float] = []
    statuses: list[int] = []
    with httpx.Client(timeout=5) as client:
        while not stop.is_set():
            started = time.monotonic()
            statuses.append(client.get(f"{url}/ping").status_code)
            latencies.append(time.monotonic() - started)
            time.sleep(0.1)
    results.put((latencies, statuses))


async def soak(
    url: str,
    server_pid: int,
    pool: list[SoakRequest],
    count: int,
    concurrency: int,
    warmup: int = 100,
    seed: int = 0,
) -> SoakReport:
    """Send `count` requests drawn from `pool` (after `warmup` unrecorded ones)."""
    rng = random.Random(seed)
    report = SoakReport()
    queue: asyncio.Queue[SoakRequest | None] = asyncio.Queue()

    async def worker(client: httpx.AsyncClient, record: bool) -> None:
        while (item := await queue.get()) is not None:
            started = time.monotonic()
            response = await client.post(
                "/invocations", content=item.content, headers={"Content-Type": item.content_type}
            )
            if not record:
                continue
            report.latencies_s.append(time.monotonic() - started)
            report.requests += 1
            report.statuses[response.status_code] += 1
            report.good_requests += item.good
            report.bad_requests += not item.good
            report.server_errors += response.status_code >= 500
            report.wrong_answers += not item.check(response)

    async def run(n: int, record: bool) -> None:
        for _ in range(n):
            queue.put_nowait(rng.choice(pool))
        for _ in range(concurrency):
            queue.put_nowait(None)
        async with httpx.AsyncClient(base_url=url, timeout=60) as client:
            await asyncio.gather(*(worker(client, record) for _ in range(concurrency)))

    await run(warmup, record=False)
    report.rss_before_mb = tree_rss_mb(server_pid)
    context = multiprocessing.get_context("spawn")
    stop, results = context.Event(), context.Queue()
    pinger = context.Process(target=_ping_until, args=(url, stop, results), daemon=True)
    pinger.start()
    started = time.monotonic()
    await run(count, record=True)
    report.duration_s = time.monotonic() - started
    stop.set()
    report.ping_latencies_s, report.ping_statuses = results.get(timeout=30)
    pinger.join(10)
    report.rss_after_mb = tree_rss_mb(server_pid)
    return report
