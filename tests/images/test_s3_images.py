"""s3:// image sources against moto's S3 on 127.0.0.1: bytes, limits, and the JSON errors."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import http.server
import io
import os
import socket
import struct
import threading
import time
import zlib
from collections.abc import Iterator
from typing import Any

import pytest
from botocore.response import StreamingBody

from clip_runner.errors import ImageError
from clip_runner.images import s3_images
from clip_runner.images.fetch import FetchLimits
from clip_runner.images.loading import ImageGeometry, ImageLimits, load_images, prepare_image
from clip_runner.images.s3_images import fetch_s3, is_s3_url, parse_s3_url, read_object
from tests.helpers import S3_PRIVATE_BUCKET, MotoS3, encode, photo_like

LIMITS = FetchLimits(max_bytes=200_000, timeout_s=5, connect_timeout_s=2)
GEOMETRY = ImageGeometry(shortest_edge=224, crop_height=224, crop_width=224)


@pytest.fixture
def s3_env(monkeypatch: pytest.MonkeyPatch, s3_store: MotoS3) -> MotoS3:
    """The default credential chain and AWS_ENDPOINT_URL_S3 pointed at moto, as on a server."""
    for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL", "AWS_REGION"):
        monkeypatch.delenv(name, raising=False)
    for name, value in s3_store.server_env().items():
        monkeypatch.setenv(name, value)
    clear = s3_images.CLIENTS.clear
    clear()
    yield s3_store
    clear()


def fetch(url: str, limits: FetchLimits = LIMITS) -> bytes:
    return asyncio.run(fetch_s3(url, 3, limits))


def test_s3_urls_are_recognised_and_split():
    assert is_s3_url("s3://b/k") and is_s3_url("S3://b/k") and not is_s3_url("https://b/k")
    assert parse_s3_url("s3://bucket/a/b c.jpg", 0) == ("bucket", "a/b c.jpg")
    for bad in ("s3://bucket", "s3://bucket/", "s3:///key"):
        with pytest.raises(ImageError, match="not an s3://bucket/key URL"):
            parse_s3_url(bad, 0)


def test_reads_the_object_through_the_endpoint_override(s3_env):
    data = encode(photo_like(64, 48, seed=1))
    url = s3_env.put("unit/photo.png", data)
    assert fetch(url) == data


def test_missing_object_and_bucket_name_the_image(s3_env):
    with pytest.raises(ImageError) as missing:
        fetch("s3://clip-images/unit/nothing-here.png")
    assert missing.value.error_type == "image_not_found" and missing.value.index == 3
    assert "images[3]: s3://clip-images/unit/nothing-here.png does not exist" in str(missing.value)
    with pytest.raises(ImageError, match="does not exist"):
        fetch("s3://no-such-bucket-here/x.png")


def test_objects_over_the_byte_limit_are_refused(s3_env):
    url = s3_env.put("unit/big.bin", b"\0" * (LIMITS.max_bytes + 1))
    with pytest.raises(ImageError, match="larger than the 200000-byte limit"):
        fetch(url)


def test_empty_objects_and_bad_bucket_names_are_refused(s3_env):
    with pytest.raises(ImageError, match="is empty"):
        fetch(s3_env.put("unit/empty.png", b""))
    with pytest.raises(ImageError, match="could not read"):
        fetch("s3://Not_A_Valid_Bucket!/x.png")
    with pytest.raises(ImageError, match="could not read") as long_name:  # botocore quotes it
        fetch(f"s3://{'b' * 100_000}/x.png")
    assert len(long_name.value.message) < 600


def test_access_denied_by_the_role_policy(s3_env):
    allowed = s3_env.put("unit/ok.png", b"png")
    denied = s3_env.put("unit/secret.png", b"png", bucket=S3_PRIVATE_BUCKET)
    with s3_env.enforced_auth():
        assert fetch(allowed) == b"png"  # the user's policy allows this bucket
        with pytest.raises(ImageError) as error:
            fetch(denied)
    assert error.value.error_type == "forbidden_url"
    assert "access to s3://clip-private/unit/secret.png denied (AccessDenied)" in str(error.value)


def test_no_credentials_is_a_clear_error(s3_env, monkeypatch):
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.delenv(name)
    s3_images.CLIENTS.clear()
    with pytest.raises(ImageError, match="the server has no AWS credentials"):
        fetch(s3_env.put("unit/nocreds.png", b"png"))


def test_the_deadline_bounds_a_slow_read(s3_env):
    class SlowStream(io.RawIOBase):  # what urllib3 hands botocore: each read waits
        def read1(self, _: int) -> bytes:
            time.sleep(0.2)
            return b"x"

    class SlowClient:
        def get_object(self, **_: Any) -> dict[str, Any]:
            return {"Body": StreamingBody(SlowStream(), 10), "ContentLength": 10}

    limits = FetchLimits(max_bytes=1000, timeout_s=0.5, connect_timeout_s=0.5)
    with pytest.raises(TimeoutError):
        read_object(SlowClient(), "s3://b/k", 0, limits)
    with pytest.raises(ImageError, match="timed out after 0.5 s"):
        asyncio.run(fetch_s3("s3://b/k", 0, limits, SlowClient()))


def test_load_images_fetches_s3_images_concurrently(s3_env, monkeypatch):
    """Several s3:// images of a request are read at once (bounded by CLIP_FETCH_CONCURRENCY),
    and each gives the same pixels as the same bytes sent inline."""
    images = [encode(photo_like(80 + i, 60, seed=10 + i), "JPEG") for i in range(6)]
    urls = [s3_env.put(f"unit/concurrent-{i}.jpg", data) for i, data in enumerate(images)]
    real = s3_images.s3_client(LIMITS.connect_timeout_s, LIMITS.timeout_s)
    in_flight, peak, lock = 0, 0, threading.Lock()
    overlapped = threading.Event()

    class CountingClient:
        def get_object(self, **params: Any) -> dict[str, Any]:
            nonlocal in_flight, peak
            with lock:
                in_flight += 1
                peak = max(peak, in_flight)
                if in_flight >= 2:
                    overlapped.set()
            try:
                # Held until a second fetch is under way, however slowly a busy machine starts
                # it; fetched one at a time, each would wait out the 5 s and peak stay 1.
                overlapped.wait(5)
                return real.get_object(**params)
            finally:
                with lock:
                    in_flight -= 1

    monkeypatch.setattr(s3_images, "s3_client", lambda *_: CountingClient())
    limits = ImageLimits(LIMITS, max_pixels=10_000_000, fetch_concurrency=4)
    pixels = asyncio.run(load_images(urls, None, GEOMETRY, limits))  # type: ignore[arg-type]
    assert 2 <= peak <= 4
    for index, data in enumerate(images):
        expected = prepare_image(data, index, GEOMETRY, limits.max_pixels)
        assert (pixels[index] == expected).all()


@pytest.mark.parametrize(
    ("url", "bucket", "key"),
    [
        (
            "s3://arn:aws:s3:us-east-1:123456789012:accesspoint/my-ap/photos/cat.jpg",
            "arn:aws:s3:us-east-1:123456789012:accesspoint/my-ap",
            "photos/cat.jpg",
        ),
        (
            "s3://arn:aws:s3-object-lambda:eu-west-1:123456789012:accesspoint/olap/a/b.png",
            "arn:aws:s3-object-lambda:eu-west-1:123456789012:accesspoint/olap",
            "a/b.png",
        ),
        (
            "s3://arn-bucket/arn:aws:s3:x:1:accesspoint/k",
            "arn-bucket",
            "arn:aws:s3:x:1:accesspoint/k",
        ),
    ],
)
def test_access_point_arns_keep_their_slash_in_the_bucket(url, bucket, key):
    assert parse_s3_url(url, 0) == (bucket, key)


@pytest.mark.parametrize(
    "url",
    [
        "s3://arn:aws:s3:us-east-1:123456789012:accesspoint/my-ap",
        "s3://arn:aws:s3:us-east-1:123456789012:accesspoint/my-ap/",
        "s3://arn:aws:s3:us-east-1:123456789012:accesspoint/",
    ],
)
def test_access_point_arns_without_a_key_are_refused(url):
    with pytest.raises(ImageError, match="not an s3://bucket/key URL"):
        parse_s3_url(url, 0)


def test_botocore_sends_an_access_point_read_to_the_access_point(s3_env, monkeypatch):
    """Where botocore's own ARN handling sends the read (answered in process, nothing sent)."""
    monkeypatch.delenv("AWS_ENDPOINT_URL_S3")  # AWS's own endpoints, as on SageMaker
    import boto3
    from botocore.awsrequest import AWSResponse

    class Body(io.BytesIO):  # what urllib3 hands botocore: a stream read in parts
        def stream(self, **_: Any) -> Iterator[bytes]:
            yield self.getvalue()

    sent: list[str] = []

    def answer(request: Any, **_: Any) -> AWSResponse:
        sent.append(request.url)
        return AWSResponse(request.url, 200, {"content-length": "3"}, Body(b"img"))

    client = boto3.session.Session().client("s3", region_name="us-east-1")
    client.meta.events.register("before-send", answer)
    url = "s3://arn:aws:s3:us-east-1:123456789012:accesspoint/my-ap/photos/cat.jpg"
    assert read_object(client, url, 0, LIMITS) == b"img"
    assert sent == [
        "https://my-ap-123456789012.s3-accesspoint.us-east-1.amazonaws.com/photos/cat.jpg"
    ]


def test_reads_run_on_their_own_threads_not_the_decoders(s3_env):
    """More S3 reads than the event loop's default executor has threads, all stalled: a decode
    on that executor (as `load_images` runs them) still starts at once."""
    stalled = (os.cpu_count() or 1) + 4 + 4  # past asyncio's default min(32, cpus + 4)
    release, reader_threads = threading.Event(), set()

    class StalledClient:
        def get_object(self, **_: Any) -> dict[str, Any]:
            reader_threads.add(threading.current_thread().name)
            release.wait(30)
            raise ImageError(0, "released")

    async def decode_beside_stalled_reads() -> str:
        reads = [
            asyncio.ensure_future(fetch_s3(f"s3://b/k{i}", i, LIMITS, StalledClient()))
            for i in range(min(stalled, s3_images.MAX_POOL_CONNECTIONS))
        ]
        await asyncio.sleep(0.2)
        try:
            async with asyncio.timeout(3):  # the stalled reads' 5 s deadline is not reached
                return await asyncio.to_thread(lambda: threading.current_thread().name)
        finally:
            release.set()
            await asyncio.gather(*reads, return_exceptions=True)

    decoder = asyncio.run(decode_beside_stalled_reads())
    assert not decoder.startswith("clip-s3")
    assert reader_threads and all(name.startswith("clip-s3") for name in reader_threads)


def test_an_s3_that_never_answers_is_tried_twice_and_its_address_kept_from_the_caller(s3_env):
    """botocore's default is three tries of the whole read timeout each; a stalled S3 now holds
    its thread for two tries of half the deadline, and the refusal names no endpoint address."""
    requests, release = [], threading.Event()

    class Silent(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 (http.server's name)
            requests.append(self.path)
            release.wait(30)

        def log_message(self, *_: Any) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Silent)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    endpoint = f"http://127.0.0.1:{server.server_port}"
    try:
        s3_images.CLIENTS.clear()
        os.environ["AWS_ENDPOINT_URL_S3"] = endpoint  # restored by s3_env's monkeypatch
        limits = FetchLimits(max_bytes=1000, timeout_s=1.0, connect_timeout_s=1.0)
        with pytest.raises(ImageError) as refused:
            read_object(None, "s3://clip-images/never.jpg", 2, limits)
    finally:
        release.set()
        server.shutdown()
        server.server_close()
    assert len(requests) == s3_images.ATTEMPTS == 2
    assert "images[2]: could not read s3://clip-images/never.jpg: S3 did not answer" in str(
        refused.value
    )
    assert "127.0.0.1" not in str(refused.value)


@pytest.mark.parametrize(
    ("url", "reason"),
    [
        ("s3://arn:aws-cn:s3:cn-north-1:123456789012:accesspoint/ap/k.jpg", "partition"),
        ("s3://arn:aws:s3::123456789012:accesspoint/mrap/k.jpg", "botocore[crt]"),  # multi-region
    ],
)
def test_an_access_point_botocore_cannot_use_is_the_callers_error(
    s3_env, monkeypatch, caplog, url, reason
):
    """Told as what is wrong with the ARN, not as S3 failing to answer (nothing is sent)."""
    import boto3

    monkeypatch.delenv("AWS_ENDPOINT_URL_S3")
    client = boto3.session.Session().client("s3", region_name="us-east-1")
    client.meta.events.register("before-send", lambda **_: pytest.fail("a request was sent"))
    with pytest.raises(ImageError) as refused:
        read_object(client, url, 1, LIMITS)
    assert f"images[1]: could not read {url}: " in str(refused.value)
    assert reason in str(refused.value) and "did not answer" not in str(refused.value)
    assert not [record for record in caplog.records if record.name == s3_images.__name__]


def test_a_first_burst_of_reads_builds_one_client(s3_env, monkeypatch):
    built = []
    real = s3_images.new_client

    def counting(*args: Any) -> Any:
        built.append(threading.current_thread().name)
        time.sleep(0.2)  # a build's time, for the others to arrive meanwhile
        return real(*args)

    monkeypatch.setattr(s3_images, "new_client", counting)
    url = s3_env.put("unit/burst.png", b"png")

    async def burst() -> list[bytes]:
        return list(await asyncio.gather(*(fetch_s3(url, i, LIMITS) for i in range(16))))

    assert asyncio.run(burst()) == [b"png"] * 16
    assert len(built) == 1 and built[0].startswith("clip-s3")


class FaultyS3(http.server.BaseHTTPRequestHandler):
    """Answers every GET with `status` and an S3 error document of `code`."""

    status, code = 503, "SlowDown"

    def do_GET(self) -> None:  # noqa: N802 (http.server's name)
        body = f"<Error><Code>{self.code}</Code><Message>x</Message></Error>".encode()
        self.send_response(self.status)
        self.send_header("Content-Type", "application/xml")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *_: Any) -> None:
        pass


@contextlib.contextmanager
def s3_endpoint(handler: type[http.server.BaseHTTPRequestHandler]) -> Iterator[None]:
    """The process's S3 client pointed at `handler` on loopback (restored by `s3_env`)."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        s3_images.CLIENTS.clear()
        os.environ["AWS_ENDPOINT_URL_S3"] = f"http://127.0.0.1:{server.server_port}"
        yield
    finally:
        server.shutdown()
        server.server_close()


@pytest.mark.parametrize(
    ("status", "code"),
    [(503, "SlowDown"), (500, "InternalError"), (503, "ServiceUnavailable"), (400, "ExpiredToken")],
)
def test_s3_down_or_throttling_is_a_503_not_the_images_fault(s3_env, monkeypatch, status, code):
    """These had been 422 `invalid_image` (or `forbidden_url`): a Batch Transform job wrote an
    S3 outage into its results as the records' own errors, and realtime callers did not retry."""
    monkeypatch.setattr(FaultyS3, "status", status)
    monkeypatch.setattr(FaultyS3, "code", code)
    with s3_endpoint(FaultyS3), pytest.raises(ImageError) as refused:
        fetch("s3://clip-images/any.jpg")
    assert (refused.value.status, refused.value.error_type) == (503, "s3_unavailable")
    assert f"images[3]: could not read s3://clip-images/any.jpg: S3 is unavailable ({code})" in (
        refused.value.message
    )
    assert refused.value.in_field("inputs").status == 503


def test_an_unreachable_s3_is_a_503(s3_env):
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]  # nothing listens there once closed
    s3_images.CLIENTS.clear()
    os.environ["AWS_ENDPOINT_URL_S3"] = f"http://127.0.0.1:{port}"
    with pytest.raises(ImageError) as refused:
        fetch("s3://clip-images/any.jpg", FetchLimits(1000, timeout_s=5, connect_timeout_s=1))
    assert refused.value.status == 503 and "EndpointConnectionError" in refused.value.message
    assert "127.0.0.1" not in refused.value.message


def test_an_s3_that_never_answers_a_connection_is_a_503_too(s3_env):
    """A firewall, or a VPC with no S3 endpoint, drops the connection: botocore's
    ConnectTimeoutError, which is no EndpointConnectionError, had been a 422 on each line."""
    with socket.socket() as full:
        full.bind(("127.0.0.1", 0))
        full.listen(0)
        port = full.getsockname()[1]
        waiting = [socket.socket() for _ in range(3)]  # fill its backlog: later SYNs are dropped
        for queued in waiting:
            queued.setblocking(False)
            queued.connect_ex(("127.0.0.1", port))
        try:
            s3_images.CLIENTS.clear()
            os.environ["AWS_ENDPOINT_URL_S3"] = f"http://127.0.0.1:{port}"
            limits = FetchLimits(1000, timeout_s=5, connect_timeout_s=0.5)
            with pytest.raises(ImageError) as refused:
                fetch("s3://clip-images/any.jpg", limits)
        finally:
            for queued in waiting:
                queued.close()
    assert refused.value.status == 503, refused.value.message
    assert "ConnectTimeoutError" in refused.value.message
    assert "127.0.0.1" not in refused.value.message


def test_waiting_for_a_reader_thread_does_not_count_against_the_deadline(s3_env):
    """More reads than threads, each answered by S3 well within the deadline: the reads past the
    64th had timed out waiting for a thread (half of a 64-line mini-batch of 8 images each)."""

    class SteadyClient:
        def get_object(self, **_: Any) -> dict[str, Any]:
            time.sleep(0.6)
            return {"Body": StreamingBody(io.BytesIO(b"image"), 5), "ContentLength": 5}

    limits = FetchLimits(max_bytes=1000, timeout_s=1.0, connect_timeout_s=0.5)
    reads = s3_images.MAX_POOL_CONNECTIONS + 6

    async def read_all() -> list[bytes]:
        return await asyncio.gather(
            *(fetch_s3(f"s3://b/k{i}", i, limits, SteadyClient()) for i in range(reads))
        )

    assert asyncio.run(read_all()) == [b"image"] * reads


class TricklingS3(http.server.BaseHTTPRequestHandler):
    """Promises 1,000 bytes and sends one every 0.2 s: each within any read timeout."""

    def do_GET(self) -> None:  # noqa: N802 (http.server's name)
        self.send_response(200)
        self.send_header("Content-Length", "1000")
        self.end_headers()
        with contextlib.suppress(OSError):
            for _ in range(1000):
                self.wfile.write(b"x")
                self.wfile.flush()
                time.sleep(0.2)

    def log_message(self, *_: Any) -> None:
        pass


def test_an_s3_trickling_bytes_frees_its_thread_at_the_deadline(s3_env):
    """A read waited for a whole 256-kB chunk between deadline checks: an S3 sending a byte now
    and then held the reader thread (and its slot) for as long as it went on."""
    limits = FetchLimits(max_bytes=10_000, timeout_s=1.0, connect_timeout_s=1.0)
    with s3_endpoint(TricklingS3):
        started = time.monotonic()
        with pytest.raises(TimeoutError):
            read_object(None, "s3://clip-images/trickle.jpg", 0, limits)
        assert time.monotonic() - started < 2.0


def test_an_object_cut_short_is_refused(s3_env):
    class CutShort:
        def get_object(self, **_: Any) -> dict[str, Any]:
            return {"Body": StreamingBody(io.BytesIO(b"imag"), 5), "ContentLength": 5}

    with pytest.raises(ImageError, match="ended early"):
        read_object(CutShort(), "s3://b/k", 0, LIMITS)


class FaultyBody(http.server.BaseHTTPRequestHandler):
    """Promises 1,000 bytes, sends 10, then stalls (`fault` "stall") or resets the connection
    ("reset"); or sends the whole object with a CRC32 checksum header that is right or wrong."""

    fault = "stall"

    def do_GET(self) -> None:  # noqa: N802 (http.server's name)
        body = b"x" * 1000
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        if self.fault.startswith("checksum"):
            crc = zlib.crc32(body if self.fault == "checksum-right" else b"other")
            self.send_header(
                "x-amz-checksum-crc32", base64.b64encode(crc.to_bytes(4, "big")).decode()
            )
            self.end_headers()
            self.wfile.write(body)
            return
        self.end_headers()
        self.wfile.write(body[:10])
        self.wfile.flush()
        if self.fault == "reset":
            self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            self.connection.close()
            return
        time.sleep(3)

    def log_message(self, *_: Any) -> None:
        pass


@pytest.mark.parametrize(
    ("fault", "says"),
    [("stall", "(ReadTimeoutError)"), ("reset", "(ResponseStreamingError)")],
)
def test_a_body_that_stalls_or_is_cut_is_the_images_422_not_a_500(s3_env, monkeypatch, fault, says):
    """Read one network read at a time, urllib3's own errors went through botocore's hands
    unmapped: a stalled or reset body was a 500 internal_error, failing a whole mini-batch."""
    monkeypatch.setattr(FaultyBody, "fault", fault)
    limits = FetchLimits(max_bytes=10_000, timeout_s=2.0, connect_timeout_s=1.0)
    with s3_endpoint(FaultyBody), pytest.raises(ImageError) as refused:
        read_object(None, "s3://clip-images/faulty.jpg", 0, limits)
    assert refused.value.status == 422
    assert f"S3 did not answer {says}" in refused.value.message


@pytest.mark.parametrize(("fault", "status"), [("checksum-right", None), ("checksum-wrong", 503)])
def test_a_checksum_s3_sends_is_still_checked(s3_env, monkeypatch, fault, status):
    monkeypatch.setattr(FaultyBody, "fault", fault)
    with s3_endpoint(FaultyBody):
        if status is None:
            assert read_object(None, "s3://clip-images/summed.jpg", 0, LIMITS) == b"x" * 1000
            return
        with pytest.raises(ImageError) as refused:
            read_object(None, "s3://clip-images/summed.jpg", 0, LIMITS)
    assert refused.value.status == 503 and "its checksum did not match" in refused.value.message
