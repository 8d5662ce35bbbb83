"""Images given as `s3://bucket/key`, read with the server's own AWS identity.

SageMaker requests are at most 6 MB, so large images live in S3 and the request names them. The
object is read with boto3's default credential chain (on SageMaker: the endpoint's execution
role; elsewhere the usual AWS_* variables or profiles), from the endpoint boto3 picks itself, so
`AWS_ENDPOINT_URL_S3` (or `AWS_ENDPOINT_URL`) points it at another S3 implementation. The
caller names only a bucket and key, never an address, so the SSRF guard of fetch.py has nothing
to check here. The contract mirrors `fetch.fetch_url`: the image's bytes, under the same size cap
and deadline, or an `ImageError` naming the image (missing object, access denied, too large).
"""

from __future__ import annotations

import asyncio
import functools
import time
from typing import Any

from clip_runner.errors import ImageError, quoted
from clip_runner.images.fetch import FetchLimits

CHUNK_BYTES = 256 * 1024
# Connections per process: enough for every concurrent fetch (CLIP_FETCH_CONCURRENCY per request).
MAX_POOL_CONNECTIONS = 64
_NOT_FOUND = {"NoSuchKey", "NoSuchBucket", "404", "NotFound"}
_DENIED = {"AccessDenied", "403", "AllAccessDisabled", "InvalidAccessKeyId", "ExpiredToken"}


def is_s3_url(source: str) -> bool:
    return source[:5].lower() == "s3://"


def parse_s3_url(url: str, index: int) -> tuple[str, str]:
    """`s3://bucket/key/with/slashes` -> (bucket, key); both must be present."""
    bucket, _, key = url[5:].partition("/")
    if not bucket or not key:
        raise ImageError(index, f"{quoted(url)!r} is not an s3://bucket/key URL")
    return bucket, key


@functools.cache
def s3_client(connect_timeout_s: float, read_timeout_s: float) -> Any:
    """One client per process (boto3 clients are thread-safe); boto3 is imported on first use.

    Retries are few and quick: the request's own deadline bounds the fetch anyway.
    """
    import boto3
    from botocore.config import Config

    config = Config(
        connect_timeout=connect_timeout_s,
        read_timeout=read_timeout_s,
        retries={"mode": "standard", "max_attempts": 2},
        max_pool_connections=MAX_POOL_CONNECTIONS,
    )
    return boto3.session.Session().client("s3", config=config)


def read_object(client: Any, url: str, index: int, limits: FetchLimits) -> bytes:
    """GetObject, streamed with the size cap and deadline; blocking, so run it in a thread."""
    from botocore.exceptions import BotoCoreError, ClientError, NoCredentialsError

    bucket, key = parse_s3_url(url, index)
    shown = quoted(url)
    too_large = f"image at {shown} is larger than the {limits.max_bytes}-byte limit"
    deadline = time.monotonic() + limits.timeout_s
    try:
        response = client.get_object(Bucket=bucket, Key=key)
        body = response["Body"]
        try:
            if response.get("ContentLength", 0) > limits.max_bytes:
                raise ImageError(index, too_large)
            data = bytearray()
            while chunk := body.read(CHUNK_BYTES):
                data += chunk
                if len(data) > limits.max_bytes:
                    raise ImageError(index, too_large)
                if time.monotonic() > deadline:
                    raise TimeoutError
        finally:
            body.close()
    except ClientError as error:
        code = str(error.response.get("Error", {}).get("Code", ""))
        if code in _NOT_FOUND:
            raise ImageError(index, f"{shown} does not exist ({code})", "image_not_found") from None
        if code in _DENIED:
            raise ImageError(
                index,
                f"access to {shown} denied ({code}): the server's AWS role cannot read it",
                "forbidden_url",
            ) from None
        raise ImageError(index, f"could not read {shown}: {quoted(code or str(error))}") from None
    except NoCredentialsError:
        raise ImageError(
            index, f"cannot read {shown}: the server has no AWS credentials", "forbidden_url"
        ) from None
    except BotoCoreError as error:  # invalid bucket name, unreachable endpoint, read timeout
        raise ImageError(index, f"could not read {shown}: {quoted(str(error))}") from None
    if not data:
        raise ImageError(index, f"{shown} is empty")
    return bytes(data)


async def fetch_s3(url: str, index: int, limits: FetchLimits, client: Any = None) -> bytes:
    """The object's bytes within `limits` (as `fetch_url` for HTTP), off the event loop."""
    client = client or s3_client(limits.connect_timeout_s, limits.timeout_s)
    try:
        async with asyncio.timeout(limits.timeout_s):
            return await asyncio.to_thread(read_object, client, url, index, limits)
    except TimeoutError:
        raise ImageError(
            index, f"reading {quoted(url)} timed out after {limits.timeout_s:g} s"
        ) from None
