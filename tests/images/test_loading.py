"""Image sources, decoding and the resize/crop that must equal CLIPProcessor's."""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import io

import numpy as np
import pytest
from PIL import Image, ImageOps
from transformers import CLIPImageProcessorPil
from transformers.image_transforms import convert_to_rgb

import clip_runner.images.loading
from clip_runner.errors import RequestError
from clip_runner.images.decode_budget import DecodeBudget
from clip_runner.images.fetch import AddressPolicy, FetchLimits, new_fetch_client
from clip_runner.images.loading import (
    EXACT_RESIZE_MAX_ASPECT,
    ImageGeometry,
    ImageLimits,
    decode_image,
    decode_inline,
    decoded_pixels,
    device_decodable_jpeg,
    ends_after_its_scan,
    load_images,
    prepare_image,
    reduce_large,
    resize_and_crop,
    stored_as_rgb,
    stored_pixels,
    to_rgb,
)
from clip_runner.model.resample import DEVICE_MAX_DOWNSCALE
from clip_runner.model.store import OPENAI_STD, build_image_processor
from tests.hard_images import encoded_set
from tests.helpers import (
    PUBLIC_HOST,
    as_base64,
    as_rgb,
    encode,
    oriented_exif,
    photo_like,
    pillow_resize_and_crop,
    pillows_own,
    with_preview,
    ycck_jpeg,
)

GEOMETRY = ImageGeometry(shortest_edge=224, crop_height=224, crop_width=224)
LIMITS = ImageLimits(FetchLimits(max_bytes=2_000_000, timeout_s=5), max_pixels=50_000_000)
MAX_PIXELS = LIMITS.max_pixels
PUBLIC_ONLY = AddressPolicy.from_allowlist([PUBLIC_HOST])


@pytest.fixture(params=["compiled", "pillow"])
def resize_path(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Both resizers: the compiled one (numba, the default) and Pillow's (without numba)."""
    if request.param == "pillow":
        monkeypatch.setattr(clip_runner.images.loading, "compiled_resizer", lambda: None)
    else:
        assert clip_runner.images.loading.compiled_resizer(), "numba is in requirements.txt"
    return request.param


def reference_pixels(image: Image.Image) -> np.ndarray:
    """What transformers' CLIP image processor feeds the model."""
    return build_image_processor()(images=image, return_tensors="np")["pixel_values"][0]


def normalised(pixels: np.ndarray) -> np.ndarray:
    processor = build_image_processor()
    mean = np.asarray(processor.image_mean, dtype=np.float32)[:, None, None]
    std = np.asarray(processor.image_std, dtype=np.float32)[:, None, None]
    return (pixels.transpose(2, 0, 1).astype(np.float32) / 255 - mean) / std


@pytest.mark.parametrize("size", [(640, 480), (480, 640), (224, 224), (900, 225), (301, 999)])
def test_resize_and_crop_matches_clip_processor(size, resize_path):
    image = photo_like(*size, seed=sum(size))
    pixels = resize_and_crop(image, GEOMETRY)
    assert pixels.shape == (224, 224, 3) and pixels.dtype == np.uint8
    np.testing.assert_allclose(normalised(pixels), reference_pixels(image), atol=1e-5)


@pytest.mark.parametrize(
    "geometry",  # crops larger than the resized image by odd and even counts, and one smaller
    [ImageGeometry(64, 64, 96), ImageGeometry(64, 67, 97), ImageGeometry(64, 70, 100)],
    ids=str,
)
def test_a_crop_larger_than_the_resized_image_is_padded_where_clip_processor_pads(
    geometry, resize_path
):
    image = photo_like(1043, 699, seed=5)  # resized to 95x64
    processor = CLIPImageProcessorPil(
        size={"shortest_edge": geometry.shortest_edge},
        crop_size={"height": geometry.crop_height, "width": geometry.crop_width},
        resample=3,
        do_rescale=False,
        do_normalize=False,
    )
    expected = processor(images=image, return_tensors="np")["pixel_values"][0].transpose(1, 2, 0)
    pixels = prepare_image(encode(image), 0, geometry, MAX_PIXELS)
    np.testing.assert_array_equal(pixels, expected.round().astype(np.uint8))


@pytest.mark.parametrize("size", [(640, 480), (1, 1), (3, 1000)])
@pytest.mark.parametrize("copy", ["whole", "in strips"])
@pytest.mark.parametrize("mode", ["RGB", "L"])
def test_stored_pixels_are_the_rgb_pixels_and_a_padding_byte_or_the_grey_ones(
    size, copy, mode, monkeypatch
):
    if copy == "in strips":  # as for images over 32 MB; 1000 rows are not a multiple of a strip
        monkeypatch.setattr(clip_runner.images.loading, "WHOLE_COPY_MAX_BYTES", 0)
    image = photo_like(*size, seed=3).convert(mode)
    pixels = stored_pixels(image)
    assert pixels.shape == (size[1], size[0], *((4,) if mode == "RGB" else ())), mode
    assert pixels.dtype == np.uint8
    np.testing.assert_array_equal(as_rgb(pixels), np.asarray(image.convert("RGB")))


def oriented_jpeg(image: Image.Image, orientation: int) -> bytes:
    return encode(image, "JPEG", quality=95, exif=oriented_exif(image, orientation))


def test_jpegs_are_decoded_into_the_array_as_stored_and_other_images_copied(monkeypatch):
    copied = []
    copy = clip_runner.images.loading.stored_pixels
    monkeypatch.setattr(
        clip_runner.images.loading, "stored_pixels", lambda image: copied.append(1) or copy(image)
    )
    photo = photo_like(64, 48, seed=2)
    sources = {  # bytes, copies, orientation left to the resize
        "upright JPEG": (encode(photo, "JPEG", quality=90), 0, 1),
        "rotated JPEG": (oriented_jpeg(photo, 6), 0, 6),
        "greyscale JPEG": (encode(photo.convert("L"), "JPEG"), 0, 1),
        "rotated greyscale JPEG": (oriented_jpeg(photo.convert("L"), 8), 0, 8),
        "CMYK JPEG": (encode(photo.convert("CMYK"), "JPEG"), 1, 1),
        "PNG": (encode(photo, "PNG"), 1, 1),
        "greyscale PNG": (encode(photo.convert("L"), "PNG"), 1, 1),
        "rotated PNG": (encode(photo, "PNG", exif=oriented_exif(photo, 8)), 1, 1),
        "a camera's turned JPEG with a preview after it (MPO)": (
            with_preview(photo, photo_like(20, 10, seed=3), exif=oriented_exif(photo, 6)),
            0,
            6,
        ),
    }
    for name, (blob, copies, orientation) in sources.items():
        copied.clear()
        pixels, left_to_turn = decoded_pixels(blob, 0, MAX_PIXELS)
        assert (len(copied), left_to_turn) == (copies, orientation), name
        with Image.open(io.BytesIO(blob)) as image:
            expected = pillows_own(blob) if orientation != 1 else np.asarray(to_rgb(image))
        np.testing.assert_array_equal(as_rgb(pixels), expected, err_msg=name)


@pytest.mark.parametrize("orientation", range(1, 10))  # 9: not an orientation, left as stored
@pytest.mark.parametrize("size", [(301, 200), (500, 200), (200, 500)])  # both pass orders
@pytest.mark.parametrize("mode", ["RGB", "L"])
def test_jpegs_of_every_exif_orientation_give_clip_processors_pixels_upright(
    orientation, size, mode, resize_path
):
    blob = oriented_jpeg(photo_like(*size, seed=orientation).convert(mode), orientation)
    with Image.open(io.BytesIO(blob)) as stored:
        upright = ImageOps.exif_transpose(stored)
    assert upright.size == (size[::-1] if orientation in (5, 6, 7, 8) else size)
    pixels = prepare_image(blob, 0, GEOMETRY, MAX_PIXELS)
    np.testing.assert_allclose(normalised(pixels), reference_pixels(upright), atol=1e-5)


def sixteen_bit(image: Image.Image) -> Image.Image:
    return Image.fromarray(np.asarray(image.convert("L")).astype(np.uint16) * 257)


GREY = photo_like(301, 200, seed=3).convert("L")


@pytest.mark.parametrize(
    ("image", "save_args", "stays_grey"),
    [
        pytest.param(GREY, {}, True, id="greyscale"),
        pytest.param(GREY.convert("1"), {}, True, id="bilevel, as faxes and scans"),
        pytest.param(sixteen_bit(GREY), {}, True, id="16-bit greyscale"),
        pytest.param(GREY, {"exif": oriented_exif(GREY, 6)}, True, id="rotated greyscale"),
        pytest.param(GREY, {"transparency": 77}, False, id="greyscale, one value transparent"),
        pytest.param(GREY.convert("LA"), {}, False, id="greyscale with alpha"),
        pytest.param(photo_like(301, 200, seed=3).convert("P"), {}, False, id="palette"),
    ],
)
def test_opaque_greyscale_images_stay_grey_to_the_pixels_of_their_rgb(image, save_args, stays_grey):
    """A greyscale PNG of any depth is copied out in one byte per pixel and resized in its
    one channel: the crop equals the one of the image converted to RGB (the path every other
    image takes, `decode_image`); with transparency it is composited onto white first."""
    blob = encode(image, "PNG", **save_args)
    pixels, orientation = decoded_pixels(blob, 0, MAX_PIXELS)
    assert (pixels.ndim == 2) == stays_grey and orientation == 1
    crop = prepare_image(blob, 0, GEOMETRY, MAX_PIXELS)
    via_rgb = resize_and_crop(decode_image(blob, 0, MAX_PIXELS), GEOMETRY)
    np.testing.assert_array_equal(crop, via_rgb)


def test_a_broken_jpeg_decoded_into_an_array_is_a_422_naming_it():
    blob = encode(photo_like(64, 48, seed=2), "JPEG")
    with pytest.raises(RequestError, match=r"images\[3\]: not a decodable image") as raised:
        decoded_pixels(blob[: len(blob) // 2], 3, MAX_PIXELS)
    assert raised.value.status == 422


def test_small_images_are_upscaled_to_the_crop():
    assert resize_and_crop(Image.new("RGB", (1, 1), (9, 9, 9)), GEOMETRY).shape == (224, 224, 3)


def test_rgba_transparency_becomes_white_like_the_processor():
    image = Image.new("RGBA", (50, 40), (255, 0, 0, 0))
    image.paste((0, 0, 255, 255), (0, 0, 25, 40))
    decoded = decode_image(encode(image), index=0, max_pixels=MAX_PIXELS)
    assert decoded.mode == "RGB"
    assert decoded.getpixel((40, 20)) == (255, 255, 255)
    assert decoded.getpixel((5, 20)) == (0, 0, 255)
    np.testing.assert_allclose(
        normalised(resize_and_crop(decoded, GEOMETRY)), reference_pixels(image), atol=1e-5
    )


def test_every_value_at_every_alpha_lands_on_white_as_transformers_composites_it():
    """All 65,536 (value, alpha) pairs, each colour byte a different value, against
    transformers' own `convert_to_rgb` (what CLIPImageProcessor applies)."""
    value = np.tile(np.arange(256, dtype=np.uint8), (256, 1))
    alpha = value.T.copy()
    rgba = Image.fromarray(np.stack([value, value[:, ::-1], value ^ 0x5A, alpha], axis=-1))
    expected = convert_to_rgb(rgba, return_numpy=True)
    decoded = decode_image(encode(rgba), index=0, max_pixels=MAX_PIXELS)
    np.testing.assert_array_equal(np.asarray(decoded), expected)


def test_greyscale_and_palette_become_rgb():
    grey = decode_image(encode(Image.new("L", (20, 20), 77)), index=0, max_pixels=MAX_PIXELS)
    assert grey.mode == "RGB" and grey.getpixel((3, 3)) == (77, 77, 77)
    palette = Image.new("P", (20, 20), 1)
    palette.putpalette([0, 0, 0, 10, 200, 30] + [0] * 762)
    decoded = decode_image(encode(palette), index=0, max_pixels=MAX_PIXELS)
    assert decoded.getpixel((3, 3)) == (10, 200, 30)


def test_palette_transparency_becomes_white():
    palette = Image.new("P", (20, 20), 1)
    palette.putpalette([0, 0, 0, 10, 200, 30] + [0] * 762)
    palette.info["transparency"] = 1
    assert decode_image(encode(palette), index=0, max_pixels=MAX_PIXELS).getpixel((3, 3)) == (
        255,
        255,
        255,
    )


def test_an_rgb_image_with_one_colour_transparent_becomes_white_as_transformers_has_it():
    """A logo whose background colour a tRNS key makes transparent: the key had been ignored
    for RGB images (cosine 0.59 from the reference's embedding on a random ViT-B/32)."""
    logo = Image.new("RGB", (40, 30), (0, 0, 0))
    logo.paste((200, 30, 40), (10, 5, 30, 25))
    blob = encode(logo, "PNG", transparency=(0, 0, 0))
    decoded = np.asarray(decode_image(blob, index=0, max_pixels=MAX_PIXELS))
    with Image.open(io.BytesIO(blob)) as stored:
        np.testing.assert_array_equal(decoded, convert_to_rgb(stored, return_numpy=True))
    assert tuple(decoded[0, 0]) == (255, 255, 255) and tuple(decoded[15, 20]) == (200, 30, 40)


@pytest.mark.parametrize("keep_grey", [False, True])
def test_sixteen_bit_values_are_scaled_however_dark_and_their_key_is_kept(keep_grey):
    """Values 100 and 255 of 65,535 are nearly black: they had been read as 8-bit ones (100,
    255) unless some value passed 255; and a 16-bit tRNS key had been dropped."""
    values = np.array([[0, 100, 255, 40000]], dtype=np.uint16)
    opaque = encode(Image.fromarray(values), "PNG")
    keyed = encode(Image.fromarray(values), "PNG", transparency=0)
    if keep_grey:  # the API workers' path: one byte per pixel while the image is opaque grey
        grey, _ = decoded_pixels(opaque, 0, MAX_PIXELS)
        assert grey.tolist() == [[0, 0, 1, 156]]
        rgb, _ = decoded_pixels(keyed, 0, MAX_PIXELS)
    else:
        grey = np.asarray(decode_image(opaque, index=0, max_pixels=MAX_PIXELS))
        assert grey[..., 0].tolist() == [[0, 0, 1, 156]]
        rgb = np.asarray(decode_image(keyed, index=0, max_pixels=MAX_PIXELS))
    assert rgb[..., 0].tolist() == [[255, 0, 1, 156]] and rgb.shape[:2] == (1, 4)  # colour: RGB


def test_cmyk_jpeg_becomes_rgb():
    cmyk = Image.new("CMYK", (32, 32), (0, 255, 255, 0))  # pure red in CMYK
    red, green, blue = decode_image(
        encode(cmyk, "JPEG", quality=95), index=0, max_pixels=MAX_PIXELS
    ).getpixel((10, 10))
    assert red > 200 and green < 60 and blue < 60


def test_sixteen_bit_png_is_scaled_not_clipped():
    deep = Image.fromarray(np.full((8, 8), 40000, dtype=np.uint16))
    value = decode_image(encode(deep), index=0, max_pixels=MAX_PIXELS).getpixel((2, 2))
    assert value == (round(40000 / 257),) * 3


def test_exif_orientation_is_applied():
    image = Image.new("RGB", (60, 30), (255, 0, 0))
    image.paste((0, 255, 0), (0, 0, 30, 30))  # left half green
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise for display
    decoded = decode_image(
        encode(image, "JPEG", exif=exif, quality=95), index=0, max_pixels=MAX_PIXELS
    )
    assert decoded.size == (30, 60)
    top_red, top_green, _ = decoded.getpixel((15, 5))
    assert top_green > 200 and top_red < 60  # the green left half is now on top


def test_base64_and_data_uri_decode_to_the_same_bytes():
    raw = encode(photo_like(20, 10, seed=1))
    text = base64.b64encode(raw).decode()
    assert decode_inline(text, 0, 10_000) == raw
    assert decode_inline(f"data:image/png;base64,{text}", 0, 10_000) == raw
    assert decode_inline(f"DATA:IMAGE/PNG;BASE64,{text}", 0, 10_000) == raw  # any case
    wrapped = "\n".join(text[i : i + 60] for i in range(0, len(text), 60))
    assert decode_inline(wrapped, 0, 10_000) == raw


@pytest.mark.parametrize("size", [999, 1000])  # 1000 and 999 are no multiple of 3
def test_an_image_of_exactly_the_byte_limit_is_taken_one_byte_more_is_not(size):
    """An image of exactly the limit whose size is no multiple of 3 had been refused as larger
    than it (its padding was counted as image bytes)."""
    exact = bytes(range(256)) * 4
    text = base64.b64encode(exact[:size]).decode()
    assert decode_inline(text, 0, size) == exact[:size]
    wrapped = "\n".join(text[i : i + 60] for i in range(0, len(text), 60))
    assert decode_inline(wrapped, 0, size) == exact[:size]
    with pytest.raises(RequestError, match=f"larger than the {size - 1}-byte limit"):
        decode_inline(text, 0, size - 1)


def standard_library_decode(payload: str) -> bytes | None:
    """What inline base64 meant before the SIMD decoder: the standard library, strict first,
    then without whitespace, padded, URL-safe alphabet mapped; None where both refuse."""
    for candidate in (payload, None):
        if candidate is None:
            candidate = "".join(payload.split())
            candidate += "=" * (-len(candidate) % 4)
            candidate = candidate.replace("-", "+").replace("_", "/")
        try:
            return base64.b64decode(candidate, validate=True)
        except ValueError:  # binascii.Error included
            continue
    return None


def test_inline_base64_means_what_the_standard_library_decodes():
    """The SIMD decoder (pybase64) refuses surplus padding that the standard library accepts;
    the lenient path must then give the same bytes. Random short strings over both alphabets,
    padding and whitespace, and a real image's base64 cut and broken in several ways."""
    rng = np.random.default_rng(7)
    alphabet = list("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/=-_ \n")
    text = base64.b64encode(encode(photo_like(20, 10, seed=2))).decode()
    sources = [text, text + "=", text + "==", text[:-1], text[:-2], text.replace("+", "-")]
    sources += [text[:40] + " " + text[40:], text[:41] + "=" + text[41:], "IsEf=", "QUI", "Q==="]
    sources += ["".join(rng.choice(alphabet, size=int(rng.integers(1, 14)))) for _ in range(3000)]
    for source in sources:
        expected = standard_library_decode(source)
        try:
            ours = decode_inline(source, 0, 10_000)
        except RequestError:
            ours = None
        assert ours == (expected or None), source


@pytest.mark.parametrize(
    ("source", "reason"),
    [
        ("file:///etc/passwd", "unsupported URL scheme 'file'"),
        ("ftp://example/x.png", "unsupported URL scheme 'ftp'"),
        ("data:image/png,rawbytes", "must be base64"),
        ("data:text/html;base64,aGk=", "not an image"),
        ("not base64 at all!", "neither valid base64 nor an http(s):// or s3://bucket/key URL"),
        ("s3:/bucket/key.jpg", "'s3:/bucket/key.jpg' is not an s3://bucket/key URL"),
        ("S3:bucket/key.jpg", "'S3:bucket/key.jpg' is not an s3://bucket/key URL"),
        ("gs://bucket/key.jpg", "'gs': send an http(s):// or s3://bucket/key URL or a data:"),
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
        decode_image(data, index=2, max_pixels=MAX_PIXELS)
    assert raised.value.index == 2 and "images[2]" in raised.value.message


def test_pixel_limit_is_checked_from_the_header_before_decoding():
    big = encode(Image.new("1", (14_000, 14_000)))  # 196 Mpx, a few kB of PNG
    with pytest.raises(RequestError, match="14000x14000, more than the 50000000-pixel limit"):
        decode_image(big, index=0, max_pixels=MAX_PIXELS)
    with pytest.raises(RequestError, match="more than the 100-pixel limit"):
        decode_image(encode(Image.new("RGB", (11, 10))), index=0, max_pixels=100)


@pytest.mark.parametrize("size", [(1, 1), (1, 5000), (9000, 2), (3000, 40)])
def test_tiny_and_extreme_aspect_ratio_images_are_classifiable(size, resize_path):
    image = photo_like(*size, seed=3)
    assert resize_and_crop(image, GEOMETRY).shape == (224, 224, 3)


def test_extreme_aspect_ratios_are_exact_compiled_and_within_a_grey_level_with_pillow(
    resize_path,
):
    image = photo_like(5000, 230, seed=4)
    ours = normalised(resize_and_crop(image, GEOMETRY))
    grey_levels = 0 if resize_path == "compiled" else 1
    tolerance = grey_levels / 255 / min(OPENAI_STD) + 1e-5
    assert np.abs(ours - reference_pixels(image)).max() <= tolerance


def test_animated_images_use_the_first_frame():
    frames = [Image.new("RGB", (20, 20), color) for color in [(255, 0, 0), (0, 0, 255)]]
    for fmt in ("GIF", "WEBP"):
        buffer = io.BytesIO()
        frames[0].save(buffer, fmt, save_all=True, append_images=frames[1:], duration=50, loop=0)
        red, _, blue = decode_image(buffer.getvalue(), 0, MAX_PIXELS).getpixel((10, 10))
        assert red > 200 and blue < 60, fmt


@pytest.mark.parametrize(
    "data",
    [
        b'<svg xmlns="http://www.w3.org/2000/svg" width="10" height="10"></svg>',
        b"<!doctype html><html><body>not an image</body></html>",
        b"GIF89a" + b"\0" * 10,
        b"\xff\xd8\xff\xe0" + b"\0" * 64,
    ],
)
def test_things_pretending_to_be_images_are_refused(data):
    with pytest.raises(RequestError) as raised:
        decode_image(data, index=0, max_pixels=MAX_PIXELS)
    assert raised.value.status == 422


def test_truncated_jpeg_is_refused():
    jpeg = encode(photo_like(300, 300, seed=5), "JPEG", quality=90)
    with pytest.raises(RequestError, match="not a decodable image"):
        decode_image(jpeg[: len(jpeg) // 2], index=0, max_pixels=MAX_PIXELS)


def run(coroutine):
    return asyncio.run(coroutine)


def load(sources, limits=LIMITS):
    async def go():
        async with new_fetch_client(PUBLIC_ONLY, limits.fetch) as client:
            return await load_images(sources, client, GEOMETRY, limits)

    return run(go())


def test_load_images_mixes_urls_base64_and_data_uris(image_dir, image_server):
    photo = photo_like(300, 200, seed=3)
    photo.save(image_dir / "mixed.png")
    pixels = load(
        [
            f"{image_server}/mixed.png",
            as_base64(photo),
            "data:image/png;base64," + as_base64(photo),
        ]
    )
    assert [item.shape for item in pixels] == [(224, 224, 3)] * 3
    assert (pixels[0] == pixels[1]).all() and (pixels[1] == pixels[2]).all()


def test_small_baseline_jpegs_are_decoded_on_the_event_loop_the_rest_in_a_thread(monkeypatch):
    """The same pixels either way; a thread for JPEGs above ON_LOOP_MAX_PIXELS and for every
    progressive JPEG or other format, whatever its size."""
    threaded: list[object] = []
    real_run = DecodeBudget.run

    async def counting_run(budget, pixels, work):
        assert work.func is clip_runner.images.loading.prepare_image
        threaded.append(work.args[1])  # the image's index
        return await real_run(budget, pixels, work)

    monkeypatch.setattr(DecodeBudget, "run", counting_run)
    small, large = photo_like(640, 480, seed=6), photo_like(1000, 600, seed=7)
    assert 640 * 480 <= clip_runner.images.loading.ON_LOOP_MAX_PIXELS < 1000 * 600
    progressive = base64.b64encode(encode(small, "JPEG", progressive=True)).decode()
    sources = [as_base64(small, "JPEG"), as_base64(large, "JPEG"), progressive, as_base64(small)]
    loaded = load(sources)
    assert sorted(threaded) == [1, 2, 3]  # all but the small baseline JPEG (in any order)
    # everything to threads
    monkeypatch.setattr(clip_runner.images.loading, "ON_LOOP_MAX_PIXELS", 0)
    assert (load(sources[:1])[0] == loaded[0]).all()
    assert threaded[3:] == [0]


def test_forwarding_sends_only_jpegs_the_device_decodes_exactly(image_dir, image_server):
    """Baseline YCbCr/greyscale JPEGs go as their own bytes, those stored turned (an EXIF
    orientation: the runner turns them) too; progressive, CMYK and RGB-stored JPEGs, JPEGs with
    a preview after them (MPO: what nvJPEG makes of the bytes after the first image is
    unmeasured) and PNGs are decoded here as before."""
    photo = photo_like(320, 240, seed=4)
    baseline = encode(photo, "JPEG", quality=90)
    grey = encode(photo.convert("L"), "JPEG", quality=90)
    rotated = encode(photo, "JPEG", quality=90, exif=oriented_exif(photo, 6))
    progressive = encode(photo, "JPEG", quality=90, progressive=True)
    cmyk = encode(photo.convert("CMYK"), "JPEG", quality=90)
    rgb = encode(photo, "JPEG", quality=90, keep_rgb=True)  # no YCbCr: an Adobe marker says so
    preview = with_preview(photo, photo_like(20, 10, seed=1))
    blobs = (baseline, grey, rotated, progressive, cmyk, rgb)
    sources = [base64.b64encode(data).decode() for data in blobs]
    sources += [as_base64(photo), base64.b64encode(preview).decode()]
    loaded = load(sources, dataclasses.replace(LIMITS, forward_jpegs=True))
    assert loaded[:3] == [baseline, grey, rotated]
    assert all(isinstance(item, np.ndarray) for item in loaded[3:])
    assert loaded[4].shape == (224, 224, 3)
    assert (loaded[5] == prepare_image(rgb, 0, GEOMETRY, MAX_PIXELS)).all()


def test_a_runner_decoding_with_pillow_is_sent_progressive_rgb_and_cmyk_jpegs_and_mpos_too():
    """Where the runner decodes with Pillow (the GPU default), it gives the pixels this worker's
    own decode gives for every JPEG: progressive, RGB-stored and CMYK ones (Adobe's inverted
    CMYK, as Pillow writes it, and YCCK, as libjpeg-turbo does) and a camera's MPO go as their
    bytes too. Truncated files and PNGs are still decoded here; with nvJPEG (`pillow_runner`
    False) the progressive, RGB-stored and CMYK JPEGs and the MPO are as well."""
    photo = photo_like(320, 240, seed=6)
    progressive = encode(photo, "JPEG", quality=90, progressive=True)
    grey_progressive = encode(photo.convert("L"), "JPEG", quality=90, progressive=True)
    mpo = with_preview(photo, photo_like(20, 10, seed=1), quality=90)
    rgb = encode(photo, "JPEG", quality=90, keep_rgb=True)
    cmyk = encode(photo.convert("CMYK"), "JPEG", quality=90)
    ycck = ycck_jpeg(photo)
    blobs = (progressive, grey_progressive, mpo, rgb, cmyk, ycck)
    sources = [base64.b64encode(data).decode() for data in blobs] + [as_base64(photo)]
    pillow_runner = dataclasses.replace(LIMITS, forward_jpegs=True, pillow_runner=True)
    loaded = load(sources, pillow_runner)
    assert loaded[:6] == list(blobs)
    assert isinstance(loaded[6], np.ndarray)
    for whole in (progressive, cmyk):
        with pytest.raises(RequestError, match="image file is truncated"):
            load([base64.b64encode(whole[: len(whole) // 2]).decode()], pillow_runner)
    nvjpeg_runner = dataclasses.replace(LIMITS, forward_jpegs=True)
    assert all(isinstance(item, np.ndarray) for item in load(sources[:6], nvjpeg_runner))


def test_a_forwarded_jpeg_has_its_header_read_once(monkeypatch):
    """The pixel budget and the forwarding check share one read of the header: a second had
    cost an API worker about 30 us an image where JPEGs go to the device."""
    baseline = encode(photo_like(320, 240, seed=4), "JPEG", quality=90)
    opened = []
    real_open = Image.open

    def counted(*args, **kwargs):
        opened.append(1)
        return real_open(*args, **kwargs)

    monkeypatch.setattr(Image, "open", counted)
    limits = dataclasses.replace(LIMITS, forward_jpegs=True)
    assert load([base64.b64encode(baseline).decode()], limits) == [baseline]
    assert len(opened) == 1


def test_truncated_jpegs_are_decoded_here_and_refused_as_on_the_cpu():
    """Pillow refuses a JPEG that stops before its end marker, even by two bytes (a 422 on the
    API path); nvJPEG might decode what is there. So only complete JPEGs are forwarded: an end
    marker in the EXIF data, before the scan, does not count; data after the end does not
    matter (some phones append their own)."""
    photo = photo_like(320, 240, seed=5)
    exif = photo.getexif()
    exif[0x010F] = "camera"
    with_thumbnail_end = encode(photo, "JPEG", quality=90, exif=exif.tobytes() + b"\xff\xd9")
    complete = encode(photo, "JPEG", quality=90)
    limits = dataclasses.replace(LIMITS, forward_jpegs=True)
    for whole in (complete, with_thumbnail_end):
        assert ends_after_its_scan(whole)
        assert load([base64.b64encode(whole).decode()], limits)[0] == whole
        trailer = whole + b"SEFH" + bytes(100)
        assert load([base64.b64encode(trailer).decode()], limits)[0] == trailer
        for truncated in (whole[:-2], whole[: len(whole) // 2]):
            assert not ends_after_its_scan(truncated)
            with pytest.raises(RequestError, match="image file is truncated") as refused:
                load([as_base64(photo), base64.b64encode(truncated).decode()], limits)
            assert refused.value.status == 422 and "images[1]" in str(refused.value)


def jpeg_with_markers(jfif: bool, adobe_transform: int | None, component_ids: bytes) -> bytes:
    """A baseline 3-component JPEG whose JFIF and Adobe markers and component ids are set by
    hand, the three things libjpeg reads its colour space from."""
    data = bytearray(encode(photo_like(32, 24, seed=9), "JPEG", quality=90, keep_rgb=True))
    segments, position = [], 2  # after SOI: every marker segment up to the scan
    while data[position + 1] != 0xDA:
        length = int.from_bytes(data[position + 2 : position + 4], "big")
        segments.append(bytes(data[position : position + 2 + length]))
        position += 2 + length
    kept = [segment for segment in segments if segment[1] not in (0xE0, 0xEE)]
    for number, segment in enumerate(kept):
        if segment[1] == 0xC0:  # SOF0: each component's id, then sampling and table
            frame = bytearray(segment)
            for component in range(3):
                frame[10 + 3 * component] = component_ids[component]
            kept[number] = bytes(frame)
    markers = []
    if jfif:
        markers.append(b"\xff\xe0\x00\x10JFIF\x00\x01\x01\x00\x00\x01\x00\x01\x00\x00")
    if adobe_transform is not None:
        markers.append(b"\xff\xee\x00\x0eAdobe\x00\x64\x00\x00\x00\x00" + bytes([adobe_transform]))
    scan = bytearray(data[position:])
    for component in range(3):  # the scan names its components by the frame's ids
        scan[5 + 2 * component] = component_ids[component]
    return b"\xff\xd8" + b"".join(markers) + b"".join(kept) + bytes(scan)


@pytest.mark.parametrize(
    ("jfif", "adobe_transform", "component_ids", "as_rgb"),
    [
        (True, None, b"\x01\x02\x03", False),  # what cameras and Pillow write
        (False, 0, b"RGB", True),  # Pillow's keep_rgb, Adobe's RGB exports
        (False, 1, b"RGB", False),  # the Adobe marker says YCbCr whatever the ids
        (True, 0, b"RGB", False),  # JFIF comes first in libjpeg's rule
        (False, None, b"RGB", True),  # no marker: the ids decide
        (False, None, b"\x01\x02\x03", False),
        (False, None, b"\x07\x08\x09", False),  # unknown ids: libjpeg assumes YCbCr
    ],
)
def test_jpegs_stored_as_rgb_are_found_by_libjpegs_rule(
    jfif, adobe_transform, component_ids, as_rgb
):
    """Each case decodes with Pillow (libjpeg), and its colours tell which colour space libjpeg
    read: the header rule must agree with them."""
    data = jpeg_with_markers(jfif, adobe_transform, component_ids)
    with Image.open(io.BytesIO(data)) as opened:
        assert stored_as_rgb(opened) is as_rgb
        decoded = np.asarray(opened.convert("RGB"), dtype=np.int16)
    original = np.asarray(photo_like(32, 24, seed=9), dtype=np.int16)
    # The file holds RGB samples: read as RGB they are the photo, read as YCbCr they are not.
    assert bool(np.abs(decoded - original).mean() < 12) is as_rgb
    assert device_decodable_jpeg(data, MAX_PIXELS, shortest_edge=224) is not as_rgb


def test_a_jpeg_past_the_device_resizes_exact_downscale_is_decoded_here():
    """The device resize is exact up to a shortest-side downscale of DEVICE_MAX_DOWNSCALE; a
    larger JPEG (a 10,752-px side for 224; here a small model edge stands in) is not forwarded."""
    data = encode(photo_like(500, 400, seed=2), "JPEG")
    edge = 400 // DEVICE_MAX_DOWNSCALE  # 400 px is more than DEVICE_MAX_DOWNSCALE x edge
    assert not device_decodable_jpeg(data, MAX_PIXELS, shortest_edge=edge)
    assert device_decodable_jpeg(data, MAX_PIXELS, shortest_edge=edge + 1)


def test_forwarding_still_checks_the_pixel_limit_from_the_header():
    big = base64.b64encode(encode(photo_like(400, 300, seed=1), "JPEG")).decode()
    limits = dataclasses.replace(LIMITS, forward_jpegs=True, max_pixels=100_000)
    with pytest.raises(RequestError, match="more than the 100000-pixel limit"):
        load([big], limits)


def test_the_default_path_is_clip_image_processors_on_the_hard_set(resize_path):
    """Fine stripes, checkerboards, fabric, noise, text, photos and extreme aspect ratios, as
    PNG and as JPEG at every chroma subsampling: the default preprocessing gives
    CLIPImageProcessor's pixels (without numba, aspect ratios past 4:1 resample only the crop
    with Pillow: one grey level apart on these; noise strips have their own test)."""
    processor = build_image_processor()
    for name, data in encoded_set(scale=0.25):
        ours = prepare_image(data, 0, GEOMETRY, MAX_PIXELS).astype(int)
        decoded = Image.open(io.BytesIO(data)).convert("RGB")
        theirs = processor(
            images=decoded, do_normalize=False, do_rescale=False, return_tensors="np"
        )["pixel_values"][0].transpose(1, 2, 0)
        extreme = max(decoded.size) / min(decoded.size) > EXACT_RESIZE_MAX_ASPECT
        tolerance = 1 if extreme and resize_path == "pillow" else 0
        assert np.abs(ours - theirs.round().astype(int)).max() <= tolerance, name


@pytest.mark.parametrize(
    ("size", "bound"),
    [((3, 2000), 24), ((20, 3000), 24), ((2000, 3), 2), ((3000, 20), 2)],
)
def test_without_numba_extreme_strips_keep_to_the_stated_bound(monkeypatch, size, bound):
    """The README's worst case for Pillow's crop-only resize (numba unusable): noise strips,
    the hardest input; tall ones narrower than the model's input are resampled in another
    order than the whole image is."""
    monkeypatch.setattr(clip_runner.images.loading, "compiled_resizer", lambda: None)
    width, height = size
    noise = np.random.default_rng(width + height).integers(0, 256, (height, width, 3), np.uint8)
    image = Image.fromarray(noise)
    ours = clip_runner.images.loading.resize_and_crop(image, GEOMETRY).astype(int)
    theirs = pillow_resize_and_crop(image, 224, 224, 224).astype(int)
    assert np.abs(ours - theirs).max() <= bound


def test_the_first_failing_index_is_reported():
    good = as_base64(photo_like(10, 10, 1))
    with pytest.raises(RequestError) as raised:
        load([good, "%%%", good, "bm90IGFuIGltYWdl"])
    assert raised.value.index == 1


def test_fast_preprocessing_leaves_ordinary_sizes_exact():
    for size in [(640, 480), (447, 800)]:  # shortest side under twice the model's 224
        data = encode(photo_like(*size, seed=6), "JPEG", quality=92)
        fast = prepare_image(data, 0, GEOMETRY, MAX_PIXELS, fast=True)
        reference = prepare_image(data, 0, GEOMETRY, MAX_PIXELS, fast=False)
        assert (fast == reference).all()


def test_fast_preprocessing_drafts_big_jpegs_and_stays_close():
    data = encode(photo_like(1834, 2750, seed=7), "JPEG", quality=90)
    drafted = decode_image(data, 0, MAX_PIXELS, draft_short_side=448)
    assert 448 <= min(drafted.size) < 1834  # decoded at reduced DCT scale
    fast = prepare_image(data, 0, GEOMETRY, MAX_PIXELS, fast=True).astype(float)
    reference = prepare_image(data, 0, GEOMETRY, MAX_PIXELS, fast=False).astype(float)
    assert np.abs(fast - reference).mean() < 6  # grey levels; embedding fidelity: BENCHMARKS.md


def test_fast_preprocessing_box_reduces_big_non_jpegs():
    image = photo_like(2000, 1400, seed=8)
    reduced = reduce_large(image, GEOMETRY)
    assert reduced.size == (667, 467)  # factor 3: the shortest side stays >= 2 x 224
    assert reduce_large(photo_like(800, 600, seed=8), GEOMETRY).size == (800, 600)


def test_fast_preprocessing_is_opt_in():
    data = encode(photo_like(1834, 2750, seed=7), "JPEG", quality=90)
    default = prepare_image(data, 0, GEOMETRY, MAX_PIXELS)
    assert (default == prepare_image(data, 0, GEOMETRY, MAX_PIXELS, fast=False)).all()
