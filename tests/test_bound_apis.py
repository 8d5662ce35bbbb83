"""BentoML API methods bound once per service instance (bound_apis.py)."""

from __future__ import annotations

import bentoml

from clip_runner.bound_apis import bind_apis_once


@bentoml.service
class Echo:
    @bentoml.api
    def echo(self, text: str) -> str:
        return text

    @bentoml.api
    async def shout(self, text: str) -> str:
        return text.upper()

    def helper(self) -> str:  # not an API: left alone
        return "help"


def test_each_api_is_bound_once_and_still_answers():
    service = Echo.inner()
    assert service.echo is not service.echo  # BentoML builds a new function on every access
    assert sorted(bind_apis_once(service)) == ["echo", "shout"]
    assert service.echo is service.echo and service.shout is service.shout
    assert service.echo.local("hi") == "hi"  # what BentoML's server calls per request
    assert "helper" not in vars(service)


def test_binding_twice_keeps_the_first_binding():
    service = Echo.inner()
    bind_apis_once(service)
    first = service.echo
    bind_apis_once(service)
    assert service.echo is first
