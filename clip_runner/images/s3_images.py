"""Images given as `s3://bucket/key`, read with the server's own AWS identity.

SageMaker requests are at most 6 MB, so large images live in S3 and the request names them. The
object is read with boto3's default credential chain (on SageMaker: the endpoint's execution
role; elsewhere the usual AWS_* variables or profiles), from the endpoint boto3 picks itself, so
`AWS_ENDPOINT_URL_S3` (or `AWS_ENDPOINT_URL`) points it at another S3 implementation. The
caller names only a bucket and key, never an address, so the SSRF guard of fetch.py has nothing
to check here. The contract mirrors `fetch.fetch_url`: the image's bytes, under the same size cap
and deadline, or an `ImageError` naming the image (missing object, access denied, too large).

boto3 blocks, so each read runs on a thread of `READERS`, this module's own: on the event
loop's default executor, which also decodes every request's images, a slow S3 stalled every
decode in the worker (a PNG's 18 ms became 3.8 s beside eight slow objects).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
import weakref
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from clip_runner.errors import ImageError, quoted
from clip_runner.images.fetch import FetchLimits, loop_slots

logger = logging.getLogger(__name__)

CHUNK_BYTES = 256 * 1024
# Connections per process: enough for every concurrent fetch (CLIP_FETCH_CONCURRENCY per request).
MAX_POOL_CONNECTIONS = 64
# One thread per connection; threads are started as reads need them.
READERS = ThreadPoolExecutor(MAX_POOL_CONNECTIONS, thread_name_prefix="clip-s3")
# Tries of one GetObject, the first included; each may wait the deadline's share for a byte, so
# a hung S3 holds a thread about the deadline, not the three times it botocore's default allows.
ATTEMPTS = 2
_NOT_FOUND = {"NoSuchKey", "NoSuchBucket", "404", "NotFound"}
_DENIED = {"AccessDenied", "403", "AllAccessDisabled", "InvalidAccessKeyId"}
# S3 down, throttling, or the server's own credentials or clock at fault (any 5xx too): a 503,
# which callers retry, and which fails a JSON Lines mini-batch whole, so that Batch Transform
# retries it rather than writing an outage into the results as the records' own errors.
_UNAVAILABLE = {
    "SlowDown",
    "InternalError",
    "ServiceUnavailable",
    "RequestTimeout",
    "ExpiredToken",
    "RequestTimeTooSkewed",
}
# Reads in flight per event loop: one per reader thread. A read waits for a slot before its
# deadline starts: 64 lines of 8 S3 images each, every object answered in 2 s, had half their
# reads time out at 10 s waiting for a thread, each written into the results as a bad image.
_READ_SLOTS: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, asyncio.Semaphore] = (
    weakref.WeakKeyDictionary()
)


def is_s3_url(source: str) -> bool:
    return source[:5].lower() == "s3://"


def parse_s3_url(url: str, index: int) -> tuple[str, str]:
    """`s3://bucket/key/with/slashes` -> (bucket, key); both must be present.

    The bucket may be an access point's ARN, as the AWS CLI takes it
    (`s3://arn:aws:s3:REGION:ACCOUNT:accesspoint/NAME/key`): its own `/` belongs to the bucket.
    """
    rest = url[5:]
    split_at = 0
    if rest.startswith("arn:") and (marker := rest.find(":accesspoint/")) > 0:
        split_at = marker + len(":accesspoint/")
    slash = rest.find("/", split_at)
    bucket, key = (rest, "") if slash < 0 else (rest[:slash], rest[slash + 1 :])
    if not bucket or not key or bucket.endswith(":accesspoint"):
        raise ImageError(index, f"{quoted(url)!r} is not an s3://bucket/key URL")
    return bucket, key


# The process's clients by (connect timeout, timeout): one in practice.
CLIENTS: dict[tuple[float, float], Any] = {}
_CLIENT_BUILD = threading.Lock()


def s3_client(connect_timeout_s: float, timeout_s: float) -> Any:
    """One client per process (boto3 clients are thread-safe), built on first use, on a reader
    thread (building it takes ~0.15 s, which would stop the event loop), by one of them: the
    first burst of reads would otherwise each build their own (32 at once held the event loop's
    GIL for 0.64 s)."""
    with _CLIENT_BUILD:
        key = (connect_timeout_s, timeout_s)
        if key not in CLIENTS:
            CLIENTS[key] = new_client(connect_timeout_s, timeout_s)
        return CLIENTS[key]


def new_client(connect_timeout_s: float, timeout_s: float) -> Any:
    """An S3 client with these timeouts and `ATTEMPTS` tries; boto3 is imported here, on first
    use."""
    import boto3
    from botocore.config import Config

    config = Config(
        connect_timeout=connect_timeout_s,
        read_timeout=timeout_s / ATTEMPTS,
        retries={"mode": "standard", "total_max_attempts": ATTEMPTS},
        max_pool_connections=MAX_POOL_CONNECTIONS,
    )
    return boto3.session.Session().client("s3", config=config)


def read_object(client: Any, url: str, index: int, limits: FetchLimits) -> bytes:
    """GetObject, streamed with the size cap and deadline; blocking, so run it in a thread.

    `client=None` is the process's own (`s3_client`)."""
    from botocore.exceptions import (
        BotoCoreError,
        ClientError,
        FlexibleChecksumError,
        NoCredentialsError,
        ParamValidationError,
    )
    from botocore.exceptions import ConnectionError as BotoConnectionError

    bucket, key = parse_s3_url(url, index)
    shown = quoted(url)
    too_large = f"image at {shown} is larger than the {limits.max_bytes}-byte limit"
    deadline = time.monotonic() + limits.timeout_s
    client = client or s3_client(limits.connect_timeout_s, limits.timeout_s)
    try:
        response = client.get_object(Bucket=bucket, Key=key)
        body = response["Body"]
        try:
            if response.get("ContentLength", 0) > limits.max_bytes:
                raise ImageError(index, too_large)
            data = bytearray()
            for chunk in network_reads(body):
                data += chunk
                if len(data) > limits.max_bytes:
                    raise ImageError(index, too_large)
                if time.monotonic() > deadline:
                    raise TimeoutError
            if len(data) < response.get("ContentLength", 0):  # as botocore's own read checks
                raise ImageError(index, f"reading {shown} ended early: the object was cut off")
        finally:
            body.close()
    except ClientError as error:
        code = str(error.response.get("Error", {}).get("Code", ""))
        status = error.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
        if code in _NOT_FOUND:
            raise ImageError(index, f"{shown} does not exist ({code})", "image_not_found") from None
        if code in _UNAVAILABLE or status >= 500:
            raise unavailable(index, shown, code or str(status)) from None
        if code in _DENIED:
            raise ImageError(
                index,
                f"access to {shown} denied ({code}): the server's AWS role cannot read it "
                "(S3 says so of a missing key too where the role may not list the bucket)",
                "forbidden_url",
            ) from None
        raise ImageError(index, f"could not read {shown}: {quoted(code or str(error))}") from None
    except NoCredentialsError:
        raise ImageError(
            index, f"cannot read {shown}: the server has no AWS credentials", "forbidden_url"
        ) from None
    except (ParamValidationError, *_unusable_arn_errors()) as error:  # the caller's bucket
        # A bucket name botocore refuses, or an access-point ARN it cannot use here: another
        # partition's, an Outposts one, a multi-region one (that needs the AWS CRT).
        raise ImageError(index, f"could not read {shown}: {quoted(str(error))}") from None
    except FlexibleChecksumError:  # the bytes S3 sent are not the object's: worth another try
        raise unavailable(index, shown, "its checksum did not match") from None
    except BotoConnectionError as error:  # S3 unreachable (after botocore's two tries)
        # Refused, or not answered at all (a firewall or a VPC without an S3 endpoint drops
        # the connection: ConnectTimeoutError), or no proxy or TLS: the server's side, never
        # the caller's. Not answered, it had been a 422 on every line of a mini-batch, which
        # SageMaker then wrote as the job's results instead of retrying it.
        logger.warning("reading %s failed: %s", url, error)  # the address: logged only
        raise unavailable(index, shown, type(error).__name__) from None
    except BotoCoreError as error:  # a read that timed out, a connection cut mid-read
        # The text names the S3 endpoint's address, which may be a private one: logged only.
        logger.warning("reading %s failed: %s", url, error)
        raise ImageError(
            index, f"could not read {shown}: S3 did not answer ({type(error).__name__})"
        ) from None
    if not data:
        raise ImageError(index, f"{shown} is empty")
    return bytes(data)


def network_reads(body: Any) -> Iterator[bytes]:
    """A GetObject body's bytes, one network read at a time (urllib3's `read1`), so that the
    caller checks its deadline after each: botocore's `read(CHUNK_BYTES)` waited for the whole
    chunk, and an S3 sending a byte now and then (each within the read timeout) held the
    thread long past the deadline. Around it, what botocore's own read does: urllib3's errors
    raised as botocore's (a stall, a reset: "S3 did not answer", not a 500), and a checksum S3
    sent checked at the end (`StreamingChecksumBody`)."""
    from botocore.exceptions import ReadTimeoutError, ResponseStreamingError
    from botocore.httpchecksum import StreamingChecksumBody
    from urllib3.exceptions import ProtocolError
    from urllib3.exceptions import ReadTimeoutError as StalledRead

    raw = body._raw_stream  # botocore's StreamingBody has no public read of one network read
    checked = body if isinstance(body, StreamingChecksumBody) else None
    try:
        while chunk := raw.read1(CHUNK_BYTES):
            if checked is not None:
                checked.checksum.update(chunk)
            yield chunk
    except StalledRead as error:
        raise ReadTimeoutError(endpoint_url=error.url, error=error) from None
    except ProtocolError as error:
        raise ResponseStreamingError(error=error) from None
    if checked is not None:
        checked._validate_checksum()  # FlexibleChecksumError, a BotoCoreError


def _release_soon(loop: asyncio.AbstractEventLoop, slots: asyncio.Semaphore) -> None:
    """Give a read's slot back on its event loop (from the reader thread); a loop already closed
    has no one left to wait for it."""
    with contextlib.suppress(RuntimeError):
        loop.call_soon_threadsafe(slots.release)


def unavailable(index: int, shown: str, code: str) -> ImageError:
    """The 503 for an S3 that is down or throttling (`_UNAVAILABLE`)."""
    return ImageError(
        index,
        f"could not read {shown}: S3 is unavailable ({quoted(code)}); try again",
        "s3_unavailable",
        status=503,
    )


def _unusable_arn_errors() -> tuple[type[Exception], ...]:
    from botocore import exceptions

    return (
        exceptions.UnsupportedS3ArnError,
        exceptions.UnsupportedS3AccesspointConfigurationError,
        exceptions.UnsupportedS3ConfigurationError,
        exceptions.UnsupportedOutpostResourceError,
        exceptions.MissingDependencyException,
    )


async def fetch_s3(url: str, index: int, limits: FetchLimits, client: Any = None) -> bytes:
    """The object's bytes within `limits` (as `fetch_url` for HTTP), on a `READERS` thread."""
    loop = asyncio.get_running_loop()
    slots = loop_slots(_READ_SLOTS, MAX_POOL_CONNECTIONS)
    await slots.acquire()
    # The slot is the thread's: given back when the read ends, even one the deadline gave up on.
    reading = READERS.submit(read_object, client, url, index, limits)
    reading.add_done_callback(lambda _: _release_soon(loop, slots))
    try:
        async with asyncio.timeout(limits.timeout_s):
            return await asyncio.wrap_future(reading)
    except TimeoutError:
        raise ImageError(
            index, f"reading {quoted(url)} timed out after {limits.timeout_s:g} s"
        ) from None
