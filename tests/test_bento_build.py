"""`bentoml build` packs the service, the library and the stored model into a bento."""

from __future__ import annotations

import os
import subprocess
import sys
import tarfile
from pathlib import Path

import yaml

from tests.helpers import REPO_ROOT


def test_bento_builds_with_the_model_inside(tiny_stored_model, bentoml_home, tmp_path):
    bentoml_cli = Path(sys.executable).with_name("bentoml")
    env = {
        **os.environ,
        "BENTOML_HOME": str(bentoml_home),
        "CLIP_MODEL_TAG": str(tiny_stored_model.tag),
    }
    result = subprocess.run(
        [str(bentoml_cli), "build", "--output", "tag"],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    tag = result.stdout.strip().splitlines()[-1].removeprefix("__tag__:")
    name, version = tag.split(":")
    bento_dir = bentoml_home / "bentos" / name / version
    manifest = yaml.safe_load((bento_dir / "bento.yaml").read_text())
    assert manifest["service"] == "service:ClipService"
    runner = next(svc for svc in manifest["services"] if svc["name"] == "clip_runner")
    assert [model["tag"] for model in runner["models"]] == [str(tiny_stored_model.tag)]
    assert runner["config"]["resources"] == {"gpu": 1}
    # The local bento references the model; an exported bento carries its files.
    exported = tmp_path / "bento.tar"
    export = subprocess.run(
        [str(bentoml_cli), "export", tag, str(exported)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert export.returncode == 0, export.stdout + export.stderr
    with tarfile.open(exported) as archive:
        names = archive.getnames()
    model_path = f"models/clip/{tiny_stored_model.tag.version}/model.safetensors"
    assert any(name.lstrip("./") == model_path for name in names), names[:20]
    assert (bento_dir / "src" / "clip_runner" / "zero_shot.py").is_file()
    assert (bento_dir / "src" / "service.py").is_file()
    assert "torch==2.13.0" in (bento_dir / "env" / "python" / "requirements.txt").read_text()
