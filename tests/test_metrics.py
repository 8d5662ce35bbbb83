"""This project's Prometheus metrics: usable outside a server, and each one documented.

On a real server they are read from `/metrics` (tests/test_service.py); here, in process.
"""

from __future__ import annotations

import prometheus_client
import pytest

from clip_runner import metrics
from tests.helpers import REPO_ROOT

OURS = {
    name: value
    for name, value in vars(metrics).items()
    if name.isupper() and not name.endswith("_BUCKETS")
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
