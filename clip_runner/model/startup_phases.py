"""How long each step of a runner worker's start took, for one log line.

Why: on an H200 a server took about 45 s to answer `/ping` (BENCHMARKS.md, GPU), on 12 cores
and on 4 alike, against about 8 s on two CPU cores here, and its log said nothing of where the
time went. That start is paid by every scale-out and every restart after a broken CUDA context,
and it is most of each stage of `scripts/gpu_bench.sh`, whose device time is scarce. The runner
now logs its steps (imports, reading the model, placing it on the device, warm-up, CUDA graphs)
and the time its process spent before them (BentoML's worker start and `import service`), and
the GPU report reads that line from each server's log.
"""

from __future__ import annotations

import os
import re
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

# The log line's fixed start: scripts/bench.py finds it in each server's log.
STARTUP_LINE_PREFIX = "start-up:"
# Its total ("since the process began" or "since its first step"); the steps follow in
# parentheses, "name seconds" each, separated by commas (and the time before them by ";").
_TOTAL = re.compile(r"start-up: (\d+\.\d) s since")


def seconds_since_process_start(proc: Path = Path("/proc")) -> float | None:
    """Seconds since this process began, from Linux's /proc (its start in clock ticks since
    boot against the uptime); None where /proc does not say (another OS)."""
    try:
        uptime = float((proc / "uptime").read_text().split()[0])
        stat = (proc / "self" / "stat").read_text()
        # Field 22 (starttime), counted after the command name, which may hold spaces.
        started_ticks = int(stat.rsplit(")", 1)[1].split()[19])
    except (OSError, ValueError, IndexError):
        return None
    return max(0.0, uptime - started_ticks / os.sysconf("SC_CLK_TCK"))


class StartupPhases:
    """Named steps, each timed by `phase`, and the line that reports them."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self.before = seconds_since_process_start()  # what the process did before the first step
        self._started = clock()
        self.steps: list[tuple[str, float]] = []

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        started = self._clock()
        try:
            yield
        finally:
            self.steps.append((name, self._clock() - started))

    def line(self) -> str:
        """`start-up: 12.3 s since the process began (before the runner: 2.1; imports 5.0, ...)`;
        without /proc, the time since the first step began and no "before"."""
        since_first = self._clock() - self._started
        steps = ", ".join(f"{name} {seconds:.1f}" for name, seconds in self.steps)
        if self.before is None:
            return f"{STARTUP_LINE_PREFIX} {since_first:.1f} s since its first step ({steps})"
        total = self.before + since_first
        return (
            f"{STARTUP_LINE_PREFIX} {total:.1f} s since the process began (before the runner: "
            f"{self.before:.1f}; {steps})"
        )


def startup_seconds(line: str) -> dict[str, float]:
    """A start-up line's figures back, for the benchmarks that compare starts
    (scripts/startup_bench.py): `{"total": 5.9, "before the runner": 1.9, "model read": 0.1,
    ...}`; empty for a line without them."""
    total = _TOTAL.search(line)
    if total is None:
        return {}
    figures = {"total": float(total.group(1))}
    inside = line[line.index("(", total.end()) + 1 : line.rindex(")")]
    for item in filter(None, (part.strip() for part in re.split("[;,]", inside))):
        name, _, seconds = item.rpartition(" ")
        figures[name.removesuffix(":")] = float(seconds)
    return figures
