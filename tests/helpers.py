"""Test helpers: generated images, a local image host, and a real `bentoml serve` process."""

from __future__ import annotations

import base64
import http.server
import io
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
from PIL import Image

REPO_ROOT = Path(__file__).resolve().parent.parent

SEED_CLASSES = [
    ["person", 1],
    ["bag", 0],
    ["person with a bag", 1],
    ["woman riding a horse", 1],
    ["woman with a bag", 1],
    ["woman with black shirt and a bag", 1],
]


def photo_like(width: int, height: int, seed: int) -> Image.Image:
    """A deterministic image with smooth gradients and noise, so embeddings differ per seed."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    base = rng.uniform(0, 255, size=3)
    freq = rng.uniform(0.005, 0.05, size=3)
    channels = [127 + 120 * np.sin(x * freq[c] + y * freq[(c + 1) % 3] + base[c]) for c in range(3)]
    pixels = np.stack(channels, axis=-1) + rng.normal(0, 12, size=(height, width, 3))
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8), "RGB")


def encode(image: Image.Image, fmt: str = "PNG", **save_args: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **save_args)
    return buffer.getvalue()


def as_base64(image: Image.Image, fmt: str = "PNG") -> str:
    return base64.b64encode(encode(image, fmt)).decode()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: object) -> None:  # noqa: A002
        pass

    def do_GET(self) -> None:  # noqa: N802
        if self.path.startswith("/status/"):
            code = int(self.path.rsplit("/", 1)[1])
            self.send_response(code)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        super().do_GET()


@contextmanager
def image_host(directory: Path) -> Iterator[str]:
    """A real HTTP server on 127.0.0.1 serving `directory`; `/status/N` answers status N."""

    def handler(*args: object, **kwargs: object) -> _QuietHandler:
        return _QuietHandler(*args, directory=str(directory), **kwargs)

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


@dataclass
class ServedBento:
    url: str
    process: subprocess.Popen
    log_path: Path

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


def wait_until_ready(url: str, process: subprocess.Popen, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"bentoml serve exited with {process.returncode}")
        try:
            if httpx.get(f"{url}/ping", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    raise TimeoutError(f"{url}/ping not ready after {timeout_s} s")


@contextmanager
def bentoml_serve(bentoml_home: Path, log_path: Path, **env: str) -> Iterator[ServedBento]:
    """`bentoml serve service:ClipService` as a real subprocess on a free loopback port."""
    port = free_port()
    full_env = {
        **os.environ,
        "BENTOML_HOME": str(bentoml_home),
        "CLIP_PORT": str(port),
        "BENTOML_DO_NOT_TRACK": "true",
        **env,
    }
    bentoml_cli = Path(sys.executable).with_name("bentoml")
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            [str(bentoml_cli), "serve", "service:ClipService", "--host", "127.0.0.1"],
            cwd=REPO_ROOT,
            env=full_env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until_ready(url, process, timeout_s=120)
        yield ServedBento(url=url, process=process, log_path=log_path)
    finally:
        stop_process_group(process)


def stop_process_group(process: subprocess.Popen, timeout_s: float = 30) -> None:
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
