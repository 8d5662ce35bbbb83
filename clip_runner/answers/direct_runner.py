"""The API workers' runner calls in the runner's own wire format (model/runner_wire.py).

BentoML's dependency client builds each call through its input model, OpenTelemetry's header
injection and pickle, and reads the answer back through its output model; the runner answers
these calls before its endpoint's layers (model/direct_calls.py). This client sends the rows'
bytes to the same address over one long-lived aiohttp session, and fails as BentoML's client
does (`BentoMLException` with the runner's status; aiohttp's errors when the connection
fails), so retries and "overloaded" answers work unchanged (runner_calls.py).
`CLIP_DIRECT_RUNNER_CALLS=off` goes back to BentoML's client.

With several runner workers they share one listening socket, and a connection stays with the
worker that accepted it; so a connection is closed now and then (`calls_per_connection`), and
the next is taken by whichever runner worker's event loop is free first.
"""

from __future__ import annotations

import os
from http import HTTPStatus
from urllib.parse import unquote, urlparse

import aiohttp
import numpy as np
from bentoml.exceptions import BentoMLException

from clip_runner.config import RUNNER_CALLS_PER_CONNECTION_WITH_SEVERAL_RUNNERS
from clip_runner.model.runner_wire import (
    MEDIA_TYPE,
    ROWS_HEADER,
    pack_jpegs,
    pack_pixels,
    pack_token_ids,
    unpack_embeddings,
)


def runner_address(url: str) -> tuple[str, str | None]:
    """(base URL, unix socket path or None) of the runner at BentoML's dependency `url`: a
    `file://` socket (how `bentoml serve` connects its services), `tcp://host:port`, or an
    HTTP URL."""
    parsed = urlparse(url)
    if parsed.scheme in ("file", "unix"):
        return "http://127.0.0.1", os.path.normpath(f"/{parsed.netloc}/{unquote(parsed.path)}")
    if parsed.scheme == "tcp":
        return f"http://{parsed.netloc}", None
    return url.rstrip("/"), None


def calls_per_connection(runner_workers: int) -> int:
    """Calls an API worker's connection to the runner carries before it is closed (0: as many as
    it lasts for).

    An API worker keeping one call in flight (the GPU default) sent all its calls down one
    connection, to the one runner worker that had accepted it: with six API workers over two
    runner workers (tiny model, 2 cores, three starts each) the less loaded one did 22%, 30% and
    45% of the runners' work. Closing every eighth call's connection: 45%, 46% and 47%, at no cost
    that alternating windows could see (363 against 361 requests/s, runner CPU 1.71 against 1.69
    ms a request, API 3.37 against 3.42). A connection per call cost the runner 12% more CPU a
    request. With one runner worker there is nothing to deal out."""
    return RUNNER_CALLS_PER_CONNECTION_WITH_SEVERAL_RUNNERS if runner_workers > 1 else 0


def runner_error(status: int, text: str) -> BentoMLException:
    """The exception BentoML's client raises for the same answer: its class for the status
    (ServiceUnavailable for 503), carrying the status as `error_code`."""
    code = HTTPStatus(status)
    return BentoMLException.error_mapping.get(code, BentoMLException)(text, error_code=code)


class DirectRunnerClient:
    """The runner's encoders, called in the wire format; one per API worker."""

    def __init__(self, url: str, calls_per_connection: int = 0) -> None:
        """`calls_per_connection`: every call that many closes its connection (0: none)."""
        self.base_url, self.socket_path = runner_address(url)
        self.calls_per_connection = calls_per_connection
        self._calls = 0
        self._session: aiohttp.ClientSession | None = None

    def session(self) -> aiohttp.ClientSession:
        """Made on first use, inside the worker's event loop (aiohttp's requirement). No
        timeout of its own: each attempt is bounded by its caller (runner_calls.resilient)."""
        if self._session is None or self._session.closed:
            connector = aiohttp.UnixConnector(self.socket_path) if self.socket_path else None
            self._session = aiohttp.ClientSession(
                self.base_url, connector=connector, timeout=aiohttp.ClientTimeout(total=None)
            )
        return self._session

    async def _call(self, route: str, body: bytes | memoryview, rows: str) -> np.ndarray:
        headers = {"content-type": MEDIA_TYPE, ROWS_HEADER: rows}
        self._calls += 1
        if self.calls_per_connection and self._calls % self.calls_per_connection == 0:
            headers["connection"] = "close"  # the runner closes it once it has answered
        async with self.session().post(route, data=body, headers=headers) as response:
            answer = await response.read()
            if response.status != HTTPStatus.OK:
                raise runner_error(response.status, answer.decode("utf-8", "replace"))
            try:
                return unpack_embeddings(answer, response.headers.get(ROWS_HEADER, ""))
            except ValueError as exc:
                raise BentoMLException(f"the runner's answer to {route}: {exc}") from None

    async def encode_images(self, pixels: np.ndarray) -> np.ndarray:
        return await self._call("/encode_images", *pack_pixels(pixels))

    async def encode_jpegs(self, jpegs: list[bytes]) -> np.ndarray:
        return await self._call("/encode_jpegs", *pack_jpegs(jpegs))

    async def encode_tokens(self, token_ids: list[list[int]]) -> np.ndarray:
        return await self._call("/encode_tokens", *pack_token_ids(token_ids))

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
