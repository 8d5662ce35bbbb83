"""Calling the runner from an API worker: which failures mean "runner unavailable", and retries.

BentoML's dependency client speaks aiohttp over a unix socket to the runner service.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from http import HTTPStatus
from typing import TypeVar

import aiohttp
import bentoml
import httpx

from clip_runner.metrics import RUNNER_CALL_SECONDS

logger = logging.getLogger(__name__)

# How a runner call fails when the runner is gone, slow, or refuses.
RUNNER_ERRORS = (
    aiohttp.ClientError,
    httpx.HTTPError,
    TimeoutError,
    bentoml.exceptions.BentoMLException,
)
T = TypeVar("T")


def runner_overloaded(error: BaseException) -> bool:
    """The runner answered 503: its queue bound (CLIP_MAX_LATENCY_MS) refused the call.

    BentoML's client raises its generic exception carrying the runner's status code.
    """
    return (
        isinstance(error, bentoml.exceptions.BentoMLException)
        and error.error_code == HTTPStatus.SERVICE_UNAVAILABLE
    )


def resilient(
    call: Callable[..., Awaitable[T]], attempt_timeout_s: float, encoder: str = "other"
) -> Callable[..., Awaitable[T]]:
    """A runner call that is tried twice when its connection fails or its answer never comes.

    BentoML's dependency client (aiohttp over a unix socket) closes its connection pool under
    in-flight requests when it renews it ("Server disconnected"; runner.py makes that rare by
    keeping one pool), and in soak tests about one call in several thousand was never answered.
    Encoding is idempotent, so a second attempt is safe; the runner's own queue bound
    (CLIP_MAX_LATENCY_MS) keeps honest calls well inside `attempt_timeout_s`.
    """

    async def call_twice(*args: object) -> T:
        with RUNNER_CALL_SECONDS.labels(encoder=encoder).time():
            try:
                return await asyncio.wait_for(call(*args), attempt_timeout_s)
            except (aiohttp.ClientConnectionError, TimeoutError) as exc:
                logger.warning(
                    "runner call failed (%s: %s); retrying once", type(exc).__name__, exc
                )
                return await asyncio.wait_for(call(*args), attempt_timeout_s)

    return call_twice
