"""The shell scripts in scripts/ answer --help with their header and run nothing: without it,
`bash scripts/container_test.sh --help` began the real run (installing and starting a Docker
engine as root)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from tests.helpers import REPO_ROOT

SCRIPTS = sorted((REPO_ROOT / "scripts").glob("*.sh"))


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda path: path.name)
@pytest.mark.parametrize("flag", ["--help", "-h"])
def test_help_prints_the_header_and_runs_nothing(script: Path, flag: str, tmp_path: Path):
    (tmp_path / "sed").symlink_to(shutil.which("sed"))  # all the help needs: nothing else runs
    bash = shutil.which("bash")
    said = subprocess.run(
        [bash, str(script), flag],
        env={"PATH": str(tmp_path)},
        capture_output=True,
        text=True,
        timeout=10,
    )
    header = script.read_text().splitlines()[1].removeprefix("# ")
    assert said.returncode == 0, said.stderr
    assert said.stdout.splitlines()[0] == header
    assert "set -euo" not in said.stdout and not said.stderr
