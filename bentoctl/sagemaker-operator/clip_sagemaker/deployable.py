"""`bentoctl build`'s build context: the bento with the Dockerfile `bentoml containerize` writes.

This project's image already speaks SageMaker's contract (`serve`, port 8080, /ping answering
200 once the model is warm, /invocations), so no adapter layer goes on top: the image bentoctl
builds is the one `bentoml containerize` builds, from the same context and Dockerfile.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from typing import Any

import bentoml
from bentoml._internal.container import (
    BUILDER_REGISTRY,
    construct_containerfile,
    enable_buildkit,
    get_backend,
    register_backend,
)
from bentoml._internal.container import docker as docker_backend

# Options of bentoctl's buildx call that the classic `docker build` also has.
CLASSIC_BUILD_OPTIONS = ("file", "tag", "no_cache", "pull", "target", "network", "label")


def has_buildx() -> bool:
    docker = docker_backend.find_binary()
    if docker is None:
        return False
    return subprocess.run([docker, "buildx", "version"], capture_output=True).returncode == 0


def classic_build_args(*, context_path: str, build_args: Any = None, **options: Any) -> Any:
    """bentoctl's buildx arguments, as `docker build` takes them (buildx-only ones dropped)."""
    kept = {k: v for k, v in options.items() if k in CLASSIC_BUILD_OPTIONS and v is not None}
    return docker_backend.construct_build_args(
        context_path=context_path, build_arg=build_args, **kept
    )


def use_classic_docker_build_without_buildx() -> None:
    """bentoctl 0.4.0 builds only with `docker buildx`. Where the buildx plugin is missing,
    bentoctl's build goes through BentoML's `docker` backend instead (classic `docker build`,
    as `bentoml containerize --backend docker` with DOCKER_BUILDKIT=0 runs it)."""
    if has_buildx():
        return
    print(
        "docker buildx is not installed: bentoctl's build runs as a classic `docker build` "
        "(BentoML's docker backend, DOCKER_BUILDKIT=0)"
    )
    BUILDER_REGISTRY.pop("buildx", None)
    register_backend(
        "buildx",
        binary=docker_backend.find_binary(),
        buildkit_support=False,
        health=docker_backend.health,
        construct_build_args=classic_build_args,
        env={"DOCKER_BUILDKIT": "0"},
    )


def create_deployable(
    bento_path: str,
    destination_dir: str,
    bento_metadata: dict[str, Any],
    overwrite_deployable: bool = True,
) -> str:
    """Copy the build context `bentoml containerize` uses for this bento into `destination_dir`
    (its Dockerfile at env/docker/Dockerfile, where bentoctl looks); return its path.

    `bento_path` (bentoctl's copy of the bento) is not used; see below."""
    use_classic_docker_build_without_buildx()
    deployable = Path(destination_dir) / "deployable"
    if deployable.exists():
        if not overwrite_deployable:
            return str(deployable)
        shutil.rmtree(deployable)
    # The store's bento, not bentoctl's copy of it at `bento_path`: PyFilesystem's copy drops
    # file modes (entrypoint.sh's x bit among them), and the image would then differ.
    bento = bentoml.get(bento_metadata["tag"])
    buildkit = enable_buildkit(builder=get_backend("buildx"))
    with construct_containerfile(bento, enable_buildkit=buildkit) as (context, _):
        shutil.copytree(context, deployable)
    print(
        f"build context: bento {bento_metadata['tag']} with the Dockerfile BentoML "
        f"{bentoml.__version__} writes for `bentoml containerize` (BuildKit: {buildkit})"
    )
    return str(deployable)
