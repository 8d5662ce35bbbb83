"""Image sources -> decoded RGB -> fixed-size uint8 arrays, the way CLIP's processor does it.

Sources are http(s) URLs (see fetch.py), base64 strings, or `data:` URIs. Decoding applies EXIF
orientation and composites transparency onto white (as transformers' `convert_to_rgb` does);
resizing matches `CLIPImageProcessor` exactly (bicubic resize of the shortest side, then center
crop), so the service's pixels equal the reference processor's. Normalisation is left to the
runner's device.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import dataclasses
import functools
import io
import math
import re
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import httpx
import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

try:  # SIMD: 5 us instead of 220 for a 73-kB base64 image. Stricter than the standard library
    # on surplus padding, which the lenient path then accepts as before (the tests hold both).
    from pybase64 import b64decode as strict_b64decode
except ImportError:  # an accelerator, not a requirement: the same bytes, slower
    from base64 import b64decode as strict_b64decode

from clip_runner.errors import ImageError, RequestError, quoted
from clip_runner.images.decode_budget import DecodeBudget
from clip_runner.images.fetch import FetchLimits, fetch_url
from clip_runner.images.formats import (
    ACCEPTED_FORMATS,
    ACCEPTED_FORMATS_TEXT,
    refused_format_hint,
)
from clip_runner.images.jpeg_markers import ends_after_its_scan
from clip_runner.images.pixel_budget import (
    MAX_JPEG_SCANS,
    HeaderCheck,
    PixelBudget,
    image_header,
    overlong_header,
)
from clip_runner.images.s3_images import fetch_s3, is_s3_url
from clip_runner.metrics import PREPROCESS_SECONDS
from clip_runner.model.pillow_pixels import (
    JPEG_FORMATS,
    decode_into_array,
    decodes_into_array,
    exif_orientation,
    pixel_shape,
)
from clip_runner.model.resample import DEVICE_MAX_DOWNSCALE, crop_plan

_SCHEME = re.compile(r"^([a-zA-Z][a-zA-Z0-9+.-]*):")
# The image sources besides base64, as refusals name them: `s3://` had been left out, so a
# mistyped one (`s3:/bucket/key`) read as if S3 were not supported.
URL_KINDS = "an http(s):// or s3://bucket/key URL or a data: URI"
# The scheme in any case, as RFC 3986 has it ("DATA:" was refused as malformed).
_DATA_URI = re.compile(
    r"^(?i:data):(?P<media>[^,;]*)(?P<params>(;[^,;]*)*),(?P<data>.*)$", re.DOTALL
)
_WHITESPACE = re.compile(r"\s+")

# Pillow's own bomb check warns below twice its fixed limit and raises above; `decode_image`
# enforces the configured CLIP_MAX_IMAGE_PIXELS instead, with a message naming the size.
Image.MAX_IMAGE_PIXELS = None


@dataclass(frozen=True)
class ImageGeometry:
    """How the model wants its pixels: shortest side resized to `shortest_edge`, then cropped."""

    shortest_edge: int
    crop_height: int
    crop_width: int


@dataclass(frozen=True)
class ImageLimits:
    """Bounds on one image source and on the work per request, and how to preprocess.

    `fast_preprocessing`: CLIP_PREPROCESS=fast (opt-in; BENCHMARKS.md has its worst case).
    `forward_jpegs`: JPEGs the runner can decode on its device are sent as bytes, not pixels;
    `pillow_runner`: the runner decodes them with Pillow, so progressive and RGB-stored JPEGs
    and MPOs go too (`device_decodable`). `decode_budget`: the worker's one budget of pixels
    decoded at once, shared by all its requests (CLIP_MAX_DECODING_PIXELS; copies made with
    `dataclasses.replace` share it).
    """

    fetch: FetchLimits
    max_pixels: int
    fetch_concurrency: int = 8
    fast_preprocessing: bool = False
    forward_jpegs: bool = False
    pillow_runner: bool = False
    max_request_pixels: int = 200_000_000
    decode_budget: DecodeBudget = dataclasses.field(
        default_factory=lambda: DecodeBudget(40_000_000), compare=False
    )


# Base64 sources up to this long are decoded on the event loop: about 0.1 ms for the seed's
# photo, less than handing it to a thread and back (which also holds the GIL: base64 decoding
# does not release it).
INLINE_ON_LOOP_CHARS = 256 * 1024
# Baseline JPEGs up to this many pixels are decoded and resized on the event loop too (about
# 2.3 ms for the seed's 640x480 photo): handing each to a thread and back cost more than it
# saved. With the tiny model, 32 clients, two API workers: 322-369 requests/s against 263-300
# through threads, and 3.8 against 4.5 ms of API CPU per request (BENCHMARKS.md). Larger images
# and every other kind (a small progressive JPEG can hold thousands of scans) still go to a
# thread, so the loop (and /ping) never waits long, whatever a request sends.
ON_LOOP_MAX_PIXELS = 500_000
# Images up to this size have their header read on the event loop (about 30 us for a photo).
# Pillow parses some headers in Python at a cost that grows with the file: 4 MB of empty JPEG
# comment or APPn markers, PNG chunks or GIF comment blocks took 0.5-1.2 s, a TIFF of a million
# one-row strips 1.9 s, and held the loop (so /ping) that long. At this size, about 30 ms.
HEADER_ON_LOOP_BYTES = 64 * 1024

# What `load_image` gives: decoded model-ready pixels, or JPEG bytes for the runner's device.
LoadedImage = np.ndarray | bytes


# The fast path shrinks big images cheaply down to at least this multiple of the model's size
# before the final bicubic resize, which then still has real pixels to antialias from.
FAST_OVERSAMPLING = 2


def is_url(source: str) -> bool:
    return source[:8].lower().startswith(("http://", "https://"))


def decode_inline(source: str, index: int, max_bytes: int) -> bytes:
    """Bytes of a base64 string or a base64 `data:` URI; anything with another scheme is refused."""
    payload = source
    if source[:5].lower() == "data:":
        match = _DATA_URI.match(source)
        if match is None:
            raise ImageError(index, "malformed data: URI (expected data:<type>;base64,<data>)")
        if ";base64" not in match["params"].lower():
            raise ImageError(index, "data: URIs must be base64-encoded (;base64,)")
        if match["media"] and not match["media"].lower().startswith("image/"):
            media = quoted(match["media"])
            raise ImageError(index, f"data: URI media type {media!r} is not an image")
        payload = match["data"]
    elif scheme := _SCHEME.match(source):  # base64 never contains ':'
        if scheme.group(1).lower() == "s3":  # `s3:/bucket/key`: one slash short
            raise ImageError(index, f"{quoted(source)!r} is not an s3://bucket/key URL")
        shown = quoted(scheme.group(1))
        raise ImageError(index, f"unsupported URL scheme {shown!r}: send {URL_KINDS}, or base64")
    if decoded_size(payload) > max_bytes:  # line breaks count here: look again without them
        payload = _WHITESPACE.sub("", payload)
        if decoded_size(payload) > max_bytes:
            raise ImageError(index, f"image is larger than the {max_bytes}-byte limit")
    try:  # standard, padded, unbroken base64 (what clients send): 4.5x faster than the rest
        data = strict_b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        data = _lenient_base64(payload, index)
    if not data:
        raise ImageError(index, "image data is empty")
    return data


def decoded_size(payload: str) -> int:
    """How many bytes base64 `payload` decodes to, its padding taken off: an image of exactly
    the limit whose size is no multiple of 3 had been refused as larger than it."""
    return len(payload) * 3 // 4 - payload.count("=", max(0, len(payload) - 2))


def _lenient_base64(payload: str, index: int) -> bytes:
    """Base64 with line breaks or other whitespace, missing padding, or the URL-safe alphabet;
    anything outside both alphabets is refused."""
    payload = _WHITESPACE.sub("", payload)
    payload += "=" * (-len(payload) % 4)
    try:
        return base64.b64decode(payload.replace("-", "+").replace("_", "/"), validate=True)
    except (binascii.Error, ValueError):
        raise ImageError(index, f"neither valid base64 nor {URL_KINDS}") from None


def eight_bit(image: Image.Image) -> Image.Image:
    """A 16- or 32-bit greyscale image ("I;16*", "I") in 8 bits: "L", or "LA" where a tRNS key
    makes some values transparent (the key names a 16-bit value).

    16-bit values are scaled (value / 257, rounded): Pillow's own conversion, which
    CLIPProcessor uses, clips them at 255, turning every pixel brighter than 255 of 65,535
    white. They had been scaled only when some value passed 255, so a dark 16-bit image was
    read as a bright 8-bit one, and one pixel of 256 changed how the whole image was read. A
    32-bit integer image ("I", TIFF) has no set range: values up to 255 are taken as 8-bit
    ones, larger ones scaled as 16-bit ones and clipped.
    """
    pixels = np.asarray(image, dtype=np.float64)
    scale = 1.0 if image.mode == "I" and pixels.max(initial=0) <= 255 else 257.0
    grey = Image.fromarray(np.clip(pixels / scale, 0, 255).round().astype(np.uint8), "L")
    key = image.info.get("transparency")
    if isinstance(key, int):
        grey.putalpha(Image.fromarray(np.where(pixels == key, 0, 255).astype(np.uint8), "L"))
    return grey


def to_rgb(image: Image.Image, keep_grey: bool = False) -> Image.Image:
    """RGB with EXIF orientation applied; transparency (an alpha band or a tRNS key, in every
    mode: transformers' `convert_to_rgb`) composited onto white; 16-bit scaled (`eight_bit`).
    With `keep_grey`, an opaque greyscale image stays greyscale ("L"): its RGB would repeat
    each value three times, which the compiled resize does after the crop instead."""
    # In place: without an orientation tag the default returns a full copy of the pixels.
    ImageOps.exif_transpose(image, in_place=True)
    if image.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):
        image = eight_bit(image)
    opaque = image.info.get("transparency") is None
    if keep_grey and image.mode == "1" and opaque:  # bilevel (fax, scans): 0 or 255 either way
        image = image.convert("L")
    # An RGB image's tRNS key (one colour transparent, as in a logo) had been ignored.
    if (image.mode == "RGB" and opaque) or (keep_grey and image.mode == "L" and opaque):
        return image
    if "A" in image.getbands() or not opaque:
        return on_white(image.convert("RGBA"))
    return image.convert("RGB")


def on_white(rgba: Image.Image) -> Image.Image:
    """An RGBA image composited onto opaque white, in RGB: transformers' `convert_to_rgb`
    (`alpha_composite` onto white, then RGB) to the byte. Pasting through the alpha as a mask
    rounds alike on every (value, alpha) pair over an opaque background (test_loading.py tries
    all 65,536) and takes a third of the time: 4.9 against 15.4 ms for a 1920x1080 image."""
    white = Image.new("RGB", rgba.size, (255, 255, 255))
    white.paste(rgba, (0, 0), rgba)
    return white


@contextlib.contextmanager
def opened_image(data: bytes, index: int, max_pixels: int) -> Iterator[Image.Image]:
    """The image with only its header read, its pixel count checked; decoding errors inside the
    block become a 422 naming the image."""
    try:
        with Image.open(io.BytesIO(data), formats=ACCEPTED_FORMATS) as opened:
            width, height = opened.size
            if width * height > max_pixels:
                raise ImageError(
                    index, f"image is {width}x{height}, more than the {max_pixels}-pixel limit"
                )
            yield opened
    except UnidentifiedImageError:
        hint = refused_format_hint(data) or "data is not in a recognised image format"
        raise ImageError(index, f"{hint} (send {ACCEPTED_FORMATS_TEXT})") from None
    except (OSError, ValueError, SyntaxError, EOFError) as exc:
        reason = str(exc) or type(exc).__name__
        raise ImageError(index, f"not a decodable image ({reason})") from None


def decode_image(
    data: bytes, index: int, max_pixels: int, draft_short_side: int | None = None
) -> Image.Image:
    """Decode bytes (first frame of animations) into RGB, or raise a 422 naming the image.

    The pixel count is checked from the header, before any pixel is decoded. With
    `draft_short_side`, JPEGs are decoded at the smallest of 1/2, 1/4, 1/8 scale whose shortest
    side is still at least that (libjpeg's DCT scaling: most of the decoding work is skipped).
    """
    with opened_image(data, index, max_pixels) as opened:
        width, height = opened.size
        if draft_short_side and opened.format == "JPEG":
            scale = draft_short_side / min(width, height)
            if scale < 1:
                opened.draft(None, (math.ceil(width * scale), math.ceil(height * scale)))
        return loaded_rgb(opened)


def loaded_rgb(opened: Image.Image, keep_grey: bool = False) -> Image.Image:
    """An opened image's first frame, decoded, in RGB (`to_rgb`; or greyscale, `keep_grey`)."""
    opened.seek(0)
    opened.load()
    return to_rgb(opened, keep_grey)


def decoded_pixels(data: bytes, index: int, max_pixels: int) -> tuple[np.ndarray, int]:
    """The image's pixels as Pillow stores them, what the compiled resize reads: uint8
    (H, W, 4) RGB (the fourth byte padding), or (H, W) for a greyscale image; and the EXIF
    orientation the resize is still to apply.

    A colour or greyscale JPEG is decoded straight into the array (model/pillow_pixels.py: no
    copy afterwards; the seed's photo 1.57 against 1.79 ms, decode, resize and crop), as
    stored: the compiled resize reads it in its upright order (compiled_resample.py; a 12-MP
    phone photo with its orientation tag 65.6 against 146.5 ms turned by Pillow first), and a
    greyscale one in its one channel (a page of text scanned at 300 dpi 50.0-50.7 against
    66.9-72.2 ms, converted to RGB and copied first). Any other image is decoded, turned
    upright, converted (`to_rgb`: an opaque greyscale one stays greyscale, a PNG page of text
    40.1-40.4 against 54.7-57.9 ms) and copied out (`stored_pixels`), orientation 1. The same
    pixels either way."""
    with opened_image(data, index, max_pixels) as opened:
        # The EXIF first: for some formats (PNG) reading it decodes the pixels.
        orientation = exif_orientation(opened)
        if decodes_into_array(opened):
            return decode_into_array(opened, data), orientation
        return stored_pixels(loaded_rgb(opened, keep_grey=True)), 1


# Component ids "R", "G", "B": with neither a JFIF nor an Adobe marker, libjpeg reads them as a
# JPEG stored in RGB rather than YCbCr.
RGB_COMPONENT_IDS = (82, 71, 66)


def stored_as_rgb(opened: Image.Image) -> bool:
    """Whether a three-component JPEG holds RGB rather than YCbCr, by libjpeg's own rule: a JFIF
    marker means YCbCr, else an Adobe marker's transform 0 means RGB, else component ids R, G, B
    do. Such files (some Adobe exports, `keep_rgb` in Pillow) are rare, and many decoders take
    them for YCbCr and get every colour wrong; nvJPEG's handling of them is unmeasured."""
    if len(getattr(opened, "layer", ())) != 3 or "jfif" in opened.info:
        return False
    if "adobe" in opened.info:
        return opened.info.get("adobe_transform") == 0
    return tuple(component[0] for component in opened.layer) == RGB_COMPONENT_IDS


# The JPEG modes a runner decoding with Pillow is sent: colour, greyscale, and CMYK (Pillow
# opens YCCK as CMYK too), which it converts to RGB.
PILLOW_RUNNER_MODES = ("RGB", "L", "CMYK")


def device_decodable(
    opened: Image.Image, data: bytes, shortest_edge: int, pillow_runner: bool = False
) -> bool:
    """Whether the runner's device decoder gives exactly the pixels of this JPEG (`data`,
    opened): a complete (`ends_after_its_scan`) baseline JPEG in YCbCr or greyscale, whose
    shortest side the device resize shrinks exactly (`DEVICE_MAX_DOWNSCALE`), in any EXIF
    orientation (the runner reads the tag and turns the decoded pixels, as phones' photos
    need). Truncated and giant JPEGs (and every other format) are decoded here instead, and so
    are progressive, RGB-stored (`stored_as_rgb`) and CMYK JPEGs and MPOs unless
    `pillow_runner`. Reads the header and looks for the end marker.

    With `pillow_runner` (the runner decodes with Pillow, as on a GPU by default) progressive
    and RGB-stored JPEGs and MPOs (a camera's photo with a preview after it) go too: Pillow
    decodes them there into the array as it does here (pillow_pixels.py), the same
    libjpeg-turbo on the same bytes, so the pixels are these workers' own. So do CMYK (and
    YCCK) JPEGs, as print and prepress files are stored: the runner converts them to RGB with
    the same Pillow call as `to_rgb` here, and a conversion of each pixel alone gives the same
    pixels before or after the turn. nvJPEG's handling of all of them is unmeasured, and a
    truncated MPO would pass the end-marker check on its preview's marker."""
    formats = JPEG_FORMATS if pillow_runner else ("JPEG",)
    modes = PILLOW_RUNNER_MODES if pillow_runner else ("RGB", "L")
    return (
        opened.format in formats
        and opened.mode in modes
        and (pillow_runner or not (opened.info.get("progressive") or stored_as_rgb(opened)))
        and min(opened.size) <= DEVICE_MAX_DOWNSCALE * shortest_edge
        and ends_after_its_scan(data)
    )


def device_check(
    data: bytes, max_pixels: int, shortest_edge: int, pillow_runner: bool = False
) -> HeaderCheck:
    """Whether the API workers forward `data` to the runner's device decoder, asked of its
    header in the pixel budget's read of it (`image_header`): `device_decodable` and
    within the pixel limit. Any other image goes to `prepare_image`, which answers an
    unreadable or too large one with its 422."""

    def forwarded(opened: Image.Image) -> bool:
        width, height = opened.size
        return width * height <= max_pixels and device_decodable(
            opened, data, shortest_edge, pillow_runner
        )

    return forwarded


def device_decodable_jpeg(
    data: bytes, max_pixels: int, shortest_edge: int, pillow_runner: bool = False
) -> bool:
    """The same decision from the bytes alone, as `load_image` takes it (for the broken-JPEG
    harness and the tests); an unreadable header is not forwarded."""
    check = device_check(data, max_pixels, shortest_edge, pillow_runner)
    return image_header(data, check).passed_check


# Up to this long/short ratio the whole image is resized, bit-exact with CLIPProcessor; beyond
# it only the cropped region is (see `resize_and_crop`).
EXACT_RESIZE_MAX_ASPECT = 4.0


def reduce_large(image: Image.Image, geometry: ImageGeometry) -> Image.Image:
    """Box-downscale by an integer factor while the shortest side stays >= 2x the model's."""
    factor = min(image.size) // (FAST_OVERSAMPLING * geometry.shortest_edge)
    return image.reduce(factor) if factor >= 2 else image


# Above this, glibc gives every allocation fresh pages from the kernel (32 MB is its largest
# mmap threshold), and faulting them in cost more than the copy: a 12-MP photo's 48 MB took
# 56-68 ms in one piece, 9-14 ms in strips into one numpy array (which asks for huge pages).
WHOLE_COPY_MAX_BYTES = 32 * 2**20
STRIP_ROWS = 256


def stored_pixels(image: Image.Image) -> np.ndarray:
    """An RGB or greyscale image's pixels as Pillow stores them: uint8 (H, W, 4), the fourth
    byte padding, or (H, W).

    Copied out as they are, a straight copy per row; `np.asarray(image)` repacks RGB into
    three bytes first (for a 640x480 photo about 70 against 180 us). Big images are copied in
    strips of rows (`WHOLE_COPY_MAX_BYTES`)."""
    width, height = image.size
    if math.prod(pixel_shape(image)) <= WHOLE_COPY_MAX_BYTES:
        return _copied(image)
    pixels = np.empty(pixel_shape(image), np.uint8)
    for top in range(0, height, STRIP_ROWS):
        strip = image.crop((0, top, width, min(height, top + STRIP_ROWS)))
        pixels[top : top + strip.height] = _copied(strip)
    return pixels


# Pillow's packer for each stored layout: RGB with its padding byte, greyscale as it is.
_RAW_MODES = {"RGB": "RGBX", "L": "L"}


def _copied(image: Image.Image) -> np.ndarray:
    raw = image.tobytes("raw", _RAW_MODES[image.mode])
    return np.frombuffer(raw, np.uint8).reshape(pixel_shape(image))


@functools.cache
def compiled_resizer() -> Callable[..., np.ndarray] | None:
    """numba's exact resize (compiled_resample.resize_and_crop_array), or None where numba is
    missing or cannot compile it: Pillow then resizes, to the same pixels.

    Imported on the first call, not with this module, which the supervisor and the runner import
    too (through the service) and which must not load numba in them (compiled_resample.py says
    what it costs). The API service calls this as it starts (service.py), so that no request
    waits for it.
    """
    from clip_runner.images import compiled_resample

    return compiled_resample.resize_and_crop_array if compiled_resample.COMPILED else None


def resize_and_crop(image: Image.Image, geometry: ImageGeometry) -> np.ndarray:
    """Bicubic resize of the shortest side then center crop: uint8 (H, W, 3), as CLIPProcessor.

    With numba (requirements.txt), Pillow's arithmetic runs on the cropped region only
    (compiled_resample.py): the reference's pixels at any aspect ratio, about 4.5 x faster than
    Pillow on the seed's photos.
    Without it, Pillow itself: for ordinary aspect ratios exactly the reference's computation;
    for extreme ones (panoramas, 10000x1 strips) resizing the whole image would allocate a huge
    intermediate, so only the cropped region is resampled (Pillow's `box`): same sample
    positions and kernel support, two grey levels of rounding difference at most in wide images
    (one in photos), but up to 24 in tall strips of noise narrower than the model's input (3 x 2000:
    enlarged, their passes run in another order than the whole image's; measured by the format
    review).
    """
    edge, crop_height, crop_width = dataclasses.astuple(geometry)
    compiled = compiled_resizer()
    if compiled is not None:
        return compiled(stored_pixels(image), edge, crop_height, crop_width)
    width, height = image.size
    plan = crop_plan(width, height, edge, crop_height, crop_width)
    kept = (plan.left, plan.top, plan.left + plan.out_width, plan.top + plan.out_height)
    if max(width, height) / min(width, height) <= EXACT_RESIZE_MAX_ASPECT:
        resized = image.resize((plan.new_width, plan.new_height), Image.Resampling.BICUBIC)
        cropped = resized.crop(kept)
    else:
        scale_x, scale_y = width / plan.new_width, height / plan.new_height
        box = (kept[0] * scale_x, kept[1] * scale_y, kept[2] * scale_x, kept[3] * scale_y)
        size = (plan.out_width, plan.out_height)
        cropped = image.resize(size, Image.Resampling.BICUBIC, box=box)
    if plan.padded:
        canvas = Image.new("RGB", (crop_width, crop_height))
        canvas.paste(cropped, (plan.pad_left, plan.pad_top))
        cropped = canvas
    return np.asarray(cropped, dtype=np.uint8)


def prepare_image(
    data: bytes, index: int, geometry: ImageGeometry, max_pixels: int, fast: bool = False
) -> np.ndarray:
    """Bytes -> model-ready uint8 array; CPU-bound, run it in a thread.

    By default CLIPImageProcessor's own computation. `fast` (CLIP_PREPROCESS=fast, opt-in)
    decodes big JPEGs at reduced scale and box-reduces other big images before the bicubic
    resize: several times faster on large photos, but fine textures alias differently
    (BENCHMARKS.md gives its worst case on the hard-image set); images whose shortest side is
    under twice the model's size take the reference path either way.
    """
    compiled = None if fast else compiled_resizer()
    with PREPROCESS_SECONDS.time():
        if compiled is not None:
            pixels, orientation = decoded_pixels(data, index, max_pixels)
            return compiled(pixels, *dataclasses.astuple(geometry), orientation)
        if not fast:
            return resize_and_crop(decode_image(data, index, max_pixels), geometry)
        draft_side = FAST_OVERSAMPLING * geometry.shortest_edge
        image = decode_image(data, index, max_pixels, draft_short_side=draft_side)
        return resize_and_crop(reduce_large(image, geometry), geometry)


async def load_image(
    source: str,
    index: int,
    client: httpx.AsyncClient,
    geometry: ImageGeometry,
    limits: ImageLimits,
    fetch_slots: asyncio.Semaphore,
    budget: PixelBudget,
) -> LoadedImage:
    """One source -> uint8 array (or, with `forward_jpegs`, the bytes of a JPEG the runner's
    device decodes). Fetches never block the event loop; small baseline JPEGs are decoded on it,
    every other image in a thread (`ON_LOOP_MAX_PIXELS`)."""
    if is_url(source):
        async with fetch_slots:
            data = await fetch_url(client, source, index, limits.fetch)
    elif is_s3_url(source):
        async with fetch_slots:
            data = await fetch_s3(source, index, limits.fetch)
    elif len(source) <= INLINE_ON_LOOP_CHARS:  # a thread hop would cost more than decoding
        data = decode_inline(source, index, limits.fetch.max_bytes)
    else:  # base64 of a multi-megabyte image takes milliseconds: keep it off the event loop
        data = await asyncio.to_thread(decode_inline, source, index, limits.fetch.max_bytes)
    forwarding = (
        device_check(data, limits.max_pixels, geometry.shortest_edge, limits.pillow_runner)
        if limits.forward_jpegs
        else None
    )
    if (problem := overlong_header(data)) is not None:
        raise ImageError(index, problem)
    # From the header, before decoding: 413 past the budget; and whether to forward the JPEG.
    if len(data) <= HEADER_ON_LOOP_BYTES:
        header = budget.charge(image_header(data, forwarding))
    else:  # Pillow reads some headers in Python, at a cost that grows with the file (below)
        header = budget.charge(await asyncio.to_thread(image_header, data, forwarding))
    if header.scans > MAX_JPEG_SCANS:
        raise ImageError(
            index,
            f"a progressive JPEG of {header.scans} scans, over the {MAX_JPEG_SCANS} decoded here "
            "(encoders write 10 or so; each scan costs a pass over the whole image)",
        )
    if header.passed_check:
        return data
    args = (data, index, geometry, limits.max_pixels, limits.fast_preprocessing)
    if header.baseline_jpeg and header.pixels <= ON_LOOP_MAX_PIXELS:
        return prepare_image(*args)
    return await limits.decode_budget.run(header.pixels, functools.partial(prepare_image, *args))


async def load_images(
    sources: Sequence[str],
    client: httpx.AsyncClient,
    geometry: ImageGeometry,
    limits: ImageLimits,
    field: str = "images",
) -> list[LoadedImage]:
    """All sources of a request, concurrently (URL fetches bounded), in order.

    The first failing image (by index) fails the whole request, naming it as `field[index]`
    (the request field the sources came from); the other images' work is cancelled.
    """
    fetch_slots = asyncio.Semaphore(limits.fetch_concurrency)
    budget = PixelBudget(limits.max_request_pixels, field)
    tasks = [
        asyncio.ensure_future(
            load_image(source, index, client, geometry, limits, fetch_slots, budget)
        )
        for index, source in enumerate(sources)
    ]
    try:
        arrays = await asyncio.gather(*tasks)
    except BaseException:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        errors = [
            task.exception()
            for task in tasks
            if not task.cancelled() and isinstance(task.exception(), RequestError)
        ]
        if errors:
            first = min(errors, key=lambda error: error.index or 0)
            raise (first.in_field(field) if isinstance(first, ImageError) else first) from None
        raise
    return list(arrays)
