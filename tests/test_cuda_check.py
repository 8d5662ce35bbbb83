"""The GPU check that spares every server process importing torch: the same answer as torch's."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from clip_runner.cuda_check import (
    DRIVER_LIBRARY,
    cuda_available,
    driver_devices,
    gpu_usable,
    torch_cuda_version,
    torch_version_file,
)


def test_the_answer_is_torchs_own():
    """On this CPU machine both say no; the GPU harness checks that both say yes on a GPU."""
    assert cuda_available() == torch.cuda.is_available()


def test_the_installed_torchs_cuda_build_is_read_without_importing_it():
    assert torch_cuda_version(torch_version_file()) == torch.version.cuda
    code = (
        "import sys\n"
        "from clip_runner.cuda_check import cuda_available\n"
        "cuda_available()\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


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
    assert driver_devices(str(tmp_path / "libcuda.so.1")) == (0, (0, 0))
    if not Path("/proc/driver/nvidia/version").exists():
        assert driver_devices(DRIVER_LIBRARY) == (0, (0, 0))  # this machine has no driver


@pytest.mark.parametrize(
    ("torch_cuda", "devices", "driver_cuda", "usable"),
    [
        ("13.0", 1, (13, 0), True),
        ("13.0", 8, (13, 1), True),  # a newer minor version of the same major
        ("12.8", 1, (13, 0), True),  # a newer driver runs older CUDA builds
        ("13.0", 1, (12, 9), False),  # the driver is too old: torch finds no GPU either
        ("13.0", 0, (13, 0), False),  # no device visible (CUDA_VISIBLE_DEVICES="", say)
        (None, 1, (13, 0), False),  # a CPU build of torch
    ],
)
def test_a_gpu_is_usable_with_a_cuda_build_a_device_and_a_recent_enough_driver(
    torch_cuda, devices, driver_cuda, usable
):
    assert gpu_usable(torch_cuda, devices, driver_cuda) is usable
