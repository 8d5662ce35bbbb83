"""The API workers' direct runner calls, over a real HTTP server on a unix socket (as `bentoml
serve` connects its services) whose runner route encodes with the real tiny model."""

from __future__ import annotations

import asyncio
import contextlib
import copy
import io
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import numpy as np
import pytest
import torch
import uvicorn
from bentoml.exceptions import ServiceUnavailable
from starlette.responses import PlainTextResponse

from clip_runner.answers.direct_runner import (
    DirectRunnerClient,
    calls_per_connection,
    runner_address,
)
from clip_runner.answers.runner_calls import runner_overloaded
from clip_runner.model.device_decode import DeviceJpegDecoder
from clip_runner.model.direct_calls import DirectCallsMiddleware
from clip_runner.model.encoding import ClipEncoder
from tests.helpers import photo_like


@contextlib.contextmanager
def serving(app, socket_path: Path) -> Iterator[uvicorn.Server]:
    """uvicorn (the server BentoML runs) serving `app` on a unix socket, in a thread."""
    config = uvicorn.Config(app, uds=str(socket_path), lifespan="off", log_level="warning")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        assert time.monotonic() < deadline and thread.is_alive(), "uvicorn did not start"
        time.sleep(0.01)
    try:
        yield server
    finally:
        server.should_exit = True
        thread.join(10)


@pytest.fixture(scope="module")
def encoder(tiny_clip) -> ClipEncoder:
    model = copy.deepcopy(tiny_clip.model)  # the encoder changes its model's first layer
    return ClipEncoder(model, tiny_clip.processor, torch.device("cpu"), torch.float32)


@pytest.fixture(scope="module")
def jpeg_decoder(encoder) -> DeviceJpegDecoder:
    geometry = (encoder.shortest_edge, encoder.crop_height, encoder.crop_width)
    return DeviceJpegDecoder(torch.device("cpu"), *geometry)


@pytest.fixture(scope="module")
def runner_socket(tmp_path_factory, encoder, jpeg_decoder) -> Iterator[Path]:
    """The runner's route, its methods doing what the runner's do (runner.py) with the model."""

    async def handler(method: str, rows) -> np.ndarray:
        if method == "encode_images":  # the runner's batcher stacks requests into a new array
            return encoder.encode_images(rows.copy())
        if method == "encode_tokens":
            return encoder.encode_token_ids(rows)
        crops, _ = jpeg_decoder(rows)
        return encoder.encode_pixels(crops)

    app = DirectCallsMiddleware(PlainTextResponse("BentoML's endpoint", 299), handler)
    socket_path = tmp_path_factory.mktemp("runner") / "runner.sock"
    with serving(app, socket_path):
        yield socket_path


def call(socket_path: Path, method: str, rows):
    async def run():
        client = DirectRunnerClient(f"file://{socket_path}")
        try:
            return await getattr(client, method)(rows)
        finally:
            await client.close()

    return asyncio.run(run())


def test_images_are_encoded_as_by_the_model_itself(runner_socket, encoder):
    shape = (3, encoder.crop_height, encoder.crop_width, 3)
    pixels = np.random.default_rng(0).integers(0, 256, shape, dtype=np.uint8)
    answer = call(runner_socket, "encode_images", pixels)
    np.testing.assert_array_equal(answer, encoder.encode_images(pixels))


def test_prompts_are_encoded_as_by_the_model_itself(runner_socket, encoder):
    token_ids = encoder.tokenizer(["a photo of a cat", "a dog", ""])["input_ids"]
    answer = call(runner_socket, "encode_tokens", token_ids)
    np.testing.assert_array_equal(answer, encoder.encode_token_ids(token_ids))


def test_jpegs_are_decoded_and_encoded_as_by_the_runner(runner_socket, encoder, jpeg_decoder):
    jpegs = []
    for seed, size in enumerate([(64, 48), (40, 90), (64, 48)]):
        saved = io.BytesIO()
        photo_like(*size, seed=seed).save(saved, "JPEG", quality=90)
        jpegs.append(saved.getvalue())
    answer = call(runner_socket, "encode_jpegs", jpegs)
    crops, decoded = jpeg_decoder(jpegs)
    assert all(decoded)
    np.testing.assert_array_equal(answer, encoder.encode_pixels(crops))


def test_a_large_batch_arrives_whole(runner_socket, encoder):
    """Bodies of several MB arrive in many reads; the route joins them."""
    shape = (32, encoder.crop_height, encoder.crop_width, 3)
    pixels = np.random.default_rng(1).integers(0, 256, shape, dtype=np.uint8)
    answer = call(runner_socket, "encode_images", pixels)
    np.testing.assert_array_equal(answer, encoder.encode_images(pixels))


def test_the_runners_503_is_overloaded_as_with_bentomls_client(tmp_path):
    async def full(method: str, rows) -> np.ndarray:
        raise ServiceUnavailable("the model's queue is full: queued 5.1 s")

    app = DirectCallsMiddleware(PlainTextResponse("unused"), full)
    with serving(app, tmp_path / "full.sock"):
        with pytest.raises(ServiceUnavailable) as caught:
            call(tmp_path / "full.sock", "encode_tokens", [[1, 2]])
    assert runner_overloaded(caught.value)
    assert "queue is full" in str(caught.value)


@pytest.mark.parametrize(("every", "connections"), [(0, 1), (3, 3), (1, 7)])
def test_every_so_many_calls_a_connection_is_closed_and_the_next_call_opens_one(
    tmp_path, every, connections
):
    """Seven calls in turn: with a close every third call, on connections of 3, 3 and 1 calls
    (each new one accepted by whichever runner worker is free first, where there are several)."""
    servers: list[uvicorn.Server] = []
    seen: dict[int, object] = {}  # uvicorn's protocol object of every connection open at a call
    calls: list[str] = []

    async def handler(method: str, rows) -> np.ndarray:
        calls.append(method)
        seen.update(
            (id(connection), connection) for connection in servers[0].server_state.connections
        )
        return np.zeros((len(rows), 4), np.float32)

    app = DirectCallsMiddleware(PlainTextResponse("unused"), handler)

    async def seven_calls(socket_path: Path) -> None:
        client = DirectRunnerClient(f"file://{socket_path}", calls_per_connection=every)
        try:
            for _ in range(7):
                assert (await client.encode_tokens([[1, 2]])).shape == (1, 4)
        finally:
            await client.close()

    with serving(app, tmp_path / "runner.sock") as server:
        servers.append(server)
        asyncio.run(seven_calls(tmp_path / "runner.sock"))
    assert len(calls) == 7 and len(seen) == connections


def test_connections_are_dealt_out_anew_only_among_several_runner_workers():
    assert calls_per_connection(1) == 0
    assert calls_per_connection(2) == calls_per_connection(8) == 8


def test_a_runner_that_is_gone_is_a_connection_error_which_is_retried(tmp_path):
    """runner_calls.resilient retries aiohttp's connection errors once."""
    with pytest.raises(aiohttp.ClientConnectionError):
        call(tmp_path / "nobody-listens.sock", "encode_tokens", [[1, 2]])


@pytest.mark.parametrize(
    ("url", "address"),
    [
        ("file:///tmp/bentoml/runner.sock", ("http://127.0.0.1", "/tmp/bentoml/runner.sock")),
        ("file:///tmp/a%20dir/runner.sock", ("http://127.0.0.1", "/tmp/a dir/runner.sock")),
        ("tcp://127.0.0.1:3001", ("http://127.0.0.1:3001", None)),
        ("http://runner.internal:3000/", ("http://runner.internal:3000", None)),
    ],
)
def test_the_runner_is_reached_where_bentoml_says_it_listens(url, address):
    assert runner_address(url) == address
