"""Start-up of `bentoml serve`: this checkout against another commit's, taking turns.

    python scripts/startup_bench.py --baseline-rev 8c0006b --rounds 6

The other commit is checked out into a temporary git worktree and served from there with this
venv. Each round starts each server once (in alternating order) on the same tiny model and
measures: seconds from the command until `/ping` answers 200 (the model loaded and warmed, each
API worker's probe answered), seconds of the first seed request after that, each process's
memory (RSS) once ready, by role: the supervisor, the runner, the API workers (their mean), and
the steps of the runner's start from its start-up line (model/startup_phases.py). It also
records which processes have torch loaded. Results: `--out` (JSON), and a table to stdout.
Start-up depends on the disk cache: the first round of each is a warm-up and is left out.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import psutil
from bench import (
    REPO,
    bento_server,
    import_random_model,
    process_role,
    seed_request_bodies,
    tree,
)

from clip_runner.model.startup_phases import STARTUP_LINE_PREFIX, startup_seconds


def serve_once(home: Path, tag: str, checkout: Path, log: Path) -> dict:
    """One start of the server in `checkout`: its timings, memory and torch use."""
    started = time.monotonic()
    with bento_server(home, tag, log, checkout=checkout) as (url, pid):
        ready_s = time.monotonic() - started
        asked = time.monotonic()
        answer = httpx.post(
            f"{url}/invocations",
            content=seed_request_bodies()[0],
            headers={"Content-Type": "application/json"},
            timeout=60,
        )
        answer.raise_for_status()
        first_answer_s = time.monotonic() - asked
        memory: dict[str, list[float]] = {}
        torch_loaded: dict[str, list[bool]] = {}
        for process in tree(pid):
            role = process_role(process, pid)
            memory.setdefault(role, []).append(process.memory_info().rss / 2**20)
            mapped = any("libtorch" in region.path for region in process.memory_maps())
            torch_loaded.setdefault(role, []).append(mapped)
    runner_lines = [
        line for line in log.read_text().splitlines() if f"runner {STARTUP_LINE_PREFIX}" in line
    ]
    return {
        "ready_s": round(ready_s, 2),
        "first_answer_s": round(first_answer_s, 3),
        "rss_mb": {role: round(statistics.mean(sizes)) for role, sizes in memory.items()},
        "runner_start_up_s": startup_seconds(runner_lines[0]) if runner_lines else {},
        "torch_loaded": torch_loaded,
    }


def worktree(rev: str, parent: Path) -> Path:
    path = parent / f"baseline-{rev}"
    subprocess.run(
        ["git", "-C", str(REPO), "worktree", "add", "--detach", str(path), rev],
        check=True,
        capture_output=True,
    )
    return path


def medians(runs: list[dict]) -> dict:
    roles = sorted({role for run in runs for role in run["rss_mb"]})
    return {
        "ready_s": statistics.median(run["ready_s"] for run in runs),
        "ready_s_range": [min(run["ready_s"] for run in runs), max(run["ready_s"] for run in runs)],
        "first_answer_s": statistics.median(run["first_answer_s"] for run in runs),
        "rss_mb": {
            role: statistics.median(run["rss_mb"][role] for run in runs if role in run["rss_mb"])
            for role in roles
        },
        "runner_start_up_s": {
            step: statistics.median(run["runner_start_up_s"][step] for run in runs)
            for step in runs[-1]["runner_start_up_s"]
            if all(step in run["runner_start_up_s"] for run in runs)
        },
        "torch_loaded": runs[-1]["torch_loaded"],
    }


def table(result: dict) -> str:
    head = "| | baseline | this checkout | ratio |\n|---|---|---|---|\n"
    base, ours = result["baseline"], result["current"]
    rows = [("ready after (s, median)", base["ready_s"], ours["ready_s"])]
    rows.append(("first seed request (s)", base["first_answer_s"], ours["first_answer_s"]))
    for role in sorted(set(base["rss_mb"]) | set(ours["rss_mb"])):
        rows.append((f"RSS of the {role} (MB)", base["rss_mb"].get(role), ours["rss_mb"].get(role)))
    steps = dict.fromkeys([*base["runner_start_up_s"], *ours["runner_start_up_s"]])
    for step in steps:  # a step either side lacks (a new one) shows with one figure
        name = "since its process began" if step == "total" else step
        figures = (base["runner_start_up_s"].get(step), ours["runner_start_up_s"].get(step))
        rows.append((f"runner start-up: {name} (s, median)", *figures))
    lines = [
        f"| {name} | {b} | {o} | {o / b:.2f} |" if b and o else f"| {name} | {b} | {o} | |"
        for name, b, o in rows
    ]
    return head + "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--baseline-rev", required=True, help="the commit to compare against")
    parser.add_argument("--rounds", type=int, default=6, help="each server starts this often")
    parser.add_argument("--out", type=Path, default=Path(tempfile.gettempdir()) / "startup.json")
    args = parser.parse_args()
    home, tag, _ = import_random_model(tiny=True)
    scratch = Path(tempfile.mkdtemp(prefix="clip-startup-"))
    baseline = worktree(args.baseline_rev, scratch)
    runs: dict[str, list[dict]] = {"baseline": [], "current": []}
    try:
        for round_index in range(args.rounds):
            order = ["baseline", "current"] if round_index % 2 == 0 else ["current", "baseline"]
            for name in order:
                checkout = baseline if name == "baseline" else REPO
                run = serve_once(home, tag, checkout, scratch / f"{name}-{round_index}.log")
                print(name, round_index, json.dumps(run), flush=True)
                if round_index > 0:  # the first round warms the disk cache
                    runs[name].append(run)
    finally:
        subprocess.run(
            ["git", "-C", str(REPO), "worktree", "remove", "--force", str(baseline)], check=False
        )
    result = {
        "baseline_rev": args.baseline_rev,
        "rounds": args.rounds - 1,
        "cores": len(psutil.Process().cpu_affinity()),
        "baseline": medians(runs["baseline"]),
        "current": medians(runs["current"]),
        "runs": runs,
    }
    args.out.write_text(json.dumps(result, indent=1))
    print(table(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
