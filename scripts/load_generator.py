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

BODIES_PICKLE holds (bodies, references): where references is a list (one `/invocations`
answer per body, the server's answer to it at rest; None for a body not checked), every 200
answer is compared with its body's (`top_probability_change`), and the JSON line also says how
many were checked, the largest change and how many changed an image's `classification`: an
answer that a race under load (pinned buffers, queued copies, graph replays) corrupted still
comes back 200, and only its numbers show it.

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
from dataclasses import asdict, dataclass

import aiohttp

# What a change of shape counts as: probabilities lie in [0, 1].
WHOLLY_CHANGED = 1.0


def top_probability_change(answer: object, reference: list[dict]) -> float:
    """The largest change of any image's top-k probabilities between an `/invocations` answer
    of the seed's shape and the reference answer to the same request. Each image's
    probabilities are compared in the order the answers sort them (descending), so two prompts
    that nearly tie and swap places move nothing; an answer of another shape is
    WHOLLY_CHANGED."""
    if not isinstance(answer, list) or len(answer) != len(reference):
        return WHOLLY_CHANGED
    change = 0.0
    for got, expected in zip(answer, reference, strict=True):
        try:
            pairs = zip(got["prompts"][2], expected["prompts"][2], strict=True)
            change = max([change, *(abs(a - b) for a, b in pairs)])
        except (KeyError, IndexError, TypeError, ValueError):  # ValueError: lengths differ
            return WHOLLY_CHANGED
    return change


def classification_changes(answer: object, reference: list[dict]) -> int:
    """How many images' `classification` differs from the reference answer's (every image
    where the shapes differ)."""
    if not isinstance(answer, list) or len(answer) != len(reference):
        return len(reference)
    pairs = zip(answer, reference, strict=True)
    return sum(
        not isinstance(got, dict) or got.get("classification") != expected["classification"]
        for got, expected in pairs
    )


@dataclass
class AnswerCheck:
    """The 200 answers compared with their references: how many, the largest change of a
    top-k probability, and the images whose classification changed."""

    answers_checked: int = 0
    largest_probability_change: float = 0.0
    classification_changes: int = 0

    def add(self, data: bytes, reference: list[dict]) -> None:
        try:
            answer = json.loads(data)
        except ValueError:
            answer = None
        self.answers_checked += 1
        change = top_probability_change(answer, reference)
        self.largest_probability_change = max(self.largest_probability_change, change)
        self.classification_changes += classification_changes(answer, reference)


async def closed_loop(
    url: str,
    route: str,
    bodies: list[bytes],
    concurrency: int,
    seconds: float,
    offset: int,
    stride: int,
    references: list[list[dict] | None] | None = None,
) -> tuple[list[float], int, AnswerCheck]:
    """`concurrency` clients sending back to back for `seconds`: (the latencies of the 200
    answers, how many answers were not 200, the check of the answers whose body has a
    reference)."""
    latencies: list[float] = []
    errors = 0
    check = AnswerCheck()
    deadline = time.monotonic() + seconds

    async def client(session: aiohttp.ClientSession, index: int) -> None:
        nonlocal errors
        while time.monotonic() < deadline:
            started = time.monotonic()
            position = index % len(bodies)
            body = bodies[position]
            reference = references[position] if references else None
            index += stride
            async with session.post(
                route, data=body, headers={"Content-Type": "application/json"}
            ) as response:
                data = await response.read()
            if response.status != 200:  # an error is no answer: neither in rates nor latencies
                errors += 1
                continue
            latencies.append(time.monotonic() - started)
            if reference is not None:
                check.add(data, reference)

    async with aiohttp.ClientSession(
        base_url=url,
        connector=aiohttp.TCPConnector(limit=concurrency + 4),
        timeout=aiohttp.ClientTimeout(total=120),
    ) as session:
        await asyncio.gather(*(client(session, offset + i) for i in range(concurrency)))
    return latencies, errors, check


def main(argv: list[str]) -> int:
    url, route, bodies_path, concurrency, seconds, offset, stride, cpus = argv
    os.sched_setaffinity(0, {int(cpu) for cpu in cpus.split(",")})
    with open(bodies_path, "rb") as file:
        bodies, references = pickle.load(file)  # written by bench.py for this run
    print("ready", flush=True)
    sys.stdin.readline()  # the go: every load process is ready
    cpu_before = time.process_time()
    latencies, errors, check = asyncio.run(
        closed_loop(
            url,
            route,
            bodies,
            int(concurrency),
            float(seconds),
            int(offset),
            int(stride),
            references,
        )
    )
    outcome = {
        "latencies": latencies,
        "errors": errors,
        "cpu_s": time.process_time() - cpu_before,
        "ended": time.monotonic(),
    }
    if references is not None:
        outcome |= asdict(check)
    print(json.dumps(outcome), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
