"""This project's Prometheus metrics: usable outside a server, and each one documented.

On a real server they are read from `/metrics` (tests/test_service.py); here, in process.
"""

from __future__ import annotations

import os
import subprocess
import sys

import prometheus_client
import prometheus_client.metrics
import pytest

from clip_runner import metrics
from tests.helpers import REPO_ROOT

OURS = {
    name: value
    for name, value in vars(metrics).items()
    if isinstance(value, prometheus_client.metrics.MetricWrapperBase)
}


def metric_name(metric) -> str:
    """The exposed name (a counter's without `_total`), through prometheus_client's API."""
    (described,) = metric.describe()
    return described.name


def sample(name: str, labels: dict[str, str]) -> float:
    return prometheus_client.REGISTRY.get_sample_value(name, labels) or 0.0


def test_each_metric_is_named_in_the_readme():
    readme = REPO_ROOT.joinpath("README.md").read_text()
    names = [metric_name(metric) for metric in OURS.values()]
    assert len(names) >= 8 and all(
        name.startswith(("clip_runner_", "clip_service_")) for name in names
    )
    undocumented = [name for name in names if f"`{name}" not in readme]
    assert not undocumented


@pytest.mark.parametrize("attribute", sorted(OURS))
def test_each_metric_counts_in_process(attribute: str):
    metric = OURS[attribute]
    labels = dict.fromkeys(metric._labelnames, "test")
    child = metric.labels(**labels) if labels else metric
    counted = "_count" if hasattr(child, "observe") else "_total"
    before = sample(metric_name(metric) + counted, labels)
    if counted == "_count":
        child.observe(3)
    else:
        child.inc()
    assert sample(metric_name(metric) + counted, labels) == before + 1


def test_the_live_gauges_of_dead_workers_are_dropped_and_their_totals_kept(tmp_path):
    """(On a real server: tests/test_faults.py.)"""
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    names = [
        f"{kind}_{pid}.db"
        for pid in (gone.pid, os.getpid())
        for kind in ("gauge_livesum", "gauge_liveall", "gauge_all", "gauge_max", "counter")
    ]
    for name in names:
        (tmp_path / name).write_bytes(b"")
    assert metrics.forget_dead_workers(str(tmp_path)) == {gone.pid}
    left = {path.name for path in tmp_path.iterdir()}
    dropped = {f"gauge_{kind}_{gone.pid}.db" for kind in ("livesum", "liveall", "all")}
    assert left == set(names) - dropped
    assert metrics.forget_dead_workers(str(tmp_path / "absent")) == set()
