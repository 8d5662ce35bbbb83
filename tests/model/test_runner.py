"""The runner service's own configuration (its encoding is tested through the served API)."""

from __future__ import annotations

from opentelemetry.util.http import ExcludeList

from clip_runner.model.runner import CLIPRunner


def test_every_runner_route_is_left_out_of_tracing():
    """BentoML's tracing middleware skips the runner's internal calls (15% of its event loop at
    load); read with OpenTelemetry's own matcher, as BentoML builds it from the config. A route
    added to the runner without its entry here would be traced again, and fail this test."""
    excluded = ExcludeList(CLIPRunner.config["tracing"]["excluded_urls"])
    routes = [method.route for method in CLIPRunner.apis.values()]
    assert routes and all(excluded.url_disabled(f"http://127.0.0.1:3000{r}") for r in routes)
    assert not excluded.url_disabled("http://127.0.0.1:3000/invocations")
