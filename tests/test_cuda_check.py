"""The GPU check that spares every server process importing torch: the same answer as torch's,
asked of the driver once per server."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from clip_runner import cuda_check
from clip_runner.cuda_check import (
    DRIVER_LIBRARY,
    RECORD,
    cuda_available,
    driver_devices,
    record_gpus,
    recorded_gpus,
    torch_cuda_version,
    torch_version_file,
    usable_devices,
    usable_gpus,
)


def test_the_answer_is_torchs_own():
    """On this CPU machine both say no; the GPU harness checks that both say yes on a GPU."""
    assert cuda_available() == torch.cuda.is_available()


def test_the_installed_torchs_cuda_build_is_read_without_importing_it():
    assert torch_cuda_version(torch_version_file()) == torch.version.cuda
    code = (
        "import os, sys\n"
        "from clip_runner.cuda_check import RECORD, cuda_available\n"
        "assert RECORD not in os.environ\n"
        "cuda_available()\n"
        "assert RECORD in os.environ, 'the driver was not asked'\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\n"
    )
    unasked = {name: value for name, value in os.environ.items() if name != RECORD}
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60, env=unasked)


def test_the_first_process_to_ask_records_the_answer_for_those_it_starts(monkeypatch):
    """The supervisor asks the driver; its workers inherit the answer and never start the driver
    themselves (a runner worker must choose its GPU first: gpu_placement.py)."""
    asked: list[int] = []

    def probe() -> int:
        asked.append(3)
        return 3

    monkeypatch.setattr(cuda_check, "probed_gpus", probe)
    monkeypatch.setenv(RECORD, "")  # none to read (and the test's own is undone after it)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "1,2,3")
    usable_gpus.cache_clear()
    try:
        assert usable_gpus() == 3 and asked == [3]
        assert json.loads(os.environ[RECORD]) == {"gpus": 3, "CUDA_VISIBLE_DEVICES": "1,2,3"}
        usable_gpus.cache_clear()  # as in a worker started with this environment
        assert usable_gpus() == 3 and cuda_available() and asked == [3]  # not asked again
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2")  # a process that sees another list
        usable_gpus.cache_clear()
        assert usable_gpus() == 3 and asked == [3, 3]  # asks for itself
    finally:
        usable_gpus.cache_clear()


@pytest.mark.parametrize("visible", [None, "", "0", "GPU-5f1e,GPU-77ab"])
@pytest.mark.parametrize("gpus", [0, 1, 8])
def test_a_recorded_answer_is_read_back_under_the_same_visible_devices(visible, gpus):
    environ = {} if visible is None else {"CUDA_VISIBLE_DEVICES": visible}
    record_gpus(environ, gpus)
    assert recorded_gpus(environ) == gpus
    environ["CUDA_VISIBLE_DEVICES"] = "7"  # counted under another list: not this process's
    assert recorded_gpus(environ) is None


@pytest.mark.parametrize(
    "record",
    [
        "",
        "2",
        "[2]",
        "not json",
        '{"gpus": 2}',
        '{"gpus": -1, "CUDA_VISIBLE_DEVICES": null}',
        '{"gpus": true, "CUDA_VISIBLE_DEVICES": null}',
        '{"gpus": "2", "CUDA_VISIBLE_DEVICES": null}',
    ],
)
def test_an_unreadable_record_is_not_trusted(record: str):
    assert recorded_gpus({RECORD: record}) is None


@pytest.mark.parametrize(
    ("text", "cuda"),
    [
        ("from typing import Optional\ncuda: Optional[str] = '13.0'\nhip = None\n", "13.0"),
        ("cuda = '12.8'\n", "12.8"),
        ("cuda: Optional[str] = None\n", None),  # a CPU build
        ("__version__ = '2.13.0'\n", None),
    ],
)
def test_a_version_file_names_its_cuda_build(tmp_path: Path, text: str, cuda: str | None):
    version_file = tmp_path / "version.py"
    version_file.write_text(text)
    assert torch_cuda_version(version_file) == cuda


def test_no_torch_or_no_driver_means_no_gpu(tmp_path: Path):
    assert torch_cuda_version(None) is None
    assert torch_cuda_version(tmp_path / "absent.py") is None
    assert driver_devices(str(tmp_path / "libcuda.so.1")) == ([], (0, 0))
    if not Path("/proc/driver/nvidia/version").exists():
        assert driver_devices(DRIVER_LIBRARY) == ([], (0, 0))  # this machine has no driver


A100, T4, V100 = (8, 0), (7, 5), (7, 0)


@pytest.mark.parametrize(
    ("torch_cuda", "capabilities", "driver_cuda", "usable"),
    [
        ("13.0", [A100], (13, 0), 1),
        ("13.0", [A100] * 8, (13, 1), 8),  # a newer minor version of the same major
        ("12.8", [A100], (13, 0), 1),  # a newer driver runs older CUDA builds
        ("13.0", [A100], (12, 9), 0),  # the driver is too old: torch finds no GPU either
        ("13.0", [], (13, 0), 0),  # no device visible (CUDA_VISIBLE_DEVICES="", say)
        (None, [A100], (13, 0), 0),  # a CPU build of torch
        ("13.0", [T4], (13, 0), 1),  # Turing: the oldest CUDA 13 builds for
        ("13.0", [V100] * 8, (13, 0), 0),  # ml.p3: no code for Volta in a CUDA 13 build
        ("12.8", [V100], (13, 0), 1),  # CUDA 12 builds for Volta (the runner checks its torch)
        ("13.0", [V100, A100], (13, 0), 2),  # mixed: counted by index, placed round them all
        ("14.0", [V100], (14, 0), 1),  # a CUDA this does not know: the runner checks
    ],
)
def test_gpus_are_usable_with_a_cuda_build_a_recent_enough_driver_and_code_for_them(
    torch_cuda, capabilities, driver_cuda, usable
):
    assert usable_devices(torch_cuda, capabilities, driver_cuda) == usable
