"""The hardest inputs for preprocessing fidelity: fine textures, text, noise, extreme aspect
ratios, beside smooth photos. Shared by the tests and `scripts/bench.py`'s fidelity set.

Downscaling fine periodic detail is where shortcuts (JPEG draft decoding, box reduction, a
different resampler) part from `CLIPImageProcessor`: they alias differently. Each generator is
deterministic for its seed.
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image, ImageDraw, ImageFilter


def stripes(width: int, height: int, period: int, vertical: bool = True) -> Image.Image:
    """Black and white stripes `period` pixels wide (vertical ones vary along x)."""
    axis = np.arange(width if vertical else height)
    line = ((axis // period) % 2 * 255).astype(np.uint8)
    grid = (
        np.broadcast_to(line[None, :], (height, width))
        if vertical
        else np.broadcast_to(line[:, None], (height, width))
    )
    return Image.fromarray(np.ascontiguousarray(grid), "L").convert("RGB")


def checkerboard(width: int, height: int, period: int) -> Image.Image:
    """A fence- or fabric-like grid of `period`-pixel squares in two colours."""
    y, x = np.mgrid[0:height, 0:width]
    mask = ((x // period + y // period) % 2).astype(bool)
    pixels = np.where(mask[..., None], [200, 40, 30], [20, 60, 210]).astype(np.uint8)
    return Image.fromarray(pixels, "RGB")


def woven(width: int, height: int, seed: int) -> Image.Image:
    """Fabric-like: two crossed sine gratings of nearby periods plus fine noise."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    period_x, period_y = rng.uniform(2.5, 6.0, 2)
    grating = np.sin(2 * np.pi * x / period_x) * np.sin(2 * np.pi * y / period_y)
    base = rng.uniform(60, 200, 3)
    pixels = base + 50 * grating[..., None] + rng.normal(0, 10, (height, width, 3))
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8), "RGB")


def noise(width: int, height: int, seed: int) -> Image.Image:
    """Uniform RGB noise: every pixel independent, the worst case for any resampler."""
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8), "RGB")


def text_page(width: int, height: int, seed: int) -> Image.Image:
    """Lines of small dark glyph-like marks on white, like a photographed page."""
    rng = np.random.default_rng(seed)
    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    for top in range(4, height - 12, 14):
        left = 4
        while left < width - 10:
            draw.text((left, top), chr(int(rng.integers(65, 91))), fill=(20, 20, 20))
            left += int(rng.integers(6, 9))
    return image


def photo(width: int, height: int, seed: int) -> Image.Image:
    """A blurred scene of random shapes over a gradient: compresses like a photo."""
    rng = np.random.default_rng(seed)
    ramp = np.linspace(0, 1, width, dtype=np.float32)[None, :, None]
    colors = rng.uniform(0, 255, (2, 3)).astype(np.float32)
    canvas = colors[0] * (1 - ramp) + colors[1] * ramp
    image = Image.fromarray(np.repeat(canvas, height, axis=0).astype(np.uint8), "RGB")
    draw = ImageDraw.Draw(image)
    for _ in range(40):
        x, y = rng.integers(0, width), rng.integers(0, height)
        r = int(rng.integers(min(width, height) // 40 + 1, min(width, height) // 5 + 2))
        draw.ellipse(
            (x - r, y - r, x + r, y + r), fill=tuple(int(c) for c in rng.integers(0, 255, 3))
        )
    return image.filter(ImageFilter.GaussianBlur(radius=max(1, min(width, height) // 300)))


def hard_images(scale: float = 1.0) -> list[tuple[str, Image.Image]]:
    """(name, image) pairs: stripes of several periods both ways, checkerboards, fabric, noise,
    text, photos, and extreme aspect ratios. `scale` < 1 shrinks them for quick tests."""

    def size(width: int, height: int) -> tuple[int, int]:
        return max(int(width * scale), 8), max(int(height * scale), 8)

    images: list[tuple[str, Image.Image]] = []
    for period in (2, 3, 5, 7, 11):
        images.append((f"vertical stripes {period}px", stripes(*size(1200, 900), period)))
        images.append((f"horizontal stripes {period}px", stripes(*size(900, 1200), period, False)))
    for period in (3, 4, 9):
        images.append((f"checkerboard {period}px", checkerboard(*size(1600, 1200), period)))
    images.append(("woven fabric", woven(*size(2000, 1500), 1)))
    images.append(("noise", noise(*size(1024, 768), 2)))
    images.append(("text page", text_page(*size(1240, 1754), 3)))
    images.append(("photo 640x480", photo(*size(640, 480), 4)))
    images.append(("photo 4000x3000", photo(*size(4000, 3000), 5)))
    images.append(("panorama 6000x500", photo(*size(6000, 500), 6)))
    images.append(("tall strip 400x3000", stripes(*size(400, 3000), 4, False)))
    return images


# Sizes that take each of Pillow's pass orders and directions (for a 224-px model): what an
# exact resize must reproduce beside the hard set.
PASS_ORDER_SIZES = [
    (640, 480),  # the seed's photos
    (480, 640),
    (300, 600),  # exactly twice as tall: Pillow still resizes horizontally first
    (300, 601),  # just over: Pillow resizes vertically first
    (300, 5000),
    (5000, 300),
    (224, 224),  # no resize at all
    (225, 224),
    (100, 70),  # upscaling
    (90, 400),  # upscaling a tall image: horizontal first
]


def encoded(image: Image.Image, fmt: str, subsampling: str = "4:2:0") -> bytes:
    """The image as JPEG (quality 90, chroma `subsampling`: 4:2:0 as cameras save) or PNG."""
    buffer = io.BytesIO()
    options = {"quality": 90, "subsampling": subsampling} if fmt == "JPEG" else {}
    image.save(buffer, fmt, **options)
    return buffer.getvalue()


def has_colour(image: Image.Image) -> bool:
    """Whether any pixel is not grey: only then does chroma subsampling change a JPEG."""
    pixels = np.asarray(image.convert("RGB"), dtype=np.int16)
    return bool((pixels != pixels[..., :1]).any())


def is_jpeg(blob: bytes) -> bool:
    """Whether the bytes are a JPEG (its start-of-image marker): the set's device-path share."""
    return blob[:2] == b"\xff\xd8"


def encoded_set(scale: float = 1.0) -> list[tuple[str, bytes]]:
    """(name, bytes) of the fidelity set: every hard image as a 4:2:0 JPEG and as a PNG, and the
    colour ones also as 4:2:2 and 4:4:4 JPEGs. Decoders upsample chroma in their own ways
    (libjpeg's fancy upsampling against nvJPEG's), and each subsampling upsamples differently:
    4:2:0 both ways, 4:2:2 horizontally only, 4:4:4 not at all."""
    blobs: list[tuple[str, bytes]] = []
    for name, image in hard_images(scale):
        blobs.append((f"{name} (JPEG)", encoded(image, "JPEG")))
        blobs.append((f"{name} (PNG)", encoded(image, "PNG")))
        if has_colour(image):
            for subsampling in ("4:2:2", "4:4:4"):
                blob = encoded(image, "JPEG", subsampling)
                blobs.append((f"{name} (JPEG {subsampling})", blob))
    return blobs
