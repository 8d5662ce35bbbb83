"""The SageMaker image itself: `scripts/container_test.sh` builds it on a real Docker engine and
checks it (serve on 8080, /ping, /invocations, bad input, non-root, no network, SIGTERM, and a
model from /opt/ml/model: mounted checkpoint, empty mount, refused contents), and builds the same
bento with `bentoctl build` and this project's operator (bentoctl/sagemaker-operator)."""

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
    # The host-network run, the network-less run (with an empty /opt/ml/model, as the SageMaker
    # SDK's local mode mounts it) and the run with a checkpoint in /opt/ml/model passed.
    assert report.count('"checks": "passed"') == 3, report[-6000:]
    assert '"model": "model-dir:/opt/ml/model"' in report
    assert "empty /opt/ml/model: the baked-in model served" in report
    assert "/opt/ml/model checkpoint served" in report
    assert "holds no CLIP checkpoint in transformers' format" in report
    # `bentoctl build` with this project's operator: the image `bentoml containerize` built,
    # stopped before the ECR push with the reason printed.
    assert "is the image bentoml containerize built" in report, report[-6000:]
    assert "stops before the ECR repository and push" in report
