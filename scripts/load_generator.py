"""One closed-loop load-generator process for scripts/bench.py's GPU runs (`drive_parallel`).

    python scripts/load_generator.py URL ROUTE BODIES_PICKLE CONCURRENCY SECONDS OFFSET STRIDE CPUS

A process of its own per client core, so the load generator is not the limit at GPU rates, and
a script of its own that imports only aiohttp: started as a child of bench.py through
multiprocessing, each one imported bench.py (torch included) twice a scenario, seconds of a
device lent for minutes. It pins itself to CPUS (comma-separated), loads the bodies, prints
`ready`, waits for a line on stdin, then runs CONCURRENCY clients for SECONDS, each sending its
next body on an answer, and prints one JSON line: latencies (s), errors (non-200 answers), its
CPU seconds, and when it ended (`time.monotonic`, one clock for every process on Linux, so the
parent times the window).

Client i of this process sends bodies OFFSET + i, then every STRIDE-th after it. With OFFSET the
clients before this process's and STRIDE all processes' clients together, no two clients of a
run send the same body until the list wraps: the uncached-prompt scenario must not hit the
text cache because four processes stepped through the same bodies.
"""

from __future__ import annotations

import asyncio
import json
import os
import pickle
import sys
import time

import aiohttp


async def closed_loop(
    url: str,
    route: str,
    bodies: list[bytes],
    concurrency: int,
    seconds: float,
    offset: int,
    stride: int,
) -> tuple[list[float], int]:
    """`concurrency` clients sending back to back for `seconds`: (latencies, errors)."""
    latencies: list[float] = []
    errors = 0
    deadline = time.monotonic() + seconds

    async def client(session: aiohttp.ClientSession, index: int) -> None:
        nonlocal errors
        while time.monotonic() < deadline:
            started = time.monotonic()
            body = bodies[index % len(bodies)]
            index += stride
            async with session.post(
                route, data=body, headers={"Content-Type": "application/json"}
            ) as response:
                await response.read()
            latencies.append(time.monotonic() - started)
            errors += response.status != 200

    async with aiohttp.ClientSession(
        base_url=url,
        connector=aiohttp.TCPConnector(limit=concurrency + 4),
        timeout=aiohttp.ClientTimeout(total=120),
    ) as session:
        await asyncio.gather(*(client(session, offset + i) for i in range(concurrency)))
    return latencies, errors


def main(argv: list[str]) -> int:
    url, route, bodies_path, concurrency, seconds, offset, stride, cpus = argv
    os.sched_setaffinity(0, {int(cpu) for cpu in cpus.split(",")})
    with open(bodies_path, "rb") as file:
        bodies = pickle.load(file)  # written by bench.py for this run
    print("ready", flush=True)
    sys.stdin.readline()  # the go: every load process is ready
    cpu_before = time.process_time()
    latencies, errors = asyncio.run(
        closed_loop(url, route, bodies, int(concurrency), float(seconds), int(offset), int(stride))
    )
    outcome = {
        "latencies": latencies,
        "errors": errors,
        "cpu_s": time.process_time() - cpu_before,
        "ended": time.monotonic(),
    }
    print(json.dumps(outcome), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
