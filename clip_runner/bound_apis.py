"""Each BentoML API method bound once per service instance, not once per request.

BentoML's API methods are descriptors: every attribute access builds a new bound function
(`inspect.signature`, `functools.wraps`), and its server looks the method up on the instance
for every request it serves. py-spy at load: about 9% of the runner's event loop and 3% of an
API worker's. The bound function keeps no per-call state, so this builds each once and keeps
it on the instance, where attribute lookup finds it first: the descriptor defines no `__set__`,
so an instance attribute takes precedence over it.
"""

from __future__ import annotations

from _bentoml_sdk.method import APIMethod


def bind_apis_once(service: object) -> list[str]:
    """Keep `service`'s bound API methods on it; returns their names."""
    names = [
        name
        for cls in type(service).__mro__
        for name, member in vars(cls).items()
        if isinstance(member, APIMethod)
    ]
    for name in names:
        if name not in vars(service):
            vars(service)[name] = getattr(service, name)
    return names
