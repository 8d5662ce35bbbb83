"""Test helpers: generated images, a local image host, and a real `bentoml serve` process."""

from __future__ import annotations

import base64
import contextlib
import gzip
import http.server
import io
import json
import os
import re
import select
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx
import numpy as np
import psutil
import simplejpeg
import uvicorn
from PIL import Image

from clip_runner.model.resample import resized_size
from clip_runner.web.schemas import SEED_CLASSES as SEED_CLASSES  # re-exported for the tests

if TYPE_CHECKING:  # scripts/broken_jpegs.py runs on the GPU machine, which has no pytest
    import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent


class FakeClock:
    """A clock the test moves by hand (`now`), for code that takes a clock to read."""

    def __init__(self, now: float = 100.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def python_output(code: str, **options: Any) -> str:
    """What `python -c code` prints, run from the repository in a process of its own (a fresh
    interpreter: its imports, limits and sockets are its own); fails where the code fails."""
    return subprocess.run(
        [sys.executable, "-c", code],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        check=True,
        **options,
    ).stdout


def photo_like(width: int, height: int, seed: int) -> Image.Image:
    """A deterministic image with smooth gradients and noise, so embeddings differ per seed."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    base = rng.uniform(0, 255, size=3)
    freq = rng.uniform(0.005, 0.05, size=3)
    channels = [127 + 120 * np.sin(x * freq[c] + y * freq[(c + 1) % 3] + base[c]) for c in range(3)]
    pixels = np.stack(channels, axis=-1) + rng.normal(0, 12, size=(height, width, 3))
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8), "RGB")


def pillow_resize_and_crop(image: Image.Image, edge: int, crop_h: int, crop_w: int) -> np.ndarray:
    """What CLIPImageProcessor does: Pillow's bicubic resize of the whole image, center crop
    (zero padding where the crop is larger, an odd pixel of it before): what both exact resizes
    must equal (tests/images/test_loading.py holds it to the processor itself)."""
    new_w, new_h = resized_size(*image.size, edge)
    resized = np.asarray(image.resize((new_w, new_h), Image.Resampling.BICUBIC))
    out_w, out_h = min(crop_w, new_w), min(crop_h, new_h)
    left, top = (new_w - out_w) // 2, (new_h - out_h) // 2
    canvas = np.zeros((crop_h, crop_w, 3), dtype=np.uint8)
    pad_top, pad_left = (crop_h - out_h + 1) // 2, (crop_w - out_w + 1) // 2  # odd: 1 more
    canvas[pad_top : pad_top + out_h, pad_left : pad_left + out_w] = resized[
        top : top + out_h, left : left + out_w
    ]
    return canvas


def encode(image: Image.Image, fmt: str = "PNG", **save_args: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **save_args)
    return buffer.getvalue()


def oriented_exif(image: Image.Image, orientation: int) -> bytes:
    """`image`'s EXIF data with this orientation tag: how to turn the stored pixels for display
    (6: a phone held upright stores them turned a quarter)."""
    exif = image.getexif()
    exif[0x0112] = orientation
    return exif.tobytes()


def with_preview(image: Image.Image, preview: Image.Image, **save_args: object) -> bytes:
    """`image` as many cameras store a photo: a JPEG with a preview image after it, named in a
    Multi-Picture segment; Pillow opens it as an MPO whose first image is `image`."""
    return encode(image, "MPO", save_all=True, append_images=[preview], **save_args)


def ycck_jpeg(image: Image.Image, quality: int = 90) -> bytes:
    """`image` as a YCCK JPEG: libjpeg-turbo's encoding of CMYK pixels (through simplejpeg), as
    some prepress tools store CMYK; Pillow writes Adobe's inverted CMYK instead. Pillow opens
    both as CMYK."""
    return simplejpeg.encode_jpeg(np.asarray(image.convert("CMYK")), quality, "CMYK")


def pillows_own(blob: bytes) -> np.ndarray:
    """(H, W, 3): Pillow decoding the image into its own memory, its pixels copied out: what
    every faster decode of the same bytes must equal."""
    with Image.open(io.BytesIO(blob)) as image:
        return np.asarray(image.convert("RGB"))


def as_rgb(pixels: np.ndarray) -> np.ndarray:
    """(H, W, 3) of pixels as Pillow stores them, (H, W, 4) RGB with a padding byte or (H, W)
    greyscale: what `pillows_own` gives for the same image (Pillow's RGB of a greyscale image
    repeats its channel)."""
    return pixels[..., :3] if pixels.ndim == 3 else np.repeat(pixels[..., None], 3, axis=2)


JPEG_END_MARKER = b"\xff\xd9"


def damaged_copy(
    original: bytes,
    rng: np.random.Generator,
    *,
    most_overwrites: int = 8,
    spare_head: int = 0,
    end_marker: bool = True,
) -> bytes:
    """`original` with 1 to `most_overwrites` bytes overwritten at random places past its first
    `spare_head`, and half the time also cut short at a random place past them, the JPEG end
    marker appended to the cut when `end_marker` (so that the forwarding check still accepts the
    file). Deterministic for a seeded `rng`: a broken file named by its seed and number can be
    made again."""
    changed = bytearray(original)
    for _ in range(int(rng.integers(1, most_overwrites + 1))):
        changed[int(rng.integers(spare_head, len(changed)))] = int(rng.integers(256))
    if rng.random() < 0.5:
        changed = changed[: int(rng.integers(max(spare_head, 2), len(changed) + 1))]
        if end_marker:
            changed += JPEG_END_MARKER
    return bytes(changed)


def as_base64(image: Image.Image, fmt: str = "PNG") -> str:
    return base64.b64encode(encode(image, fmt)).decode()


def assert_same_answer(first: object, second: object, tolerance: float = 1e-5) -> None:
    """Two answers to the same request: equal in shape, labels and order, their numbers within
    `tolerance` (that of the checks against the reference, tests/reference.py). Requests may be
    served by different API workers, with the prompts encoded in other batches, so scores can
    differ in the 7th digit (float error, not a different answer)."""
    if isinstance(first, float) or isinstance(second, float):
        assert abs(first - second) <= tolerance, (first, second)
    elif isinstance(first, dict) and isinstance(second, dict):
        assert first.keys() == second.keys(), (first, second)
        for key in first:
            assert_same_answer(first[key], second[key], tolerance)
    elif isinstance(first, list) and isinstance(second, list):
        assert len(first) == len(second), (first, second)
        for one, other in zip(first, second, strict=True):
            assert_same_answer(one, other, tolerance)
    else:
        assert first == second


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextmanager
def uvicorn_on_loopback(app: Any, protocol: str) -> Iterator[int]:
    """A real uvicorn server (the one BentoML runs) serving the ASGI `app` on a free loopback
    port in a thread, parsing HTTP with `protocol` (`h11` or `httptools`): its port."""
    port = free_port()
    config = uvicorn.Config(app, host="127.0.0.1", port=port, http=protocol, log_level="error")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        assert time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.02)
    try:
        yield port
    finally:
        server.should_exit = True
        thread.join(10)


PUBLIC_HOST = "127.0.0.2"  # plays a public image host; fetch clients in tests allow only it

# The `guarded` server (conftest): an API key, and small abuse bounds the tests can reach.
GUARD_KEY = "test-key-0123456789abcdef"
GUARD_SETTINGS = {
    # The bounds are per API worker: with one, a test's requests all meet the same bound.
    "CLIP_API_WORKERS": "1",
    "CLIP_API_KEY": GUARD_KEY,
    "CLIP_MAX_CONCURRENCY": "4",
    "CLIP_BODY_TIMEOUT_S": "2",
    "CLIP_HEADER_TIMEOUT_S": "2",
    "CLIP_MAX_WAITING_BODIES": "12",
    "CLIP_MAX_REQUEST_PIXELS": "1000000",
    "CLIP_MAX_DECODING_PIXELS": "2000000",
    "CLIP_ACCESS_LOG": "off",
    # The API workers call the runner through BentoML's client here, in the wire format on
    # `served`: both paths stay under the served tests.
    "CLIP_DIRECT_RUNNER_CALLS": "off",
}
GUARD_AUTH = {"Authorization": f"Bearer {GUARD_KEY}"}


class _ImageHostHandler(http.server.SimpleHTTPRequestHandler):
    """Static files plus `/status/N`, `/redirect?to=URL`, `/slow?s=N&to=URL` (that redirect
    after N seconds), `/loop`, `/hang`, `/endless`, `/informational-flood` (`100 Continue`
    without end), `/tiny-chunks` (one byte per chunk), `/gzip`
    (an image compressed twice, sent as `Content-Encoding: gzip, gzip`) and
    `/redirect-gzip?to=URL` (a redirect whose body claims gzip but is none: a client that reads
    it fails to decode it)."""

    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002
        self.server.access_log.append(self.path)  # type: ignore[attr-defined]

    def do_GET(self) -> None:  # noqa: N802
        path, _, query = self.path.partition("?")
        if path.startswith("/status/"):
            self.send_response(int(path.rsplit("/", 1)[1]))
            self.send_header("Content-Length", "0")
            self.end_headers()
        elif path == "/redirect":
            self.send_response(302)
            self.send_header("Location", query.removeprefix("to="))
            self.send_header("Content-Length", "0")
            self.end_headers()
        elif path == "/slow":
            wait_s, _, target = query.removeprefix("s=").partition("&to=")
            time.sleep(float(wait_s))
            self.send_response(302)
            self.send_header("Location", target)
            self.send_header("Content-Length", "0")
            self.end_headers()
        elif path == "/redirect-gzip":
            body = b"not gzip at all"
            self.send_response(302)
            self.send_header("Location", query.removeprefix("to="))
            self.send_header("Content-Encoding", "gzip")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
        elif path == "/loop":
            self.send_response(302)
            self.send_header("Location", "/loop")
            self.send_header("Content-Length", "0")
            self.end_headers()
        elif path == "/gzip":
            body = gzip.compress(gzip.compress(b"\x89PNG" + bytes(1_000_000)))
            self.send_response(200)
            self.send_header("Content-Type", "image/png")
            self.send_header("Content-Encoding", "gzip, gzip")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
        elif path == "/hang":
            self.log_message("%s", "hang")
            self._wait_for_client_to_leave()
        elif path == "/endless":
            self.log_message("%s", "endless")
            self.send_response(200)
            self.send_header("Content-Type", "image/png")
            self.end_headers()
            try:
                for _ in range(100_000):  # bounded: ~6.5 GB at most, never reached in tests
                    self.wfile.write(b"\x89PNG" + b"\0" * 65_532)
            except OSError:
                pass
        elif path == "/informational-flood":  # `100 Continue`s and never a final answer
            self.log_message("%s", "informational-flood")
            try:
                for _ in range(2000):  # bounded: 50 MB at most, never reached in tests
                    self.wfile.write(b"HTTP/1.1 100 Continue\r\n\r\n" * 1000)
            except OSError:
                pass
        elif path == "/tiny-chunks":  # a PNG's bytes, one per HTTP chunk, 200 kB at most
            self.send_response(200)
            self.send_header("Content-Type", "image/png")
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            try:
                for byte in (b"\x89PNG" + bytes(200_000))[:200_000]:
                    self.wfile.write(b"1\r\n" + bytes([byte]) + b"\r\n")
                self.wfile.write(b"0\r\n\r\n")
            except OSError:
                pass
        else:
            super().do_GET()

    def _wait_for_client_to_leave(self, limit_s: float = 60) -> None:
        """Never answer; log `hang-closed <monotonic time>` when the client closes the socket."""
        deadline = time.monotonic() + limit_s
        while time.monotonic() < deadline and not self.server.hang_released.is_set():  # type: ignore[attr-defined]
            readable, _, _ = select.select([self.connection], [], [], 0.05)
            if readable and not self.connection.recv(1, socket.MSG_PEEK):
                self.server.closed_at.append(time.monotonic())  # type: ignore[attr-defined]
                return


class _ImageHostServer(http.server.ThreadingHTTPServer):
    daemon_threads = True
    # As a public host's: socketserver's 5 left connections past it waiting for a SYN resent.
    request_queue_size = 256

    def __init__(self, address: tuple[str, int], directory: Path) -> None:
        self.access_log: list[str] = []
        self.closed_at: list[float] = []
        self.hang_released = threading.Event()

        def handler(*args: object, **kwargs: object) -> _ImageHostHandler:
            return _ImageHostHandler(*args, directory=str(directory), **kwargs)

        super().__init__(address, handler)


@dataclass
class ImageHost:
    url: str
    server: _ImageHostServer

    @property
    def access_log(self) -> list[str]:
        return self.server.access_log


@contextmanager
def image_host(directory: Path, host: str = PUBLIC_HOST) -> Iterator[ImageHost]:
    """A real HTTP server on a loopback address serving `directory` (see `_ImageHostHandler`)."""
    server = _ImageHostServer((host, 0), directory)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield ImageHost(f"http://{host}:{server.server_address[1]}", server)
    finally:
        server.hang_released.set()
        server.shutdown()
        server.server_close()


class ConnectionCounter:
    """A TCP listener that only counts connections: the address SSRF must never reach."""

    def __init__(self, host: str) -> None:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.sock = socket.socket(family, socket.SOCK_STREAM)
        self.sock.bind((host, 0))
        self.sock.listen(16)
        self.sock.settimeout(0.2)
        self.port = self.sock.getsockname()[1]
        self.accepted = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                connection, _ = self.sock.accept()
            except OSError:
                continue
            self.accepted += 1
            connection.close()

    def close(self) -> None:
        self._stop.set()
        self._thread.join(2)
        self.sock.close()


@dataclass
class ServedBento:
    url: str
    process: subprocess.Popen
    log_path: Path

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_for_log(self, *lines: str, within_s: float = 60) -> str:
        """The log once it holds every one of `lines`; fails after `within_s`.

        /ping turns 200 once one runner worker answers, so a second worker may still be loading.
        """
        deadline = time.monotonic() + within_s
        while True:
            log = self.log()
            missing = [line for line in lines if line not in log]
            if not missing:
                return log
            if time.monotonic() > deadline:
                raise AssertionError(f"not in the server log after {within_s} s: {missing}")
            time.sleep(0.2)

    def runner_processes(self) -> list[psutil.Process]:
        """The CLIPRunner worker processes under this server."""
        return self._workers("clip_runner")

    def api_processes(self) -> list[psutil.Process]:
        """The API worker processes under this server."""
        return self._workers("clip_service")

    def _workers(self, service: str) -> list[psutil.Process]:
        return [
            child
            for child in psutil.Process(self.process.pid).children(recursive=True)
            if f"--service-name {service} " in " ".join(child.cmdline())
        ]


def raw_exchange(port: int, request: bytes) -> bytes:
    """Everything a loopback server answers to `request` sent as is (no HTTP client to tidy
    it), until it closes the connection."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(request)
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    return answer


def in_progress(metrics: str, endpoint: str) -> float:
    """`bentoml_service_request_in_progress` of `endpoint` on a /metrics page, all workers."""
    pattern = rf'bentoml_service_request_in_progress\{{[^}}]*endpoint="{endpoint}"[^}}]*\}} (\S+)'
    return sum(float(value) for value in re.findall(pattern, metrics))


def histogram(served: ServedBento, name: str) -> tuple[float, float]:
    """(count, sum) of a Prometheus histogram on /metrics, summed over its label sets."""
    text = httpx.get(f"{served.url}/metrics", timeout=10).text

    def value(pattern: str) -> float:
        found = re.findall(pattern, text, flags=re.MULTILINE)
        return sum(float(v) for v in found)

    return (
        value(rf"^{name}_count(?:{{[^}}]*}})? (\S+)$"),
        value(rf"^{name}_sum(?:{{[^}}]*}})? (\S+)$"),
    )


def counts_by_result(served: ServedBento, name: str) -> Counter[str]:
    """A Prometheus counter labelled by `result` on /metrics, summed over its other labels."""
    text = httpx.get(f"{served.url}/metrics", timeout=10).text
    pattern = rf'^{name}_total{{[^}}]*result="([^"]+)"[^}}]*}} (\S+)$'
    counts: Counter[str] = Counter()
    for result, value in re.findall(pattern, text, flags=re.MULTILINE):
        counts[result] += float(value)
    return counts


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
def bentoml_serve(
    bentoml_home: Path, log_path: Path, prefix: Sequence[str] = (), **env: str | None
) -> Iterator[ServedBento]:
    """`bentoml serve service:ClipService` as a real subprocess on a free loopback port, run
    through `prefix` (a command that ends by running its arguments) where one is given; `env`
    over the suite's environment, a None taking that variable out.

    Each server gets a BentoML home of its own whose `models` is the suite's store: BentoML clears
    `$BENTOML_HOME/prometheus_multiproc_dir` when a server starts, which would hide the metrics
    of a server already running in a shared home.
    """
    port = free_port()
    home = log_path.parent / f"bentoml-home-{port}"
    home.mkdir()
    (home / "models").symlink_to(bentoml_home / "models", target_is_directory=True)
    full_env = {
        **os.environ,
        "BENTOML_HOME": str(home),
        "CLIP_PORT": str(port),
        "BENTOML_DO_NOT_TRACK": "true",
        **env,
    }
    full_env = {name: value for name, value in full_env.items() if value is not None}
    bentoml_cli = Path(sys.executable).with_name("bentoml")
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            [*prefix, str(bentoml_cli), "serve", "service:ClipService", "--host", "127.0.0.1"],
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


def serve_tiny(
    model: Any,
    bentoml_home: Path,
    factory: pytest.TempPathFactory,
    name: str,
    prefix: Sequence[str] = (),
    **env: str | None,
) -> AbstractContextManager[ServedBento]:
    """`bentoml serve` of the suite's tiny model with these settings (through `prefix`, as
    `bentoml_serve`), image URLs allowed to the stand-in public host; its log in a temporary
    folder called `name`."""
    return bentoml_serve(
        bentoml_home,
        factory.mktemp(name) / "serve.log",
        prefix,
        CLIP_MODEL_TAG=str(model.tag),
        CLIP_FETCH_ALLOW=f"{PUBLIC_HOST}/32",
        **env,
    )


def stop_process_group(process: subprocess.Popen, timeout_s: float = 30) -> None:
    """SIGTERM to the server's process group; SIGKILL if its supervisor has not exited within
    `timeout_s`. Then SIGKILL to any of its workers still alive (BentoML starts each in a
    process group of its own): one whose event loop was stuck outlived the supervisor's exit
    and kept a core busy for the rest of the run."""
    workers: list[psutil.Process] = []
    with contextlib.suppress(psutil.NoSuchProcess):
        workers = psutil.Process(process.pid).children(recursive=True)
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
    for worker in workers:  # the usual case: all gone already
        with contextlib.suppress(psutil.NoSuchProcess):
            worker.kill()  # psutil checks that the pid is still this process


def wait_for_ping(url: str, status: int, within_s: float) -> list[float]:
    """Poll /ping until it answers `status`; returns each ping's latency. Fails after `within_s`."""
    latencies: list[float] = []
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        started = time.monotonic()
        response = httpx.get(f"{url}/ping", timeout=5)
        latencies.append(time.monotonic() - started)
        if response.status_code == status:
            return latencies
        time.sleep(0.1)
    raise AssertionError(f"/ping did not answer {status} within {within_s} s")


# ---- AWS S3 (moto's server on loopback) ----

S3_BUCKET = "clip-images"  # the endpoint's role may read it
S3_PRIVATE_BUCKET = "clip-private"  # it may not
S3_REGION = "us-east-1"


@dataclass
class MotoS3:
    """moto's S3 + IAM server on 127.0.0.1, with an IAM user standing in for an endpoint role.

    The user may `s3:GetObject` in `S3_BUCKET` only. moto checks signatures and IAM policies only
    while `enforced_auth()` is active (it is process-wide, so it is switched on per test).
    """

    url: str
    access_key_id: str
    secret_access_key: str

    def client(self, service: str = "s3") -> object:
        import boto3

        return boto3.client(
            service,
            region_name=S3_REGION,
            endpoint_url=self.url,
            aws_access_key_id="testing",
            aws_secret_access_key="testing",
        )

    def put(self, key: str, data: bytes, bucket: str = S3_BUCKET) -> str:
        self.client().put_object(Bucket=bucket, Key=key, Body=data)  # type: ignore[attr-defined]
        return f"s3://{bucket}/{key}"

    def server_env(self) -> dict[str, str]:
        """What a service needs to read S3 here: the user's keys and the endpoint override."""
        return {
            "AWS_ENDPOINT_URL_S3": self.url,
            "AWS_ACCESS_KEY_ID": self.access_key_id,
            "AWS_SECRET_ACCESS_KEY": self.secret_access_key,
            "AWS_DEFAULT_REGION": S3_REGION,
            "AWS_EC2_METADATA_DISABLED": "true",
            "AWS_CONFIG_FILE": os.devnull,
            "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
        }

    @contextmanager
    def enforced_auth(self) -> Iterator[None]:
        """moto's documented switch: from now on, requests are authenticated and authorised."""
        httpx.post(f"{self.url}/moto-api/reset-auth", content=b"0").raise_for_status()
        try:
            yield
        finally:
            httpx.post(f"{self.url}/moto-api/reset-auth", content=b"inf").raise_for_status()


@contextmanager
def moto_s3() -> Iterator[MotoS3]:
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    store = MotoS3(f"http://{host}:{port}", "", "")
    try:
        iam = store.client("iam")
        iam.create_user(UserName="clip-endpoint")  # type: ignore[attr-defined]
        policy = {
            "Version": "2012-10-17",
            "Statement": [
                {
                    "Effect": "Allow",
                    "Action": "s3:GetObject",
                    "Resource": f"arn:aws:s3:::{S3_BUCKET}/*",
                }
            ],
        }
        iam.put_user_policy(  # type: ignore[attr-defined]
            UserName="clip-endpoint", PolicyName="read-images", PolicyDocument=json.dumps(policy)
        )
        key = iam.create_access_key(UserName="clip-endpoint")["AccessKey"]  # type: ignore[attr-defined]
        store.access_key_id, store.secret_access_key = key["AccessKeyId"], key["SecretAccessKey"]
        for bucket in (S3_BUCKET, S3_PRIVATE_BUCKET):
            store.client().create_bucket(Bucket=bucket)  # type: ignore[attr-defined]
        yield store
    finally:
        server.stop()
