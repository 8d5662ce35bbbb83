"""`bentoml build` packs the service, the library and the stored model into a bento, and the
bento's own container entrypoint serves it on SageMaker's port."""

from __future__ import annotations

import ast
import importlib.metadata
import importlib.util
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from tests.helpers import REPO_ROOT, free_port, stop_process_group, wait_until_ready

BENTOML_CLI = Path(sys.executable).with_name("bentoml")


@dataclass(frozen=True)
class BuiltBento:
    tag: str
    path: Path
    env: dict[str, str]


def run_ok(command: list[str], env: dict[str, str]) -> str:
    """`command`'s output, run from the repository with `env`; it must succeed."""
    done = subprocess.run(
        command, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


def start_logged(command: list[str], env: dict[str, str], log_path: Path) -> subprocess.Popen:
    """`command` run in its log's folder, in a session of its own (stopped by its process
    group), its output written to `log_path`."""
    with open(log_path, "wb") as log:
        return subprocess.Popen(
            command,
            cwd=log_path.parent,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )


@pytest.fixture(scope="module")
def built_bento(
    tiny_stored_model, bentoml_home, tmp_path_factory: pytest.TempPathFactory
) -> BuiltBento:
    """The bento built with CLIP_MODEL_TAG naming the suite's model, from a store whose
    `clip:latest` is another, newer model: the image must serve (and carry) the model chosen."""
    home = tmp_path_factory.mktemp("build-home")
    version = tiny_stored_model.tag.version
    shutil.copytree(bentoml_home / "models" / "clip" / version, home / "models" / "clip" / version)
    env = {**os.environ, "BENTOML_HOME": str(home)}
    run_ok([sys.executable, "scripts/import_model.py", "--tiny"], env)
    latest = (home / "models" / "clip" / "latest").read_text().strip()
    assert latest != version
    env["CLIP_MODEL_TAG"] = str(tiny_stored_model.tag)
    built = run_ok([str(BENTOML_CLI), "build", "--output", "tag"], env)
    tag = built.strip().splitlines()[-1].removeprefix("__tag__:")
    name, version = tag.split(":")
    return BuiltBento(tag, home / "bentos" / name / version, env)


def test_bento_builds_with_the_model_inside(built_bento, tiny_stored_model, tmp_path):
    tag, bento_dir, env = built_bento.tag, built_bento.path, built_bento.env
    manifest = yaml.safe_load((bento_dir / "bento.yaml").read_text())
    assert manifest["service"] == "service:ClipService"
    runner = next(svc for svc in manifest["services"] if svc["name"] == "clip_runner")
    assert [model["tag"] for model in runner["models"]] == [str(tiny_stored_model.tag)]
    assert runner["config"]["resources"] == {"gpu": 1}
    # The local bento references the model; an exported bento carries its files.
    exported = tmp_path / "bento.tar"
    run_ok([str(BENTOML_CLI), "export", tag, str(exported)], env)
    with tarfile.open(exported) as archive:
        names = archive.getnames()
    model_path = f"models/clip/{tiny_stored_model.tag.version}/model.safetensors"
    assert any(name.lstrip("./") == model_path for name in names), names[:20]
    # Only the model chosen: not also the store's clip:latest, another model.
    packed_models = {
        Path(name.lstrip("./")).parts[2]
        for name in names
        if name.lstrip("./").startswith("models/clip/") and len(Path(name).parts) > 3
    }
    assert packed_models == {tiny_stored_model.tag.version}, packed_models
    # Every library file, in every layer's package, and the demo page.
    library = REPO_ROOT / "clip_runner"
    expected = {
        path.relative_to(REPO_ROOT).as_posix()
        for path in [*library.rglob("*.py"), *library.rglob("*.html")]
        if "__pycache__" not in path.parts
    }
    packed = {
        path.relative_to(bento_dir / "src").as_posix()
        for path in (bento_dir / "src" / "clip_runner").rglob("*")
        if path.is_file() and "__pycache__" not in path.parts
    }
    assert "clip_runner/web/ui.html" in expected and expected <= packed, expected - packed
    assert (bento_dir / "src" / "service.py").is_file()
    assert "torch==2.13.0" in (bento_dir / "env" / "python" / "requirements.txt").read_text()
    manifest_envs = {item["name"]: item["value"] for item in manifest["envs"]}
    assert manifest_envs["BENTOML_PORT"] == "8080" and manifest_envs["HF_HUB_OFFLINE"] == "1"
    assert manifest_envs["NVIDIA_VISIBLE_DEVICES"] == "all"


def test_the_bento_carries_the_torchvision_built_for_its_torch(built_bento):
    """The image decodes JPEGs on a GPU with nvJPEG only if it installs torchvision, and only the
    release built for the pinned torch: 0.(N+15).P for torch 2.N.P, as every torchvision release
    since 0.15 / torch 2.0 pairs them (0.28.0's wheel requires torch==2.13.0). Another release
    makes pip fetch another torch, or fails to load beside this one."""
    lines = (built_bento.path / "env" / "python" / "requirements.txt").read_text().splitlines()
    pins = dict(line.split("==", 1) for line in lines if "==" in line and line[0] != "#")
    major, minor, patch = (int(part) for part in pins["torch"].split("."))
    assert major == 2 and pins["torchvision"] == f"0.{minor + 15}.{patch}"


def distributions_imported() -> dict[str, str]:
    """The installed distributions that service.py and clip_runner import (optional ones
    included), each with one module it provides: found by the file each module loads from."""
    owner = {}
    for distribution in importlib.metadata.distributions():
        for file in distribution.files or []:
            owner[str(file.locate().resolve())] = distribution.metadata["Name"]
    imported = set()
    for path in [REPO_ROOT / "service.py", *(REPO_ROOT / "clip_runner").rglob("*.py")]:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                imported.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                imported.add(node.module)
                # `from opentelemetry.instrumentation import asgi`: a namespace, then a module
                imported.update(f"{node.module}.{alias.name}" for alias in node.names)
    found = {}
    for module in sorted(imported):
        top = module.split(".")[0]
        if top in sys.stdlib_module_names or top in ("clip_runner", "__future__"):
            continue
        try:
            spec = importlib.util.find_spec(module)
        except ModuleNotFoundError:  # `from PIL.Image import open`: a name, not a module
            continue
        if spec is not None and spec.origin and spec.origin != "built-in":
            found.setdefault(owner[str(Path(spec.origin).resolve())].lower(), module)
    return found


def test_every_distribution_the_service_imports_is_pinned_in_the_bento(built_bento):
    """The image installs the bento's requirements.txt as it is: a distribution the code imports
    but no line pins (uvicorn, whose HTTP protocol header_limits.py wraps, came only through
    BentoML's `uvicorn>=0.22`) would be whatever PyPI had on the day of `containerize`."""
    lines = (built_bento.path / "env" / "python" / "requirements.txt").read_text().splitlines()
    pinned = {
        line.split("==", 1)[0].strip().lower().replace("_", "-")
        for line in lines
        if "==" in line and not line.startswith("#")
    }
    imported = distributions_imported()
    assert {"bentoml", "uvicorn", "starlette", "botocore", "pillow"} <= set(imported)
    unpinned = {
        name: module for name, module in imported.items() if name.replace("_", "-") not in pinned
    }
    assert not unpinned, f"imported but not pinned in requirements.txt: {unpinned}"


def test_the_bentos_entrypoint_serves_the_sagemaker_contract_on_8080(built_bento, tmp_path):
    """What `docker run IMAGE serve` runs, started on this host with the bento's own envs.

    The bento is exported and imported into a home of its own, as an image carries it: the
    model must travel inside it, and the suite's shared server keeps its own metrics directory
    (BentoML clears `$BENTOML_HOME/prometheus_multiproc_dir` when a server starts).
    """
    home = tmp_path / "home"
    archive = tmp_path / "bento.tar"
    own_home = {**built_bento.env, "BENTOML_HOME": str(home)}
    for command, env in (
        (["export", built_bento.tag, str(archive)], built_bento.env),
        (["import", str(archive)], own_home),
    ):
        run_ok([str(BENTOML_CLI), *command], env)
    name, version = built_bento.tag.split(":")
    bento_path = home / "bentos" / name / version
    manifest = yaml.safe_load((bento_path / "bento.yaml").read_text())
    env = {
        **built_bento.env,
        **{item["name"]: item["value"] for item in manifest["envs"]},
        "BENTOML_HOME": str(home),
        "BENTO_PATH": str(bento_path),
        "PATH": f"{BENTOML_CLI.parent}{os.pathsep}{os.environ['PATH']}",
    }
    env.pop("CLIP_MODEL_TAG")  # as in the image: the default tag, resolved in the bento
    entrypoint = bento_path / "env" / "docker" / "entrypoint.sh"
    server = start_logged(["bash", str(entrypoint), "serve"], env, tmp_path / "serve.log")
    try:
        checks = subprocess.run(
            [
                sys.executable,
                "scripts/container_checks.py",
                "http://127.0.0.1:8080",
                "--expect-model",
                str(built_bento.env["CLIP_MODEL_TAG"]),
            ],
            cwd=REPO_ROOT,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert checks.returncode == 0, checks.stderr + (tmp_path / "serve.log").read_text()[-3000:]
        assert '"checks": "passed"' in checks.stdout
        # SIGTERM, as `docker stop` sends it, ends the whole server well within 30 s.
        os.killpg(server.pid, signal.SIGTERM)
        started = time.monotonic()
        assert server.wait(timeout=30) == 0
        assert time.monotonic() - started < 30
    finally:
        stop_process_group(server)


def test_a_local_bento_serves_the_model_it_was_built_with(built_bento, tmp_path):
    """`bentoml serve <bento>` where it was built: a local bento only refers to the store's
    models, and CLIP_MODEL_TAG unset had meant the store's newest, another model here."""
    port = free_port()
    env = {**built_bento.env, "CLIP_PORT": str(port)}
    chosen = env.pop("CLIP_MODEL_TAG")
    command = [str(BENTOML_CLI), "serve", built_bento.tag, "--host", "127.0.0.1"]
    server = start_logged(command, env, tmp_path / "serve.log")
    try:
        wait_until_ready(f"http://127.0.0.1:{port}", server, timeout_s=120)
        checks = [sys.executable, "scripts/container_checks.py", f"http://127.0.0.1:{port}"]
        run_ok([*checks, "--expect-model", chosen], {**os.environ})
    finally:
        stop_process_group(server)
