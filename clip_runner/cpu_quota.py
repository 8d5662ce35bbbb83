"""How many cores this process may use: its CPU affinity, capped by a cgroup CPU quota.

Several defaults scale with the cores: the API workers, the runner's decode threads and its
torch threads. `os.sched_getaffinity` sees `taskset` and cpusets, but not a CPU quota: a
container started with `docker run --cpus 4`, or a Kubernetes pod with a CPU limit of 4, on a
64-core node sees all 64 cores. It would then start 32 API workers on a GPU and 64 torch threads
on a CPU, and the kernel would stop all of them for the rest of each period (100 ms) once they
had spent the quota's share of it. SageMaker gives a container its whole instance, which has no
quota.

The quota lives in the cgroup filesystem: cgroup v2's `cpu.max` ("400000 100000": 4 CPUs; "max
100000": none), v1's `cpu.cfs_quota_us` over `cpu.cfs_period_us` (-1: none). Every cgroup from
the process's own up to the root may set one, and the tightest applies. A fractional quota is
rounded up: 1.5 CPUs let two threads run, each three quarters of the time.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterator
from pathlib import Path

PROC_CGROUP = Path("/proc/self/cgroup")
CGROUP_ROOT = Path("/sys/fs/cgroup")


def usable_cores(proc_cgroup: Path = PROC_CGROUP, cgroup_root: Path = CGROUP_ROOT) -> int:
    """The cores this process may use: its CPU affinity, at most its CPU quota rounded up."""
    cores = len(os.sched_getaffinity(0))
    quota = cgroup_cpu_quota(proc_cgroup, cgroup_root)
    return cores if quota is None else max(1, min(cores, math.ceil(quota)))


def cgroup_cpu_quota(proc_cgroup: Path, cgroup_root: Path) -> float | None:
    """CPUs the process's cgroups allow it (the tightest quota from its own cgroup up to the
    root, v1 and v2 alike), or None where none is set or none can be read."""
    try:
        lines = proc_cgroup.read_text().splitlines()
    except OSError:
        return None
    quotas: list[float] = []
    for line in lines:
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        _, controllers, path = parts
        if not controllers:  # cgroup v2: one hierarchy, at the root or beside the v1 ones
            mount = cgroup_root
            if not (mount / "cgroup.controllers").exists():
                mount = cgroup_root / "unified"
            quotas.extend(_quotas_up_to(mount, path, _v2_quota))
        elif "cpu" in controllers.split(","):
            for name in (controllers, "cpu", "cpu,cpuacct"):
                if (cgroup_root / name).is_dir():
                    quotas.extend(_quotas_up_to(cgroup_root / name, path, _v1_quota))
                    break
    return min(quotas, default=None)


def _quotas_up_to(mount: Path, path: str, read: Callable[[Path], float | None]) -> Iterator[float]:
    """The quotas set on the cgroup at `path` under `mount` and on each cgroup above it.

    Inside a container without its own cgroup namespace, /proc/self/cgroup names the host's
    path (/docker/<id>), while the container sees its own cgroup at the mount itself."""
    here = mount / path.strip("/")
    if not here.is_dir():
        here = mount
    while True:
        quota = read(here)
        if quota is not None:
            yield quota
        if here == mount:
            return
        here = here.parent


def _v2_quota(cgroup: Path) -> float | None:
    """`cpu.max`: "<quota> <period>" in microseconds, or "max <period>"."""
    try:
        quota, period = (cgroup / "cpu.max").read_text().split()
        return None if quota == "max" else int(quota) / int(period)
    except (OSError, ValueError):
        return None


def _v1_quota(cgroup: Path) -> float | None:
    """`cpu.cfs_quota_us` (-1: none) over `cpu.cfs_period_us`."""
    try:
        quota = int((cgroup / "cpu.cfs_quota_us").read_text())
        period = int((cgroup / "cpu.cfs_period_us").read_text())
    except (OSError, ValueError):
        return None
    return None if quota <= 0 or period <= 0 else quota / period
