"""Image sources -> decoded RGB -> fixed-size uint8 arrays, the way CLIP's processor does it.

Sources are http(s) URLs, base64 strings, or `data:` URIs. Decoding applies EXIF orientation and
composites transparency onto white (as transformers' `convert_to_rgb` does); resizing matches
`CLIPImageProcessor` exactly (bicubic resize of the shortest side, then center crop), so the
service's pixels equal the reference processor's. Normalisation is left to the runner's device.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import io
import re
from collections.abc import Sequence
from dataclasses import dataclass

import httpx
import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from clip_runner.errors import RequestError

_SCHEME = re.compile(r"^([a-zA-Z][a-zA-Z0-9+.-]*):")
_DATA_URI = re.compile(r"^data:(?P<media>[^,;]*)(?P<params>(;[^,;]*)*),(?P<data>.*)$", re.DOTALL)
_WHITESPACE = re.compile(r"\s+")
USER_AGENT = "clip-bentoml/0.1 (+image fetcher)"


@dataclass(frozen=True)
class ImageGeometry:
    """How the model wants its pixels: shortest side resized to `shortest_edge`, then cropped."""

    shortest_edge: int
    crop_height: int
    crop_width: int


@dataclass(frozen=True)
class FetchLimits:
    """Bounds on downloading one image."""

    max_bytes: int
    timeout_s: float


def image_error(index: int, reason: str) -> RequestError:
    return RequestError(422, "invalid_image", f"images[{index}]: {reason}", index)


def is_url(source: str) -> bool:
    return source[:8].lower().startswith(("http://", "https://"))


def decode_inline(source: str, index: int, max_bytes: int) -> bytes:
    """Bytes of a base64 string or a base64 `data:` URI; anything with another scheme is refused."""
    payload = source
    if source[:5].lower() == "data:":
        match = _DATA_URI.match(source)
        if match is None:
            raise image_error(index, "malformed data: URI (expected data:<type>;base64,<data>)")
        if ";base64" not in match["params"].lower():
            raise image_error(index, "data: URIs must be base64-encoded (;base64,)")
        if match["media"] and not match["media"].lower().startswith("image/"):
            raise image_error(index, f"data: URI media type {match['media']!r} is not an image")
        payload = match["data"]
    elif scheme := _SCHEME.match(source):  # base64 never contains ':'
        raise image_error(
            index, f"unsupported URL scheme {scheme.group(1)!r}: use http(s), base64 or data:"
        )
    payload = _WHITESPACE.sub("", payload)
    if len(payload) * 3 // 4 > max_bytes:
        raise image_error(index, f"image is larger than the {max_bytes}-byte limit")
    payload += "=" * (-len(payload) % 4)
    try:  # the URL-safe alphabet is accepted too; anything outside either is refused
        data = base64.b64decode(payload.replace("-", "+").replace("_", "/"), validate=True)
    except (binascii.Error, ValueError):
        raise image_error(index, "not an http(s) URL, data: URI or valid base64") from None
    if not data:
        raise image_error(index, "image data is empty")
    return data


async def fetch_url(client: httpx.AsyncClient, url: str, index: int, limits: FetchLimits) -> bytes:
    """Download an image with a total timeout, a status check, and a size cap while streaming."""
    try:
        async with asyncio.timeout(limits.timeout_s):
            async with client.stream("GET", url) as response:
                if not response.is_success:
                    raise image_error(index, f"fetching {url} returned HTTP {response.status_code}")
                declared = response.headers.get("content-length")
                if declared and declared.isdigit() and int(declared) > limits.max_bytes:
                    raise image_error(
                        index, f"image is larger than the {limits.max_bytes}-byte limit"
                    )
                body = bytearray()
                async for chunk in response.aiter_bytes():
                    body += chunk
                    if len(body) > limits.max_bytes:
                        raise image_error(
                            index, f"image is larger than the {limits.max_bytes}-byte limit"
                        )
    except TimeoutError:
        raise image_error(index, f"fetching {url} timed out after {limits.timeout_s:g} s") from None
    except httpx.HTTPError as exc:
        reason = str(exc) or type(exc).__name__
        raise image_error(index, f"could not fetch {url}: {reason}") from None
    if not body:
        raise image_error(index, f"{url} returned an empty body")
    return bytes(body)


def to_rgb(image: Image.Image) -> Image.Image:
    """RGB with EXIF orientation applied; transparency composited onto white; 16-bit scaled."""
    image = ImageOps.exif_transpose(image)
    if image.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):
        pixels = np.asarray(image, dtype=np.float64)
        scale = 257.0 if pixels.max(initial=0) > 255 else 1.0
        image = Image.fromarray(np.clip(pixels / scale, 0, 255).round().astype(np.uint8), "L")
    if image.mode == "RGB":
        return image
    if "A" in image.getbands() or image.info.get("transparency") is not None:
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def decode_image(data: bytes, index: int) -> Image.Image:
    """Decode bytes into an RGB image, or raise a 422 naming the image."""
    try:
        with Image.open(io.BytesIO(data)) as opened:
            opened.seek(0)
            opened.load()
            return to_rgb(opened)
    except UnidentifiedImageError:
        raise image_error(index, "data is not in a recognised image format") from None
    except Image.DecompressionBombError:
        raise image_error(
            index, f"image has more than {2 * Image.MAX_IMAGE_PIXELS} pixels (decompression bomb)"
        ) from None
    except (OSError, ValueError, SyntaxError) as exc:
        reason = str(exc) or type(exc).__name__
        raise image_error(index, f"not a decodable image ({reason})") from None


def resize_and_crop(image: Image.Image, geometry: ImageGeometry) -> np.ndarray:
    """Bicubic resize of the shortest side then center crop: uint8 (H, W, 3), as CLIPProcessor."""
    width, height = image.size
    short, long = (width, height) if width <= height else (height, width)
    new_short, new_long = geometry.shortest_edge, int(geometry.shortest_edge * long / short)
    new_size = (new_short, new_long) if width <= height else (new_long, new_short)
    resized = image.resize(new_size, resample=Image.Resampling.BICUBIC)
    if resized.width < geometry.crop_width or resized.height < geometry.crop_height:
        canvas = Image.new(
            "RGB",
            (max(resized.width, geometry.crop_width), max(resized.height, geometry.crop_height)),
        )
        canvas.paste(
            resized, ((canvas.width - resized.width) // 2, (canvas.height - resized.height) // 2)
        )
        resized = canvas
    top = (resized.height - geometry.crop_height) // 2
    left = (resized.width - geometry.crop_width) // 2
    cropped = resized.crop((left, top, left + geometry.crop_width, top + geometry.crop_height))
    return np.asarray(cropped, dtype=np.uint8)


def prepare_image(data: bytes, index: int, geometry: ImageGeometry) -> np.ndarray:
    """Bytes -> model-ready uint8 array; CPU-bound, run it in a thread."""
    return resize_and_crop(decode_image(data, index), geometry)


async def load_image(
    source: str,
    index: int,
    client: httpx.AsyncClient,
    geometry: ImageGeometry,
    limits: FetchLimits,
) -> np.ndarray:
    """One source -> uint8 array, fetching and decoding off the event loop."""
    if is_url(source):
        data = await fetch_url(client, source, index, limits)
    else:
        data = decode_inline(source, index, limits.max_bytes)
    return await asyncio.to_thread(prepare_image, data, index, geometry)


async def load_images(
    sources: Sequence[str],
    client: httpx.AsyncClient,
    geometry: ImageGeometry,
    limits: FetchLimits,
) -> np.ndarray:
    """All sources of a request, concurrently, stacked into uint8 (N, H, W, 3).

    The first failing image (by index) fails the whole request, naming that index.
    """
    tasks = [
        asyncio.ensure_future(load_image(source, index, client, geometry, limits))
        for index, source in enumerate(sources)
    ]
    try:
        arrays = await asyncio.gather(*tasks)
    except RequestError:
        for task in tasks:
            task.cancel()
        errors = [
            task.exception()
            for task in tasks
            if task.done() and not task.cancelled() and task.exception() is not None
        ]
        raise min(errors, key=lambda error: getattr(error, "index", 0) or 0) from None
    return np.stack(arrays)


def new_http_client(timeout_s: float) -> httpx.AsyncClient:
    """The shared connection pool used to fetch image URLs."""
    return httpx.AsyncClient(
        timeout=httpx.Timeout(timeout_s, connect=min(timeout_s, 5.0)),
        follow_redirects=True,
        max_redirects=5,
        headers={"User-Agent": USER_AGENT},
        limits=httpx.Limits(max_connections=64, max_keepalive_connections=16),
    )
