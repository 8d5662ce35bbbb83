"""The SageMaker image itself: `scripts/container_test.sh` builds it on a real Docker engine and
checks it (serve on 8080, /ping, /invocations, bad input, non-root, no network, SIGTERM)."""

from __future__ import annotations

import os
import shutil
import subprocess

import pytest

from tests.helpers import REPO_ROOT


def docker_usable() -> bool:
    """Root can install and start an engine; anyone else needs a running one."""
    if os.geteuid() == 0:
        return True
    docker = shutil.which("docker")
    return bool(docker) and subprocess.run([docker, "info"], capture_output=True).returncode == 0


@pytest.mark.skipif(not docker_usable(), reason="needs root or a running Docker engine")
def test_the_containerized_bento_serves_as_sagemaker_runs_it(tmp_path):
    environment = {**os.environ, "TMPDIR": str(tmp_path)}
    environment.pop("BENTOML_HOME", None)  # the script makes its own store
    result = subprocess.run(
        ["bash", "scripts/container_test.sh"],
        cwd=REPO_ROOT,
        env=environment,
        capture_output=True,
        text=True,
        timeout=1500,
    )
    report = result.stdout + result.stderr
    assert result.returncode == 0, report[-6000:]
    assert "all checks passed" in report
    assert "exit code 0" in report and "runs as bentoml" in report
    # Both the host-network run and the network-less run printed their passed checks.
    assert report.count('"checks": "passed"') == 2, report[-6000:]
