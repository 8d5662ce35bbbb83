"""Image sources, decoding and the resize/crop that must equal CLIPProcessor's."""

from __future__ import annotations

import asyncio
import base64

import numpy as np
import pytest
from PIL import Image

from clip_runner.errors import RequestError
from clip_runner.images import (
    FetchLimits,
    ImageGeometry,
    decode_image,
    decode_inline,
    load_images,
    new_http_client,
    resize_and_crop,
)
from clip_runner.store import build_image_processor
from tests.helpers import as_base64, encode, photo_like

GEOMETRY = ImageGeometry(shortest_edge=224, crop_height=224, crop_width=224)
LIMITS = FetchLimits(max_bytes=2_000_000, timeout_s=5)


def reference_pixels(image: Image.Image) -> np.ndarray:
    """What transformers' CLIP image processor feeds the model."""
    return build_image_processor()(images=image, return_tensors="np")["pixel_values"][0]


def normalised(pixels: np.ndarray) -> np.ndarray:
    processor = build_image_processor()
    mean = np.asarray(processor.image_mean, dtype=np.float32)[:, None, None]
    std = np.asarray(processor.image_std, dtype=np.float32)[:, None, None]
    return (pixels.transpose(2, 0, 1).astype(np.float32) / 255 - mean) / std


@pytest.mark.parametrize("size", [(640, 480), (480, 640), (224, 224), (1000, 225), (301, 999)])
def test_resize_and_crop_matches_clip_processor(size):
    image = photo_like(*size, seed=sum(size))
    pixels = resize_and_crop(image, GEOMETRY)
    assert pixels.shape == (224, 224, 3) and pixels.dtype == np.uint8
    np.testing.assert_allclose(normalised(pixels), reference_pixels(image), atol=1e-5)


def test_small_images_are_upscaled_to_the_crop():
    assert resize_and_crop(Image.new("RGB", (1, 1), (9, 9, 9)), GEOMETRY).shape == (224, 224, 3)


def test_rgba_transparency_becomes_white_like_the_processor():
    image = Image.new("RGBA", (50, 40), (255, 0, 0, 0))
    image.paste((0, 0, 255, 255), (0, 0, 25, 40))
    decoded = decode_image(encode(image), index=0)
    assert decoded.mode == "RGB"
    assert decoded.getpixel((40, 20)) == (255, 255, 255)
    assert decoded.getpixel((5, 20)) == (0, 0, 255)
    np.testing.assert_allclose(
        normalised(resize_and_crop(decoded, GEOMETRY)), reference_pixels(image), atol=1e-5
    )


def test_greyscale_and_palette_become_rgb():
    grey = decode_image(encode(Image.new("L", (20, 20), 77)), index=0)
    assert grey.mode == "RGB" and grey.getpixel((3, 3)) == (77, 77, 77)
    palette = Image.new("P", (20, 20), 1)
    palette.putpalette([0, 0, 0, 10, 200, 30] + [0] * 762)
    decoded = decode_image(encode(palette), index=0)
    assert decoded.getpixel((3, 3)) == (10, 200, 30)


def test_palette_transparency_becomes_white():
    palette = Image.new("P", (20, 20), 1)
    palette.putpalette([0, 0, 0, 10, 200, 30] + [0] * 762)
    palette.info["transparency"] = 1
    assert decode_image(encode(palette), index=0).getpixel((3, 3)) == (255, 255, 255)


def test_cmyk_jpeg_becomes_rgb():
    cmyk = Image.new("CMYK", (32, 32), (0, 255, 255, 0))  # pure red in CMYK
    red, green, blue = decode_image(encode(cmyk, "JPEG", quality=95), index=0).getpixel((10, 10))
    assert red > 200 and green < 60 and blue < 60


def test_sixteen_bit_png_is_scaled_not_clipped():
    deep = Image.fromarray(np.full((8, 8), 40000, dtype=np.uint16))
    value = decode_image(encode(deep), index=0).getpixel((2, 2))
    assert value == (round(40000 / 257),) * 3


def test_exif_orientation_is_applied():
    image = Image.new("RGB", (60, 30), (255, 0, 0))
    image.paste((0, 255, 0), (0, 0, 30, 30))  # left half green
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise for display
    decoded = decode_image(encode(image, "JPEG", exif=exif, quality=95), index=0)
    assert decoded.size == (30, 60)
    top_red, top_green, _ = decoded.getpixel((15, 5))
    assert top_green > 200 and top_red < 60  # the green left half is now on top


def test_base64_and_data_uri_decode_to_the_same_bytes():
    raw = encode(photo_like(20, 10, seed=1))
    text = base64.b64encode(raw).decode()
    assert decode_inline(text, 0, 10_000) == raw
    assert decode_inline(f"data:image/png;base64,{text}", 0, 10_000) == raw
    wrapped = "\n".join(text[i : i + 60] for i in range(0, len(text), 60))
    assert decode_inline(wrapped, 0, 10_000) == raw


@pytest.mark.parametrize(
    ("source", "reason"),
    [
        ("file:///etc/passwd", "unsupported URL scheme 'file'"),
        ("ftp://example/x.png", "unsupported URL scheme 'ftp'"),
        ("data:image/png,rawbytes", "must be base64"),
        ("data:text/html;base64,aGk=", "not an image"),
        ("not base64 at all!", "not an http(s) URL, data: URI or valid base64"),
        ("", "empty"),
    ],
)
def test_bad_inline_sources_name_the_index_and_reason(source, reason):
    with pytest.raises(RequestError) as raised:
        decode_inline(source, 4, 10_000)
    assert raised.value.status == 422 and raised.value.index == 4
    assert reason in raised.value.message and "images[4]" in raised.value.message


def test_inline_size_limit_is_checked_before_decoding():
    with pytest.raises(RequestError, match="larger than the 100-byte limit"):
        decode_inline("A" * 1000, 0, 100)


@pytest.mark.parametrize("data", [b"", b"hello, not an image", encode(photo_like(64, 64, 2))[:200]])
def test_undecodable_bytes_are_a_422(data):
    with pytest.raises(RequestError) as raised:
        decode_image(data, index=2)
    assert raised.value.index == 2 and "images[2]" in raised.value.message


def test_decompression_bombs_are_a_422_not_a_crash():
    bomb = encode(Image.new("1", (14_000, 14_000)))  # 196 Mpx: past Pillow's hard limit
    with pytest.raises(RequestError, match="decompression bomb"):
        decode_image(bomb, index=0)


def run(coroutine):
    return asyncio.run(coroutine)


def test_load_images_mixes_urls_base64_and_data_uris(image_dir, image_server):
    photo = photo_like(300, 200, seed=3)
    photo.save(image_dir / "mixed.png")
    sources = [
        f"{image_server}/mixed.png",
        as_base64(photo),
        "data:image/png;base64," + as_base64(photo),
    ]

    async def load():
        async with new_http_client(5) as client:
            return await load_images(sources, client, GEOMETRY, LIMITS)

    pixels = run(load())
    assert pixels.shape == (3, 224, 224, 3)
    assert (pixels[0] == pixels[1]).all() and (pixels[1] == pixels[2]).all()


@pytest.mark.parametrize(
    ("path", "reason"),
    [("/status/404", "HTTP 404"), ("/status/500", "HTTP 500"), ("/missing.png", "HTTP 404")],
)
def test_url_failures_name_the_status(image_server, path, reason):
    async def load():
        async with new_http_client(5) as client:
            return await load_images(
                [as_base64(photo_like(10, 10, 1)), f"{image_server}{path}"],
                client,
                GEOMETRY,
                LIMITS,
            )

    with pytest.raises(RequestError) as raised:
        run(load())
    assert raised.value.index == 1 and reason in raised.value.message


def test_url_size_cap_holds(image_dir, image_server):
    (image_dir / "big.bin").write_bytes(b"\0" * 50_000)

    async def load():
        async with new_http_client(5) as client:
            return await load_images(
                [f"{image_server}/big.bin"], client, GEOMETRY, FetchLimits(10_000, 5)
            )

    with pytest.raises(RequestError, match="larger than the 10000-byte limit"):
        run(load())


def test_unreachable_host_is_a_422():
    async def load():
        async with new_http_client(2) as client:
            return await load_images(["http://127.0.0.1:9/x.png"], client, GEOMETRY, LIMITS)

    with pytest.raises(RequestError, match="could not fetch"):
        run(load())
