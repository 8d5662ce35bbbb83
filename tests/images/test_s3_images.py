"""s3:// image sources against moto's S3 on 127.0.0.1: bytes, limits, and the JSON errors."""

from __future__ import annotations

import asyncio
import threading
import time
from typing import Any

import pytest

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
    clear = s3_images.s3_client.cache_clear  # a test may replace s3_client meanwhile
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
    s3_images.s3_client.cache_clear()
    with pytest.raises(ImageError, match="the server has no AWS credentials"):
        fetch(s3_env.put("unit/nocreds.png", b"png"))


def test_the_deadline_bounds_a_slow_read(s3_env):
    class SlowBody:
        def read(self, _: int) -> bytes:
            time.sleep(0.2)
            return b"x"

        def close(self) -> None:
            pass

    class SlowClient:
        def get_object(self, **_: Any) -> dict[str, Any]:
            return {"Body": SlowBody(), "ContentLength": 10}

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
