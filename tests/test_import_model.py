"""The import CLI as a user runs it: a real subprocess against a temporary model store."""

from __future__ import annotations

import os
import subprocess
import sys

from tests.helpers import REPO_ROOT


def run_import(tmp_path, *args: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "scripts/import_model.py", *args],
        cwd=REPO_ROOT,
        env={**os.environ, "BENTOML_HOME": str(tmp_path), **env},
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_tiny_import_then_if_missing_skips(tmp_path):
    first = run_import(tmp_path, "--tiny")
    assert first.returncode == 0, first.stderr
    assert "saved clip:" in first.stdout and "random:tiny" in first.stdout
    assert len(list((tmp_path / "models" / "clip").iterdir())) >= 1
    again = run_import(tmp_path, "--tiny", "--if-missing")
    assert again.returncode == 0 and "nothing to import" in again.stdout


def test_offline_hub_import_fails_with_a_short_message(tmp_path):
    result = run_import(
        tmp_path, "--hub-id", "openai/clip-vit-base-patch32", HF_ENDPOINT="http://127.0.0.1:9"
    )
    assert result.returncode == 2
    assert "--tiny" in result.stderr and "--from-dir" in result.stderr
    assert "Traceback" not in result.stderr


def test_missing_directory_fails_cleanly(tmp_path):
    result = run_import(tmp_path, "--from-dir", str(tmp_path / "nope"))
    assert result.returncode == 2 and "no config.json" in result.stderr
