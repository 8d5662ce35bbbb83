"""The per-request pixel budget: header sizes, the 413, decodes it spares, and the real server."""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import struct
import threading

import httpx
import pytest
from PIL import Image

import clip_runner.images.loading as images
from clip_runner.errors import RequestError
from clip_runner.images.decode_budget import DecodeBudget
from clip_runner.images.fetch import AddressPolicy, FetchLimits, new_fetch_client
from clip_runner.images.loading import ImageGeometry, ImageLimits, load_images
from clip_runner.images.pixel_budget import PixelBudget, image_header, overlong_header
from clip_runner.images.tiff_directory import STRIP_OFFSETS
from tests.helpers import GUARD_AUTH, GUARD_SETTINGS, as_base64, encode, photo_like
from tests.images.test_gif_blocks import with_comment
from tests.images.test_tiff_directory import strip_tiff

GEOMETRY = ImageGeometry(shortest_edge=224, crop_height=224, crop_width=224)
# The attack: a 6000x6000 PNG of one colour is 150 kB; 32 fit in one request.
BIG_FLAT_PNG = encode(Image.new("RGB", (6000, 6000), (200, 30, 90)))
LIMITS = ImageLimits(FetchLimits(10_000_000, 5), 40_000_000, max_request_pixels=10**10)


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "GIF", "WEBP", "BMP", "TIFF"])
def test_image_pixels_reads_the_header(fmt):
    assert image_header(encode(photo_like(37, 23, seed=1), fmt)).pixels == 37 * 23


def test_the_header_tells_a_baseline_jpeg_from_every_other_kind():
    photo = photo_like(40, 30, seed=4)
    assert image_header(encode(photo, "JPEG")).baseline_jpeg
    assert not image_header(encode(photo, "JPEG", progressive=True)).baseline_jpeg
    assert not image_header(encode(photo, "PNG")).baseline_jpeg
    assert image_header(b"not an image") == image_header(b"")  # 0 pixels, not a JPEG
    assert image_header(b"").pixels == 0 and not image_header(b"").baseline_jpeg


def test_image_pixels_of_a_huge_image_needs_no_decoding():
    assert len(BIG_FLAT_PNG) < 200_000 and image_header(BIG_FLAT_PNG).pixels == 36_000_000


@pytest.mark.parametrize("data", [b"", b"not an image", b"\x89PNG\r\n\x1a\n" + b"\0" * 8])
def test_image_pixels_of_an_unreadable_header_is_zero(data):
    assert image_header(data).pixels == 0  # decoding refuses it later, naming the image


def test_a_check_is_answered_in_the_same_read_of_the_header():
    """The forwarding check (loading.device_check) rides on the budget's read: its answer comes
    back with the header, a check failing as a header read would counts as not passed (the
    pixels still count), and an unreadable header is never checked."""
    data = encode(photo_like(40, 30, seed=4), "JPEG")
    seen = []

    def sized(opened):
        seen.append(opened.size)
        return opened.size == (40, 30)

    assert image_header(data, sized) == dataclasses.replace(image_header(data), passed_check=True)
    assert seen == [(40, 30)]
    assert not image_header(data, lambda opened: False).passed_check
    assert not image_header(data).passed_check  # no check asked

    def broken(opened):
        raise SyntaxError("not a valid EXIF block")

    assert image_header(data, broken) == image_header(data)  # pixels counted, not passed
    assert image_header(b"not an image", sized) == image_header(b"")
    assert seen == [(40, 30)]
    budget = PixelBudget(limit=10_000)
    assert budget.charge(image_header(data, sized)).passed_check and budget.used == 1200


def test_the_budget_refuses_the_image_that_passes_it_naming_the_budget():
    budget = PixelBudget(limit=1000, field="inputs")
    assert budget.charge(image_header(encode(photo_like(20, 25, seed=1)))).pixels == 500
    budget.charge(image_header(encode(photo_like(20, 25, seed=2))))  # exactly 1000: within
    with pytest.raises(RequestError) as refused:
        budget.charge(image_header(encode(photo_like(1, 1, seed=3))))
    error = refused.value
    assert (error.status, error.error_type) == (413, "too_many_pixels")
    assert error.message.startswith("inputs: ")
    assert "1000 pixels" in error.message and "CLIP_MAX_REQUEST_PIXELS" in error.message


def repeated_scans(progressive_jpeg: bytes, extra: int) -> bytes:
    """The JPEG with its last scan repeated `extra` more times: each repeat refines nothing,
    but the decoder walks the whole image for it (a scan bomb)."""
    last_scan = progressive_jpeg.rindex(b"\xff\xda")
    body, end = progressive_jpeg[last_scan:-2], progressive_jpeg[-2:]
    return progressive_jpeg[:-2] + body * extra + end


def test_a_progressive_jpeg_of_more_scans_than_encoders_write_is_refused_undecoded(monkeypatch):
    """One 400-kB JPEG of 5,000 empty scans took 11 s of a core to decode; real ones have 10."""
    photo = encode(photo_like(64, 48, seed=5), "JPEG", progressive=True)
    normal = image_header(photo).scans
    assert 6 <= normal <= 12 and image_header(encode(photo_like(64, 48, seed=5), "JPEG")).scans == 0
    bomb = repeated_scans(photo, images.MAX_JPEG_SCANS)
    assert image_header(bomb).scans == normal + images.MAX_JPEG_SCANS
    started = count_decodes(monkeypatch)
    with pytest.raises(RequestError) as refused:
        run_load([b64(photo), b64(bomb)], LIMITS)
    assert refused.value.status == 422 and refused.value.index == 1
    assert f"a progressive JPEG of {normal + images.MAX_JPEG_SCANS} scans" in refused.value.message
    assert len(started) <= 1  # the good one at most: never the bomb


def jpeg_of_markers(count: int) -> bytes:
    photo = encode(photo_like(40, 30, seed=1), "JPEG")
    return photo[:2] + b"\xff\xe5\x00\x02" * count + photo[2:]


HEADER_BOMBS = {
    "JPEG": (jpeg_of_markers(1000), "a JPEG with more than 512 markers before its image data"),
    "GIF": (
        with_comment(encode(photo_like(40, 30, seed=1), "GIF"), 5000),
        "a GIF with more than 4096 blocks before its first image",
    ),
    "TIFF": (strip_tiff(70_000), "a TIFF cut into more than 65536 strips or tiles"),
    "TIFF behind a decoy": (
        strip_tiff(70_000, extra=((STRIP_OFFSETS, 4, 0, 0),)),
        "a TIFF cut into more than 65536 strips or tiles",
    ),
    "TIFF of a long entry": (
        strip_tiff(5, extra=((258, 3, 1_000_000, 8),)),
        "a TIFF entry of more than 196608 values",
    ),
}


@pytest.mark.parametrize("kind", HEADER_BOMBS)
def test_an_image_of_thousands_of_header_segments_is_refused_before_pillow_reads_it(
    monkeypatch, kind
):
    """Eight 10-MB JPEGs of empty APP5 markers in one request had an API worker's threads parse
    them in Python while its event loop waited for the GIL: /ping took 18 s. A TIFF of a million
    strips took 2.6 s and 300 MB to open, a GIF of 10 MB of one-byte comment blocks 1.8 s."""
    read: list[int] = []
    monkeypatch.setattr(images, "image_header", lambda data, check=None: read.append(1))
    bomb, problem = HEADER_BOMBS[kind]
    with pytest.raises(RequestError) as refused:
        run_load([b64(bomb)], LIMITS)
    assert refused.value.status == 422 and refused.value.index == 0
    assert problem in refused.value.message
    assert read == []  # never opened by Pillow


def test_a_tiff_of_too_many_directory_entries_is_refused_and_a_tall_one_is_not():
    entries = struct.pack("<HHII", 700, 4, 1, 0) * 600  # an unknown tag, 600 times
    flooded = b"II*\x00" + struct.pack("<IH", 8, 600) + entries + struct.pack("<I", 0)
    assert "a TIFF of more than 512 entries in its first directory" in overlong_header(flooded)
    assert overlong_header(strip_tiff(60_000)) is None  # a tall image in one-row strips
    for kind in ("TIFF", "GIF", "PNG", "JPEG"):
        assert overlong_header(encode(photo_like(64, 48, seed=2), kind)) is None


def test_large_images_have_their_header_read_off_the_event_loop(monkeypatch):
    """Pillow reads some headers in Python, at a cost growing with the file: 4 MB of empty JPEG
    markers held the loop, and /ping with it, for about a second."""
    on_loop: list[bool] = []
    read = images.image_header

    def recorded(data, check=None):
        on_loop.append(threading.current_thread() is threading.main_thread())
        return read(data, check)

    monkeypatch.setattr(images, "image_header", recorded)
    small = encode(photo_like(40, 30, seed=1), "PNG")
    large = encode(Image.effect_noise((300, 300), 60).convert("RGB"), "PNG")
    assert len(small) <= images.HEADER_ON_LOOP_BYTES < len(large)
    run_load([b64(small), b64(large)], LIMITS)
    assert on_loop == [True, False]


def count_decodes(monkeypatch, hold: threading.Event | None = None) -> list[int]:
    """Record each image `load_images` starts decoding (the real `prepare_image` still runs,
    once `hold`, where given, is set)."""
    started: list[int] = []
    lock = threading.Lock()
    real = images.prepare_image

    def counted(data, index, *args, **kwargs):
        with lock:
            started.append(index)
        if hold is not None:
            hold.wait(10)
        return real(data, index, *args, **kwargs)

    monkeypatch.setattr(images, "prepare_image", counted)
    return started


def run_load(
    sources: list[str],
    limits: ImageLimits,
    cancel_once: list | None = None,
    then_release: threading.Event | None = None,
):
    """`load_images`; cancelled as soon as `cancel_once` has an item, then, once the cancelled
    load has ended, `then_release` set and the decodes under way waited for until the limits'
    decode budget is whole again: any decode still waiting for its pixels would have begun by
    then."""

    async def go():
        async with new_fetch_client(AddressPolicy(), limits.fetch) as client:
            task = asyncio.ensure_future(load_images(sources, client, GEOMETRY, limits))
            if cancel_once is not None:
                while not cancel_once:
                    await asyncio.sleep(0.005)
                task.cancel()
            try:
                return await task
            except asyncio.CancelledError:
                if then_release is not None:
                    then_release.set()
                    budget = limits.decode_budget
                    for _ in range(1000):
                        if budget.free == budget.capacity:
                            break
                        await asyncio.sleep(0.01)
                    await asyncio.sleep(0.05)
                raise

    return asyncio.run(go())


def test_an_over_budget_request_decodes_no_more_than_the_budget(monkeypatch):
    started = count_decodes(monkeypatch)
    limits = ImageLimits(FetchLimits(1_000_000, 5), 40_000_000, max_request_pixels=50_000_000)
    with pytest.raises(RequestError) as refused:
        run_load([base64.b64encode(BIG_FLAT_PNG).decode()] * 32, limits)
    assert refused.value.status == 413 and "50000000 pixels" in refused.value.message
    assert len(started) <= 50_000_000 // 36_000_000  # 1 of the 32, at most


def test_a_cancelled_request_starts_no_new_decodes(monkeypatch):
    # The decodes begun are held until the cancelled load has ended, so no further image can
    # have its pixels meanwhile, however slowly a busy machine runs the cancel.
    hold = threading.Event()
    started = count_decodes(monkeypatch, hold)
    side = 3000
    limits = ImageLimits(
        FetchLimits(1_000_000, 5),
        40_000_000,
        max_request_pixels=10**10,
        decode_budget=DecodeBudget(2 * side * side),  # two of these decode at once
    )
    flat = as_base64(Image.new("RGB", (side, side), (10, 200, 10)))
    with pytest.raises(asyncio.CancelledError):
        run_load([flat] * 32, limits, cancel_once=started, then_release=hold)
    assert 1 <= len(started) <= 2  # the two with pixels, not the other 30


def post(url: str, path: str, images_: list[str]) -> httpx.Response:
    body = {"images": images_, **({"labels": ["cat", "dog"]} if path == "/classify" else {})}
    return httpx.post(f"{url}{path}", json=body, headers=GUARD_AUTH, timeout=30)


def test_the_served_budget_answers_413_naming_it(guarded):
    budget = int(GUARD_SETTINGS["CLIP_MAX_REQUEST_PIXELS"])
    side = 600  # 360,000 pixels each: two fit the 1,000,000-pixel budget, three do not
    image = as_base64(photo_like(side, side, seed=7))
    assert post(guarded.url, "/classify", [image, image]).status_code == 200
    for path in ("/classify", "/embed_images"):
        refused = post(guarded.url, path, [image, image, image])
        assert refused.status_code == 413, refused.text
        error = refused.json()["error"]
        assert error["type"] == "too_many_pixels"
        assert (
            f"{budget} pixels" in error["message"] and "CLIP_MAX_REQUEST_PIXELS" in error["message"]
        )
    seed_shaped = {"images": [image, image, image], "classes": [["cat", 1], ["dog", 0]]}
    refused = httpx.post(
        f"{guarded.url}/invocations", json=seed_shaped, headers=GUARD_AUTH, timeout=30
    )
    assert refused.status_code == 413 and refused.json()["error"]["type"] == "too_many_pixels"
