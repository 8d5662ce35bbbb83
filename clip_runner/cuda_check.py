"""Whether the runner's torch will find a GPU here, answered without importing torch.

Every server process reads the settings, and several defaults depend on a GPU (API and runner
workers, CUDA graphs, the access log). `torch.cuda.is_available()` answers that, but importing
torch, and transformers' model code after it, was most of the start of the supervisor and of
every API worker, which never run the model (BENCHMARKS.md, "Start-up"). So this module asks the
two things torch's own check depends on:

- whether the installed torch is a CUDA build, and for which CUDA: `torch/version.py`, read as
  text (a CPU build says `cuda = None`);
- whether the NVIDIA driver sees a device, and which CUDA it supports: the driver API that
  torch's check calls underneath (`cuInit`, `cuDeviceGetCount`, `cuDriverGetVersion` in
  libcuda), which honours `CUDA_VISIBLE_DEVICES` as torch does.

A CUDA 13 torch needs a driver for CUDA 13 or later (minor versions are compatible within a
major); below that torch finds no GPU, and neither does this. It also holds no code for GPUs
older than Turing (compute capability 7.5: CUDA 13 builds for none), which torch still counts
as available; this counts them as none, so a V100 (`ml.p3`) machine takes the CPU's defaults,
as its runner serves on the CPU (encoding.pick_device runs a kernel first). The tests hold
both answers equal on this CPU machine, and the GPU harness on its GPU.

The driver is asked once per server, not once per process: the first process to ask (the
supervisor, which imports the service before it starts any worker) records the answer in its
environment (`RECORD`), and every worker it starts inherits it. A runner worker must not start
the driver before it has chosen its GPU (model/gpu_placement.py): CUDA reads
`CUDA_VISIBLE_DEVICES` once, when the driver starts in a process.
"""

from __future__ import annotations

import ast
import ctypes
import functools
import importlib.util
import json
import os
from collections.abc import MutableMapping
from pathlib import Path

CUDA_SUCCESS = 0
DRIVER_LIBRARY = "libcuda.so.1"
# cuDeviceGetAttribute's CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR and _MINOR.
COMPUTE_CAPABILITY_MAJOR, COMPUTE_CAPABILITY_MINOR = 75, 76
# The oldest GPUs a CUDA major version's toolkit builds code for (its release notes): CUDA 13
# dropped Maxwell, Pascal and Volta. A torch build may leave out more (the runner checks).
OLDEST_GPU_BY_CUDA = {13: (7, 5), 12: (5, 0)}
# The server's answer, for the processes it starts: the usable GPUs, and the
# CUDA_VISIBLE_DEVICES they were counted under (a process that sees another list asks again).
RECORD = "_CLIP_USABLE_GPUS"


@functools.cache
def usable_gpus() -> int:
    """How many GPUs the runner's torch will use here (0: none), asked once per server."""
    recorded = recorded_gpus(os.environ)
    if recorded is not None:
        return recorded
    gpus = probed_gpus()
    record_gpus(os.environ, gpus)
    return gpus


def cuda_available() -> bool:
    """What `torch.cuda.is_available()` will answer in the runner."""
    return usable_gpus() > 0


def probed_gpus() -> int:
    """The GPUs the driver shows (CUDA_VISIBLE_DEVICES honoured) where torch can use them."""
    torch_cuda = torch_cuda_version(torch_version_file())
    if torch_cuda is None:
        return 0  # a CPU build: the driver is not even asked
    capabilities, driver_cuda = driver_devices(DRIVER_LIBRARY)
    return usable_devices(torch_cuda, capabilities, driver_cuda)


def record_gpus(environ: MutableMapping[str, str], gpus: int) -> None:
    """Writes `RECORD` for the processes this one starts."""
    visible = environ.get("CUDA_VISIBLE_DEVICES")
    environ[RECORD] = json.dumps({"gpus": gpus, "CUDA_VISIBLE_DEVICES": visible})


def recorded_gpus(environ: MutableMapping[str, str]) -> int | None:
    """The inherited count, or None where there is none, it is unreadable, or it was counted
    under another CUDA_VISIBLE_DEVICES than this process has."""
    try:
        record = json.loads(environ.get(RECORD, ""))
        gpus = record["gpus"]
        counted_under = record["CUDA_VISIBLE_DEVICES"]
    except (ValueError, TypeError, KeyError):
        return None
    if counted_under != environ.get("CUDA_VISIBLE_DEVICES"):
        return None
    if not isinstance(gpus, int) or isinstance(gpus, bool) or gpus < 0:
        return None
    return gpus


def usable_devices(
    torch_cuda: str | None, capabilities: list[tuple[int, int]], driver_cuda: tuple[int, int]
) -> int:
    """The visible devices, where torch can use them: a CUDA build, a driver for its CUDA major
    version (minor versions are compatible within a major), and a device that CUDA version
    builds code for. A machine mixing GPUs counts them all, so that runner workers go round
    them by index; a worker given one too old serves on the CPU and says so."""
    if torch_cuda is None or not capabilities:
        return 0
    cuda_major = int(torch_cuda.split(".")[0])
    if driver_cuda < (cuda_major, 0):
        return 0
    oldest = OLDEST_GPU_BY_CUDA.get(cuda_major, (0, 0))
    return len(capabilities) if max(capabilities) >= oldest else 0


def torch_version_file() -> Path | None:
    """torch's generated `version.py`, found without importing torch (None without torch)."""
    spec = importlib.util.find_spec("torch")
    if spec is None or spec.origin is None:
        return None
    return Path(spec.origin).with_name("version.py")


def torch_cuda_version(version_file: Path | None) -> str | None:
    """The `cuda = '13.0'` line of torch's version.py; None for a CPU build (or no torch)."""
    if version_file is None or not version_file.is_file():
        return None
    for node in ast.parse(version_file.read_text(encoding="utf-8")).body:
        target = node.target if isinstance(node, ast.AnnAssign) else None
        if isinstance(node, ast.Assign) and len(node.targets) == 1:
            target = node.targets[0]
        if isinstance(target, ast.Name) and target.id == "cuda" and node.value is not None:
            value = node.value
            if isinstance(value, ast.Constant) and isinstance(value.value, str):
                return value.value
            return None
    return None


def driver_devices(library: str) -> tuple[list[tuple[int, int]], tuple[int, int]]:
    """(each visible device's compute capability, (major, minor) CUDA version the driver
    supports); ([], (0, 0)) where no NVIDIA driver is installed or it reports no device."""
    try:
        cuda = ctypes.CDLL(library)
    except OSError:
        return [], (0, 0)
    count, version = ctypes.c_int(0), ctypes.c_int(0)
    if (
        cuda.cuInit(0) != CUDA_SUCCESS
        or cuda.cuDeviceGetCount(ctypes.byref(count)) != CUDA_SUCCESS
        or cuda.cuDriverGetVersion(ctypes.byref(version)) != CUDA_SUCCESS
    ):
        return [], (0, 0)
    capabilities = []
    for index in range(count.value):
        device, major, minor = ctypes.c_int(0), ctypes.c_int(0), ctypes.c_int(0)
        if (
            cuda.cuDeviceGet(ctypes.byref(device), index) != CUDA_SUCCESS
            or cuda.cuDeviceGetAttribute(ctypes.byref(major), COMPUTE_CAPABILITY_MAJOR, device)
            != CUDA_SUCCESS
            or cuda.cuDeviceGetAttribute(ctypes.byref(minor), COMPUTE_CAPABILITY_MINOR, device)
            != CUDA_SUCCESS
        ):
            return [], (0, 0)
        capabilities.append((major.value, minor.value))
    return capabilities, (version.value // 1000, version.value % 1000 // 10)
