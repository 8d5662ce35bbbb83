"""The Makefile's venv, which both README commands start with: made again when an interrupted
run left it without pip or an older Python made it (every later run had reused it and failed
the same way, whatever PYTHON said), kept when it is sound, refused with one line naming the
Python needed."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from tests.helpers import REPO_ROOT


def make_venv(venv: Path, *variables: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["make", "--no-print-directory", "venv", f"VENV={venv}", f"PYTHON={sys.executable}"]
        + list(variables),
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )


def has_pip(venv: Path) -> bool:
    return subprocess.run([venv / "bin" / "python", "-c", "import pip"]).returncode == 0


def test_a_venv_without_pip_is_made_again_and_a_sound_one_kept(tmp_path):
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", venv], check=True)
    assert not has_pip(venv)
    made = make_venv(venv)
    assert made.returncode == 0, made.stderr
    assert has_pip(venv)
    (venv / "kept").touch()
    assert make_venv(venv).returncode == 0
    assert (venv / "kept").exists()


def test_a_python_older_than_the_one_needed_is_refused_in_one_line(tmp_path):
    venv = tmp_path / "venv"
    refused = make_venv(venv, "MIN_PYTHON=3.99")
    assert refused.returncode != 0
    version = ".".join(map(str, sys.version_info[:3]))
    assert refused.stderr.splitlines()[0] == (
        f"make: {sys.executable} is Python {version}; this project needs 3.99 or newer: run "
        "make with PYTHON=python3.99 (or a newer one)"
    )
    assert not venv.exists()
