"""Where a server's processes hold the GIL under load: py-spy samples, summarised per role.

Why: on the first H200 run the server used 3.5 of its 12 cores at 64 clients, so something in
it was serial, and a process can only run Python on one core at a time, whatever its threads.
The share of time a process holds its GIL says whether that process is the limit (near 1.0 it
is), and the functions holding it say what to cut. py-spy samples another process from outside
(`--nonblocking`: without pausing it) and `--gil` keeps only the samples where a thread holds
the GIL, so a process's samples over (rate x seconds) is the share of the window its GIL was
held: a process spinning in Python gives 1.0, one in Python half of the time 0.5 (checked so).

py-spy is a development tool, not the service's: where it is missing, or may not read other
processes (ptrace), the caller records why and measures on.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections import Counter, defaultdict
from pathlib import Path

SAMPLES_PER_S = 100
# Functions listed per role, by the share of that role's GIL samples.
TOP_FUNCTIONS = 12
# Where the project's own code is, in py-spy's frames ("name (path:line)", each path from its
# package on: BentoML's worker module shows as "_bentoml_impl/worker/service.py").
OWN_CODE = ("clip_runner/", "service.py:")


def py_spy() -> str:
    """py-spy beside this Python (a venv's bin) or on PATH; FileNotFoundError if neither."""
    beside = Path(sys.executable).with_name("py-spy")
    found = str(beside) if beside.exists() else shutil.which("py-spy")
    if found is None:
        raise FileNotFoundError("py-spy is not installed (pip install py-spy)")
    return found


def whole_seconds(seconds: float) -> int:
    """py-spy records whole seconds: its window, and so the shares' denominator."""
    return max(1, round(seconds))


def start(pid: int, seconds: float, output: Path, cpus: set[int]) -> subprocess.Popen:
    """py-spy recording `pid` and its children for `seconds`, GIL holders only, raw stacks to
    `output`; on `cpus` (the load generator's), so the sampling takes no core from the server."""
    command = [py_spy(), "record", "--gil", "--nonblocking", "--subprocesses"]
    command += ["--rate", str(SAMPLES_PER_S), "--duration", str(whole_seconds(seconds))]
    command += ["--format", "raw", "--output", str(output), "--pid", str(pid)]
    return subprocess.Popen(
        command,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        preexec_fn=lambda: os.sched_setaffinity(0, cpus),
    )


def finish(spy: subprocess.Popen, output: Path, seconds: float, roles: dict[int, str]) -> dict:
    """Waits for `spy` and summarises what it wrote (`roles`: each server process's role, by
    pid); RuntimeError with py-spy's own words where it wrote nothing (no permission to read
    the server's memory, a Python it does not know)."""
    try:
        said = spy.communicate(timeout=seconds + 60)[0]
    except subprocess.TimeoutExpired:
        spy.kill()
        spy.wait()
        raise RuntimeError(f"py-spy did not end within {seconds + 60:.0f} s") from None
    if spy.returncode != 0 or not output.exists():
        raise RuntimeError(f"py-spy failed (exit {spy.returncode}): {said.strip()[-1000:]}")
    return summary(output.read_text(), whole_seconds(seconds), roles)


def _pid_of(frames: list[str]) -> int:
    """The pid of the innermost "process PID:"command line"" frame of a stack."""
    label = [frame for frame in frames if frame.startswith("process ")][-1]
    return int(label.removeprefix("process ").partition(":")[0])


def _function(frame: str) -> str:
    """ "name (path:line)" -> "name (path)": a function's lines counted together."""
    name, _, where = frame.partition(" (")
    return f"{name} ({where.rsplit(':', 1)[0]})" if where else name


def _is_own(frame: str) -> bool:
    return frame.partition(" (")[2].startswith(OWN_CODE)


def summary(raw: str, seconds: int, roles: dict[int, str], rate: int = SAMPLES_PER_S) -> dict:
    """py-spy's raw output (one "frame;frame;... count" line per distinct stack) -> per role:
    each process's share of the window its GIL was held, and the functions holding it, as
    shares of the role's GIL samples: `self`, the innermost frame (often a library's), and
    `own_code`, the innermost of the project's own frames (the code that called it: what to
    change). A process missing from `roles` (restarted meanwhile) counts as "exited"."""
    by_process: Counter[int] = Counter()
    sampled: dict[int, str] = {}  # each sampled process's role
    leaves: dict[str, Counter[str]] = defaultdict(Counter)
    own: dict[str, Counter[str]] = defaultdict(Counter)
    for line in raw.splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack:
            continue
        frames = stack.split(";")
        pid = _pid_of(frames)
        role = sampled.setdefault(pid, roles.get(pid, "exited"))
        samples = int(count)
        by_process[pid] += samples
        python = [frame for frame in frames if not frame.startswith("process ")]
        if python:
            leaves[role][_function(python[-1])] += samples
        innermost_own = [frame for frame in python if _is_own(frame)][-1:]
        for frame in innermost_own:
            own[role][_function(frame)] += samples
    result = {}
    for role in sorted(set(sampled.values())):
        pids = sorted(pid for pid, named in sampled.items() if named == role)
        total = sum(by_process[pid] for pid in pids)
        shares = [round(by_process[pid] / (rate * seconds), 3) for pid in pids]
        result[role] = {
            "processes": len(pids),
            "gil_held_share": shares,
            "self": _shares(leaves[role], total),
            "own_code": _shares(own[role], total),
        }
    return result


def _shares(counts: Counter[str], total: int) -> dict[str, float]:
    return {name: round(n / total, 3) for name, n in counts.most_common(TOP_FUNCTIONS) if total}
