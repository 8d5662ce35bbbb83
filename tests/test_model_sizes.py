"""scripts/model_sizes.py's command line (its measurements are a benchmark, not a test)."""

from __future__ import annotations

import subprocess
import sys

from tests.helpers import REPO_ROOT

SCRIPT = REPO_ROOT / "scripts" / "model_sizes.py"


def run(*arguments: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(SCRIPT), *arguments], capture_output=True, text=True, timeout=120
    )


def test_help_and_an_unknown_architecture_are_answered_without_a_traceback():
    """`--help` had been taken for an architecture's name: a KeyError in the child, then a
    CalledProcessError, as any mistyped name."""
    helped = run("--help")
    assert helped.returncode == 0 and "usage: model_sizes.py" in helped.stdout
    assert "vit-b32" in helped.stdout
    refused = run("vit-x")
    assert refused.returncode == 2 and "Traceback" not in refused.stderr
    assert "unknown architecture vit-x: any of tiny, vit-b32" in refused.stderr
