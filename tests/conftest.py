"""Fixtures shared by the suite.

BENTOML_HOME points at a temporary store before BentoML is imported anywhere, so tests never
touch the user's own model store. The tiny random-weight CLIP is saved there once per session.
"""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

_STORE = Path(tempfile.mkdtemp(prefix="clip-test-bentoml-"))
# Removed when the run ends: every run makes a new one, and nothing reads it afterwards.
atexit.register(shutil.rmtree, _STORE, ignore_errors=True)
os.environ["BENTOML_HOME"] = str(_STORE)
os.environ["BENTOML_DO_NOT_TRACK"] = "true"
# On the CPU wherever it runs, its servers too: the suite holds fp32 numbers to the original's
# (a GPU serves in fp16), and its GPU code paths are written to run on a CPU (README, Tests).
os.environ["CUDA_VISIBLE_DEVICES"] = ""

from clip_runner.model.store import LoadedClip, build_random_clip, load_clip, save_clip  # noqa: E402
from tests.helpers import (  # noqa: E402
    GUARD_SETTINGS,
    ImageHost,
    MotoS3,
    ServedBento,
    image_host,
    moto_s3,
    serve_tiny,
)


@pytest.fixture(scope="session")
def bentoml_home() -> Path:
    return _STORE


@pytest.fixture(scope="session")
def tiny_stored_model(bentoml_home: Path):
    model, processor = build_random_clip(tiny=True)
    return save_clip(model, processor, source="random:tiny", random_weights=True)


@pytest.fixture(scope="session")
def tiny_clip(tiny_stored_model) -> LoadedClip:
    return load_clip(tiny_stored_model)


@pytest.fixture(scope="session")
def image_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("images")


@pytest.fixture(scope="session")
def image_host_server(image_dir: Path) -> Iterator[ImageHost]:
    """The stand-in for a public image host (on 127.0.0.2, the one address tests allow)."""
    with image_host(image_dir) as host:
        yield host


@pytest.fixture(scope="session")
def image_server(image_host_server: ImageHost) -> str:
    return image_host_server.url


@pytest.fixture(scope="session")
def s3_store() -> Iterator[MotoS3]:
    """moto's S3 on loopback, which the served bento reads s3:// images from."""
    with moto_s3() as store:
        yield store


@pytest.fixture(scope="session")
def served(
    tiny_stored_model,
    bentoml_home: Path,
    tmp_path_factory: pytest.TempPathFactory,
    s3_store: MotoS3,
) -> Iterator[ServedBento]:
    """One real `bentoml serve` of the tiny model for the whole integration suite.

    Its CLIP_MODEL_DIR is an empty directory, as the SageMaker SDK's local mode mounts at
    /opt/ml/model: the baked-in (store) model must still be served.
    """
    with serve_tiny(
        tiny_stored_model,
        bentoml_home,
        tmp_path_factory,
        "serve",
        CLIP_MODEL_DIR=str(tmp_path_factory.mktemp("empty-model-dir")),
        CLIP_FETCH_TIMEOUT_S="10",  # an API worker's first S3 fetch loads botocore
        CLIP_FETCH_CONNECT_TIMEOUT_S="2",
        **s3_store.server_env(),
    ) as server:
        yield server


@pytest.fixture(scope="session")
def gpu_like(
    tiny_stored_model, bentoml_home: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ServedBento]:
    """A GPU's default paths on CPU, for the suites of the device decode and CUDA graphs: JPEGs
    forwarded to the runner (`CLIP_DECODE=runner`), image passes staged as the graphs replay them
    (`CLIP_CUDA_GRAPHS=on`: eagerly without a GPU), and the switch interval a GPU run compares
    with Python's. One server for both (each had its own: a start and stop less)."""
    with serve_tiny(
        tiny_stored_model,
        bentoml_home,
        tmp_path_factory,
        "gpu-like",
        CLIP_DECODE="runner",
        CLIP_CUDA_GRAPHS="on",
        CLIP_SWITCH_INTERVAL_MS="0.2",
    ) as server:
        yield server


@pytest.fixture(scope="session")
def guarded(
    tiny_stored_model, bentoml_home: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ServedBento]:
    """A second real server with an API key and small abuse bounds (`GUARD_SETTINGS`), shared by
    the suites of traffic, auth, the pixel budget, the CLI and the demo page."""
    with serve_tiny(
        tiny_stored_model, bentoml_home, tmp_path_factory, "guarded", **GUARD_SETTINGS
    ) as server:
        yield server
