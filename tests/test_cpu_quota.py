"""The cores a process may use: its affinity, capped by a CPU quota read from cgroup files
(laid out here as cgroup v1 and v2 lay them out, and as containers see them)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from clip_runner.cpu_quota import (
    CGROUP_ROOT,
    PROC_CGROUP,
    cgroup_cpu_quota,
    usable_cores,
)


def cgroup_tree(root: Path, proc_lines: list[str], files: dict[str, str]) -> Path:
    """A cgroup filesystem under `root` holding `files` (path -> content), and the
    /proc/self/cgroup that names the process's cgroups; returns the latter's path."""
    for name, content in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(content)
    proc = root.parent / "proc-self-cgroup"
    proc.write_text("\n".join(proc_lines) + "\n")
    return proc


V2_CONTAINER = ["0::/"]  # Docker and Kubernetes on cgroup v2: the container's own namespace


def test_v2_a_containers_quota_at_the_root_of_its_namespace(tmp_path):
    root = tmp_path / "cgroup"
    files = {"cgroup.controllers": "cpu", "cpu.max": "400000 100000"}
    proc = cgroup_tree(root, V2_CONTAINER, files)
    assert cgroup_cpu_quota(proc, root) == 4.0


def test_v2_no_quota_is_max(tmp_path):
    root = tmp_path / "cgroup"
    proc = cgroup_tree(root, V2_CONTAINER, {"cgroup.controllers": "cpu", "cpu.max": "max 100000"})
    assert cgroup_cpu_quota(proc, root) is None


def test_v2_the_tightest_quota_on_the_way_to_the_root_applies(tmp_path):
    """A systemd slice or a pod limits its children: the pod's 2 CPUs bound a container
    allowed 8 (or none)."""
    root = tmp_path / "cgroup"
    files = {
        "cgroup.controllers": "cpu",
        "kubepods/cpu.max": "max 100000",
        "kubepods/pod1/cpu.max": "200000 100000",
        "kubepods/pod1/app/cpu.max": "800000 100000",
    }
    proc = cgroup_tree(root, ["0::/kubepods/pod1/app"], files)
    assert cgroup_cpu_quota(proc, root) == 2.0


def test_v1_quota_over_period_in_a_joint_cpu_hierarchy(tmp_path):
    root = tmp_path / "cgroup"
    files = {
        "cpu,cpuacct/cpu.cfs_quota_us": "150000\n",
        "cpu,cpuacct/cpu.cfs_period_us": "100000\n",
    }
    lines = ["12:memory:/", "4:cpu,cpuacct:/", "0::/"]  # hybrid: v1 controllers, empty v2
    proc = cgroup_tree(root, lines, files)
    assert cgroup_cpu_quota(proc, root) == 1.5


def test_v1_minus_one_is_no_quota(tmp_path):
    root = tmp_path / "cgroup"
    files = {"cpu/cpu.cfs_quota_us": "-1\n", "cpu/cpu.cfs_period_us": "100000\n"}
    proc = cgroup_tree(root, ["3:cpu:/", "2:cpuacct:/", "0::/"], files)
    assert cgroup_cpu_quota(proc, root) is None


def test_v1_inside_a_container_without_its_own_namespace(tmp_path):
    """/proc/self/cgroup names the host's path, which the container does not see: its own
    cgroup is the mount itself."""
    root = tmp_path / "cgroup"
    files = {
        "cpu,cpuacct/cpu.cfs_quota_us": "300000\n",
        "cpu,cpuacct/cpu.cfs_period_us": "100000\n",
    }
    proc = cgroup_tree(root, ["4:cpu,cpuacct:/docker/0123abcd", "0::/"], files)
    assert cgroup_cpu_quota(proc, root) == 3.0


def test_unreadable_or_odd_files_mean_no_quota(tmp_path):
    root = tmp_path / "cgroup"
    assert cgroup_cpu_quota(tmp_path / "no-such-proc-file", root) is None
    proc = cgroup_tree(root, ["garbage", "0::/"], {"cgroup.controllers": "", "cpu.max": "lots"})
    assert cgroup_cpu_quota(proc, root) is None


@pytest.mark.parametrize(("quota", "expected"), [("50000", 1), ("150000", 2), ("100000000", None)])
def test_usable_cores_are_the_affinity_capped_by_the_quota_rounded_up(tmp_path, quota, expected):
    root = tmp_path / "cgroup"
    files = {"cgroup.controllers": "cpu", "cpu.max": f"{quota} 100000"}
    proc = cgroup_tree(root, V2_CONTAINER, files)
    affinity = len(os.sched_getaffinity(0))
    assert usable_cores(proc, root) == min(affinity, expected or affinity)


def test_this_machine_is_read_without_error():
    assert 1 <= usable_cores(PROC_CGROUP, CGROUP_ROOT) <= len(os.sched_getaffinity(0))
