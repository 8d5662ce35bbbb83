"""The device path (CLIP_DECODE=runner): JPEG bytes decoded and resized where the model runs.

On a GPU the runner decodes with nvJPEG; here its CPU twin (Pillow's decode, the torch resize
of resample.py) runs the same code around it, so the path is proven without a GPU: the crops
equal the API path's pixels, a bad JPEG fails alone, and a real server forwarding JPEGs answers
exactly as the suite's server that decodes in the API worker.
"""

from __future__ import annotations

import base64
import io
import logging
import re
import sys
import threading

import httpx
import numpy as np
import pytest
import torch
from PIL import Image, ImageOps

from clip_runner.errors import RequestError
from clip_runner.images.loading import ImageGeometry, device_decodable_jpeg, prepare_image
from clip_runner.model import device_decode
from clip_runner.model.device_decode import (
    NVJPEG,
    PILLOW,
    DeviceJpegDecoder,
    decoded_on_host,
    rgb_planes,
    upright_pixels,
)
from clip_runner.model.device_resample import resize_and_crop
from tests.hard_images import encoded_set, hard_images, is_jpeg
from tests.helpers import (
    SEED_CLASSES,
    ServedBento,
    assert_same_answer,
    encode,
    oriented_exif,
    photo_like,
    with_preview,
    ycck_jpeg,
)
from tests.test_service import histogram

GEOMETRY = ImageGeometry(224, 224, 224)


def jpeg_set() -> list[bytes]:
    """The fidelity set's JPEGs (every chroma subsampling), shrunk for speed, and its images as
    greyscale JPEGs (scanned pages, black-and-white photos: one byte per pixel here)."""
    colour = [blob for _, blob in encoded_set(scale=0.25) if is_jpeg(blob)]
    grey = [encode(image.convert("L"), "JPEG", quality=90) for _, image in hard_images(0.25)]
    return colour + grey


def test_cpu_twin_equals_the_api_path_on_the_hard_set():
    decoder = DeviceJpegDecoder(torch.device("cpu"), 224, 224, 224)
    assert decoder.name == PILLOW  # no CUDA here
    blobs = jpeg_set()
    crops, decoded = decoder(blobs)
    assert decoded == [True] * len(blobs)
    expected = np.stack([prepare_image(blob, 0, GEOMETRY, 10**9) for blob in blobs])
    np.testing.assert_array_equal(crops.permute(0, 2, 3, 1).numpy(), expected)


def oriented_jpegs() -> list[bytes]:
    """Colour and greyscale JPEGs of a wide photo tagged with each EXIF orientation (1-8, and
    9, which is none and leaves the image as stored), as phones and cameras store them."""
    blobs = []
    for orientation in range(1, 10):
        photo = photo_like(300, 170, seed=orientation)
        for image in (photo, photo.convert("L")):
            blobs.append(encode(image, "JPEG", quality=90, exif=oriented_exif(image, orientation)))
    return blobs


def test_decoded_pixels_are_turned_as_exif_transpose_turns_them():
    """Each orientation's stored pixels (colour as RGBX words, greyscale as bytes) turned
    upright equal Pillow's own `exif_transpose` of the decoded image, pixel for pixel."""
    for blob in oriented_jpegs():
        pixels, orientation = decoded_on_host(blob)
        with Image.open(io.BytesIO(blob)) as opened:
            expected = np.asarray(ImageOps.exif_transpose(opened).convert("RGB"))
        turned = rgb_planes(upright_pixels(pixels, orientation)).permute(1, 2, 0)
        np.testing.assert_array_equal(turned, expected, err_msg=f"orientation {orientation}")


def test_jpegs_of_every_exif_orientation_are_turned_upright_as_on_the_api_path():
    """A phone photo is forwarded as stored and its planes turned on the device: the crops are
    the API path's (which equals CLIPImageProcessor on the upright image: test_loading.py),
    colour and greyscale, a turned photo's crop unlike its stored pixels' crop."""
    blobs = oriented_jpegs()
    crops, decoded = DeviceJpegDecoder(torch.device("cpu"), 224, 224, 224)(blobs)
    assert decoded == [True] * len(blobs)
    expected = np.stack([prepare_image(blob, 0, GEOMETRY, 10**9) for blob in blobs])
    np.testing.assert_array_equal(crops.permute(0, 2, 3, 1).numpy(), expected)
    as_stored = resize_and_crop(pillow_pixels(blobs[10])[None], 224, 224, 224)[0]  # 6, colour
    assert not torch.equal(crops[10], as_stored)


@pytest.mark.filterwarnings("ignore::UserWarning:PIL.TiffImagePlugin")  # the damaged EXIF
def test_a_forwarded_jpeg_with_damaged_exif_gets_the_api_paths_answer():
    """The API workers no longer read the EXIF of a JPEG they forward; the runner does. Damage
    in the EXIF segment (bytes overwritten, the orientation tag's among them) must give the
    API path's answer: the same crop (turned or not by what the tag then says), or a failure
    of that image alone. (With this seed the damage leaves the tag 6 in 17 of 150, drops it in
    126, and makes it a value that is no orientation in 7.)"""
    photo = photo_like(120, 90, seed=5)
    exif = oriented_exif(photo, 6)
    original = encode(photo, "JPEG", quality=90, exif=exif)
    start = original.index(exif[:16])
    rng = np.random.default_rng(7)
    decoder = DeviceJpegDecoder(torch.device("cpu"), 64, 64, 64)
    geometry = ImageGeometry(64, 64, 64)
    forwarded = 0
    for _ in range(150):
        damaged = bytearray(original)
        for _ in range(int(rng.integers(1, 4))):
            damaged[start + int(rng.integers(len(exif)))] = int(rng.integers(256))
        blob = bytes(damaged)
        if not device_decodable_jpeg(blob, 10**9, 64):
            continue
        forwarded += 1
        crops, decoded = decoder([blob, original])  # beside an intact one, as in a batch
        try:
            expected = prepare_image(blob, 0, geometry, 10**9)
        except RequestError:
            assert decoded == [False, True]
            continue
        assert decoded == [True, True]
        np.testing.assert_array_equal(crops[0].permute(1, 2, 0).numpy(), expected)
    assert forwarded > 100


def test_nvjpeg_decodes_are_turned_upright_too():
    """nvJPEG ignores the EXIF orientation (torchvision applies it on the CPU only): the
    decoder reads each JPEG's tag and turns nvJPEG's planes (here its CPU stand-in's, the
    stored pixels), in a batch call and in the one-image calls after a refusal."""
    blobs = oriented_jpegs()
    expected = np.stack([prepare_image(blob, 0, GEOMETRY, 10**9) for blob in blobs])
    decoder = DeviceJpegDecoder(torch.device("cpu"), 224, 224, 224)
    decoder._nvjpeg = nvjpeg_on_the_cpu
    crops, _ = decoder(blobs)
    np.testing.assert_array_equal(crops.permute(0, 2, 3, 1).numpy(), expected)

    def one_at_a_time(data: list[torch.Tensor], device: torch.device) -> list[torch.Tensor]:
        if len(data) > 1:
            raise RuntimeError("nvjpegDecode failed: unsupported JPEG")
        return nvjpeg_on_the_cpu(data, device)

    decoder._nvjpeg = one_at_a_time
    crops, _ = decoder(blobs)
    assert decoder.refused_by_nvjpeg == 0
    np.testing.assert_array_equal(crops.permute(0, 2, 3, 1).numpy(), expected)


def test_cpu_twin_equals_the_api_path_on_progressive_rgb_and_cmyk_jpegs_and_mpos():
    """What the API workers send a runner that decodes with Pillow, beyond baseline YCbCr
    JPEGs: the hard set as progressive JPEGs (colour and greyscale), as JPEGs stored in RGB,
    as a camera's MPOs, a preview after each, and as CMYK JPEGs (Adobe's inverted CMYK, tagged
    with each EXIF orientation in turn, and YCCK). The runner decodes the first kinds into the
    array as the API workers do, and converts the CMYK ones to RGB as they do (before its
    turn, they after theirs): the same crops."""
    blobs = []
    for index, (_, image) in enumerate(hard_images(0.25)):
        blobs.append(encode(image, "JPEG", quality=90, progressive=True))
        blobs.append(encode(image.convert("L"), "JPEG", quality=85, progressive=True))
        blobs.append(encode(image, "JPEG", quality=90, keep_rgb=True))
        blobs.append(with_preview(image, photo_like(40, 30, seed=2), quality=90))
        cmyk = image.convert("CMYK")
        blobs.append(encode(cmyk, "JPEG", quality=90, exif=oriented_exif(cmyk, 1 + index % 8)))
        blobs.append(ycck_jpeg(image))
    crops, decoded = DeviceJpegDecoder(torch.device("cpu"), 224, 224, 224)(blobs)
    assert decoded == [True] * len(blobs)
    expected = np.stack([prepare_image(blob, 0, GEOMETRY, 10**9) for blob in blobs])
    np.testing.assert_array_equal(crops.permute(0, 2, 3, 1).numpy(), expected)


def test_images_of_one_size_resized_together_keep_their_order_and_pixels(monkeypatch):
    """Same-size images share one resize (in groups of GROUP_MAX_PIXELS, here two images)."""
    monkeypatch.setattr(device_decode, "GROUP_MAX_PIXELS", 2 * 320 * 240)
    sizes = [(320, 240), (200, 300), (320, 240), (320, 240), (200, 300), (64, 48), (320, 240)]
    images = [
        torch.from_numpy(np.array(photo_like(w, h, seed=i))).permute(2, 0, 1)
        for i, (w, h) in enumerate(sizes)
    ]
    batches: list[int] = []

    def counted(stacked: torch.Tensor, *geometry: int) -> torch.Tensor:
        batches.append(len(stacked))
        return resize_and_crop(stacked, *geometry)

    monkeypatch.setattr(device_decode, "resize_and_crop", counted)
    together = device_decode.resized_by_size(images, 224, 224, 224)
    assert sorted(batches) == [1, 2, 2, 2]  # 4 x 320x240 in twos, 2 x 200x300, 1 x 64x48
    alone = torch.stack([resize_and_crop(image, 224, 224, 224) for image in images])
    torch.testing.assert_close(together, alone, rtol=0, atol=0)


def test_pillow_decodes_a_batch_in_threads_to_the_same_crops_in_order(monkeypatch):
    blobs = jpeg_set()
    blobs.insert(3, blobs[0][: len(blobs[0]) // 3])  # a broken one fails alone, in its place
    one_thread, _ = DeviceJpegDecoder(torch.device("cpu"), 224, 224, 224)(blobs[:1])
    threads: set[str] = set()
    pillow_or_none = DeviceJpegDecoder._pillow_or_none

    def recorded(decoder: DeviceJpegDecoder, blob: bytes) -> torch.Tensor | None:
        threads.add(threading.current_thread().name)
        return pillow_or_none(decoder, blob)

    monkeypatch.setattr(DeviceJpegDecoder, "_pillow_or_none", recorded)
    single = DeviceJpegDecoder(torch.device("cpu"), 224, 224, 224)(blobs)
    assert threads == {threading.current_thread().name}
    threads.clear()
    pooled = DeviceJpegDecoder(torch.device("cpu"), 224, 224, 224, threads=4)(blobs)
    assert threads and all(name.startswith("clip-jpeg") for name in threads)
    assert pooled[1] == single[1] == [index != 3 for index in range(len(blobs))]
    torch.testing.assert_close(pooled[0], single[0], rtol=0, atol=0)
    torch.testing.assert_close(pooled[0][:1], one_thread, rtol=0, atol=0)


def pillow_pixels(blob: bytes) -> torch.Tensor:
    """(3, H, W) uint8, as nvJPEG gives them: the stand-ins' decode."""
    return rgb_planes(decoded_on_host(blob)[0])


def nvjpeg_on_the_cpu(data: list[torch.Tensor], device: torch.device) -> list[torch.Tensor]:
    """A stand-in for nvJPEG on a GPU that is not there: Pillow's pixels, on the CPU."""
    return [pillow_pixels(bytes(datum.numpy())) for datum in data]


def test_pillow_can_be_chosen_over_nvjpeg_on_a_gpu(monkeypatch):
    """CLIP_RUNNER_JPEG_DECODER=pillow: libjpeg's exact pixels even where nvJPEG is there. Only
    the choice is checked here (no GPU): the decoder is not even looked up."""
    allow_tf32 = torch.backends.cuda.matmul.allow_tf32  # a CUDA decoder turns it off
    cuda = torch.device("cuda")
    monkeypatch.setattr(device_decode, "drain_queued_work", lambda device, spin: None)
    try:
        monkeypatch.setattr(device_decode, "_torchvision_decoder", lambda: nvjpeg_on_the_cpu)
        assert DeviceJpegDecoder(cuda, 224, 224, 224, use_nvjpeg=True).name == NVJPEG
        monkeypatch.setattr(device_decode, "_torchvision_decoder", lambda: pytest.fail("looked"))
        assert DeviceJpegDecoder(cuda, 224, 224, 224).name == PILLOW  # the service's default
    finally:
        torch.backends.cuda.matmul.allow_tf32 = allow_tf32


def test_a_gpu_without_a_loadable_torchvision_says_so(monkeypatch, caplog):
    """A GPU image built without torchvision (or with one built for another torch) still
    serves, decoding on the CPU; the log says why nvJPEG is not used."""
    allow_tf32 = torch.backends.cuda.matmul.allow_tf32
    monkeypatch.setitem(sys.modules, "torchvision.io", None)  # as if absent: import fails
    try:
        with caplog.at_level(logging.WARNING, logger=device_decode.__name__):
            decoder = DeviceJpegDecoder(torch.device("cuda"), 224, 224, 224, use_nvjpeg=True)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = allow_tf32
    assert decoder.name == PILLOW
    assert "no torchvision built for torch" in caplog.text
    caplog.clear()
    # On CPU nvJPEG is not wanted, asked for or not.
    DeviceJpegDecoder(torch.device("cpu"), 224, 224, 224, use_nvjpeg=True)
    assert "torchvision" not in caplog.text


@pytest.mark.parametrize(
    "failure",
    [
        RuntimeError("nvjpegCreateEx failed: 7"),
        # A torchvision whose C extension did not load imports with a warning, then lacks the op.
        AttributeError("'_OpNamespace' 'image' object has no attribute 'decode_jpegs_cuda'"),
    ],
)
def test_an_nvjpeg_that_cannot_decode_at_all_is_not_used_and_the_log_says_so(
    monkeypatch, caplog, failure
):
    """Where nvJPEG cannot start, every batch would fail and be retried image by image before
    Pillow decoded it, under the name nvjpeg: the decoder finds out once, and says so."""
    calls: list[int] = []

    def broken_nvjpeg(data: list[torch.Tensor], device: torch.device) -> list[torch.Tensor]:
        calls.append(len(data))
        raise failure

    allow_tf32 = torch.backends.cuda.matmul.allow_tf32
    monkeypatch.setattr(device_decode, "drain_queued_work", lambda device, spin: None)
    monkeypatch.setattr(device_decode, "_torchvision_decoder", lambda: broken_nvjpeg)
    try:
        with caplog.at_level(logging.WARNING, logger=device_decode.__name__):
            decoder = DeviceJpegDecoder(torch.device("cuda"), 224, 224, 224, use_nvjpeg=True)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = allow_tf32
    assert decoder.name == PILLOW and calls == [1]
    assert "nvJPEG could not decode a plain JPEG" in caplog.text
    assert str(failure) in caplog.text


def test_colour_and_greyscale_jpegs_are_decoded_into_the_tensor_not_copied_out(monkeypatch):
    """A colour JPEG into (H, W, 4), a greyscale one into (H, W), viewed as three equal planes:
    no copy of Pillow's pixels, no conversion to RGB."""
    photo = photo_like(64, 48, seed=1)
    expected = {
        "colour": np.asarray(Image.open(io.BytesIO(encode(photo, "JPEG"))).convert("RGB")),
        "greyscale": np.asarray(
            Image.open(io.BytesIO(encode(photo.convert("L"), "JPEG"))).convert("RGB")
        ),
    }
    colour_jpeg, greyscale_jpeg = encode(photo, "JPEG"), encode(photo.convert("L"), "JPEG")
    copies = []
    copy, convert = Image.Image.tobytes, Image.Image.convert
    monkeypatch.setattr(Image.Image, "tobytes", lambda *a: copies.append(1) or copy(*a))
    monkeypatch.setattr(Image.Image, "convert", lambda *a: copies.append(1) or convert(*a))
    (colour, _), (greyscale, _) = decoded_on_host(colour_jpeg), decoded_on_host(greyscale_jpeg)
    assert not copies
    assert colour.shape == (48, 64, 4) and greyscale.shape == (48, 64)
    for name, pixels in (("colour", colour), ("greyscale", greyscale)):
        assert pixels.dtype == torch.uint8
        np.testing.assert_array_equal(rgb_planes(pixels).permute(1, 2, 0), expected[name])


def test_without_cuda_pinned_memory_is_not_had_and_the_decode_gets_pageable_memory():
    """torch without CUDA refuses pinned memory (as a host whose pinned memory ran out does):
    the buffer is pageable, of the shape asked for, and nothing fails."""
    pixels = device_decode.host_pixels((48, 64, 4), pinned=True)
    assert pixels.shape == (48, 64, 4) and pixels.dtype == torch.uint8 and not pixels.is_pinned()


@pytest.fixture
def pinned_requests(monkeypatch) -> list[tuple[tuple[int, ...], bool]]:
    """Stands in for pinned memory, which needs CUDA: each buffer the decode asks torch for, its
    shape and whether pinned, answered with pageable memory."""
    requests: list[tuple[tuple[int, ...], bool]] = []
    empty = torch.empty

    def recorded(shape, *, dtype, pin_memory=False):
        requests.append((tuple(shape), pin_memory))
        return empty(shape, dtype=dtype)

    monkeypatch.setattr(device_decode.torch, "empty", recorded)
    return requests


def test_pinned_decodes_are_jpegs_up_to_the_size_limit(pinned_requests):
    small = encode(photo_like(64, 48, seed=1), "JPEG")
    side = int((device_decode.PINNED_MAX_BYTES // 4) ** 0.5)
    at_the_limit = encode(photo_like(side, side, seed=2), "JPEG")
    past_it = encode(photo_like(side + 1, side, seed=3), "JPEG")
    for blob in (small, at_the_limit, past_it):
        pinned, pageable = decoded_on_host(blob, pinned=True), decoded_on_host(blob)
        np.testing.assert_array_equal(pinned[0], pageable[0])
    assert pinned_requests == [
        ((48, 64, 4), True),
        ((48, 64, 4), False),
        ((side, side, 4), True),
        ((side, side, 4), False),
        ((side, side + 1, 4), False),
        ((side, side + 1, 4), False),
    ]
    pinned_requests.clear()
    greyscale = encode(photo_like(64, 48, seed=1).convert("L"), "JPEG")
    decoded_on_host(greyscale, pinned=True)  # one byte per pixel
    assert pinned_requests == [((48, 64), True)]


def test_a_gpu_host_without_pinned_memory_says_so_at_start(monkeypatch, caplog):
    """This torch (no CUDA) refuses pinned memory, as a host without any would: a decoder for a
    GPU then decodes into pageable memory, and the log says why, once."""
    allow_tf32 = torch.backends.cuda.matmul.allow_tf32  # a CUDA decoder turns it off
    try:
        with caplog.at_level(logging.WARNING, logger=device_decode.__name__):
            decoder = DeviceJpegDecoder(torch.device("cuda"), 64, 64, 64, use_nvjpeg=False)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = allow_tf32
    assert not decoder.pinned
    assert caplog.text.count("no pinned host memory here") == 1


def test_on_a_gpu_the_decoder_pins_and_queues_its_copies(pinned_requests, monkeypatch):
    """The decoder asks for pinned memory only on a GPU (unless told not to), and copies each
    image to the device without waiting (device_wait.to_device): the same crops either way."""
    allow_tf32 = torch.backends.cuda.matmul.allow_tf32  # a CUDA decoder turns it off
    try:
        cuda = torch.device("cuda")
        assert DeviceJpegDecoder(cuda, 64, 64, 64, use_nvjpeg=False).pinned
        assert not DeviceJpegDecoder(cuda, 64, 64, 64, use_nvjpeg=False, pinned=False).pinned
    finally:
        torch.backends.cuda.matmul.allow_tf32 = allow_tf32
    pinned_requests.clear()  # the start-up check's
    decoder = DeviceJpegDecoder(torch.device("cpu"), 64, 64, 64)
    assert not decoder.pinned
    blobs = jpeg_set()[:4]
    pageable, _ = decoder(blobs)
    assert pinned_requests and not any(pinned for _, pinned in pinned_requests)
    pinned_requests.clear()
    copies: list[bool] = []
    to_device = torch.Tensor.to

    def recorded(self: torch.Tensor, *args: object, **kwargs: object) -> torch.Tensor:
        if isinstance(args[0] if args else kwargs.get("device"), torch.device):  # not a cast
            copies.append(kwargs.get("non_blocking", False))
        return to_device(self, *args, **kwargs)

    monkeypatch.setattr(torch.Tensor, "to", recorded)
    decoder.pinned = True  # as on a GPU
    pinned, _ = decoder(blobs)
    assert [pinned for _, pinned in pinned_requests] == [True] * len(blobs)
    assert copies == [True] * len(blobs)
    torch.testing.assert_close(pinned, pageable, rtol=0, atol=0)


def test_a_jpeg_that_does_not_decode_fails_alone():
    good = encode(photo_like(300, 200, seed=1), "JPEG")
    crops, decoded = DeviceJpegDecoder(torch.device("cpu"), 64, 64, 64)(
        [good, good[: len(good) // 3], good]
    )
    assert decoded == [True, False, True] and tuple(crops.shape) == (2, 3, 64, 64)


def test_a_jpeg_nvjpeg_refuses_is_decoded_by_pillow_as_on_the_api_path():
    """nvJPEG refuses some JPEGs that libjpeg decodes, failing its whole batch call. Its stand-in
    here (nvJPEG cannot run without a GPU) refuses one photo and, like nvJPEG, raises
    RuntimeError on a truncated file: the photo still gets the API path's pixels, the broken
    file alone fails."""
    good = encode(photo_like(300, 200, seed=1), "JPEG")
    refused = encode(photo_like(200, 300, seed=2), "JPEG")

    def strict_nvjpeg(data: list[torch.Tensor], device: torch.device) -> list[torch.Tensor]:
        blobs = [bytes(datum.numpy()) for datum in data]
        if refused in blobs:
            raise RuntimeError("nvjpegDecode failed: unsupported JPEG")
        try:
            return [pillow_pixels(blob) for blob in blobs]
        except OSError as exc:
            raise RuntimeError(str(exc)) from exc

    decoder = DeviceJpegDecoder(torch.device("cpu"), 224, 224, 224)
    decoder._nvjpeg = strict_nvjpeg
    crops, decoded = decoder([good, refused, good[: len(good) // 3]])
    assert decoded == [True, True, False]
    assert decoder.refused_by_nvjpeg == 2  # the photo and the broken file
    expected = np.stack([prepare_image(blob, 0, GEOMETRY, 10**9) for blob in (good, refused)])
    np.testing.assert_array_equal(crops.permute(0, 2, 3, 1).numpy(), expected)


def test_every_nvjpeg_call_waits_for_the_work_already_queued(monkeypatch):
    """nvJPEG may overwrite memory that queued kernels still read (drain_queued_work says why),
    so the device's queue is drained before each of its calls: the batch call and, after it
    refuses the batch, each one-image call, each the way CLIP_CUDA_WAIT says (device_wait.py).
    The stand-in records the order of the two."""
    events: list[str] = []

    def drain(device: torch.device, spin: bool) -> None:
        events.append("drain, spinning" if spin else "drain")

    monkeypatch.setattr(device_decode, "drain_queued_work", drain)
    good = encode(photo_like(300, 200, seed=1), "JPEG")

    def refusing_batches(data: list[torch.Tensor], device: torch.device) -> list[torch.Tensor]:
        events.append(f"decode {len(data)}")
        if len(data) > 1:
            raise RuntimeError("nvjpegDecodeBatched failed")
        return [pillow_pixels(bytes(data[0].numpy()))]

    decoder = DeviceJpegDecoder(torch.device("cpu"), 64, 64, 64)
    decoder._nvjpeg = refusing_batches
    _, decoded = decoder([good, good])
    assert decoded == [True, True]
    assert events == ["drain", "decode 2", "drain", "decode 1", "drain", "decode 1"]
    events.clear()
    decoder.spin_waits = True
    decoder([good])
    assert events == ["drain, spinning", "decode 1"]


def test_an_nvjpeg_error_that_broke_the_device_fails_the_batch_not_each_image(monkeypatch):
    """After a batch call fails, the images are retried one at a time only while the device
    still works (its stand-in here says it does not): otherwise every image would be retried,
    then decoded by Pillow, then answered with a 422 for the server's fault."""
    good = encode(photo_like(300, 200, seed=1), "JPEG")
    calls: list[int] = []

    def illegal_access(data: list[torch.Tensor], device: torch.device) -> list[torch.Tensor]:
        calls.append(len(data))
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    decoder = DeviceJpegDecoder(torch.device("cpu"), 64, 64, 64)
    decoder._nvjpeg = illegal_access
    monkeypatch.setattr(device_decode, "device_works", lambda device: False)
    with pytest.raises(RuntimeError, match="illegal memory access"):
        decoder([good, good])
    assert calls == [2] and decoder.refused_by_nvjpeg == 0


def test_nvjpeg_out_of_device_memory_fails_the_batch_not_each_image():
    """torch's out-of-memory error is a RuntimeError too, but not a refusal: the batch is retried
    in halves (device_health.py), not image by image, none counted as refused."""
    good = encode(photo_like(300, 200, seed=1), "JPEG")
    calls: list[int] = []

    def out_of_memory(data: list[torch.Tensor], device: torch.device) -> list[torch.Tensor]:
        calls.append(len(data))
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 24.00 MiB")

    decoder = DeviceJpegDecoder(torch.device("cpu"), 64, 64, 64)
    decoder._nvjpeg = out_of_memory
    with pytest.raises(torch.cuda.OutOfMemoryError):
        decoder([good, good])
    assert calls == [2] and decoder.refused_by_nvjpeg == 0

    def refusing_batches_then_full(data: list[torch.Tensor], device: torch.device):
        calls.append(len(data))
        if len(data) > 1:
            raise RuntimeError("nvjpegDecodeBatched failed")
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 MiB")

    calls.clear()
    decoder._nvjpeg = refusing_batches_then_full
    with pytest.raises(torch.cuda.OutOfMemoryError):
        decoder([good, good])
    assert calls == [2, 1] and decoder.refused_by_nvjpeg == 0


def test_an_image_nvjpeg_refuses_alone_waits_for_the_device_before_pillow(monkeypatch):
    """nvJPEG may have queued work on its own stream before refusing one image, into an output
    already back in torch's pool: the device is waited for (and checked) before Pillow's copy
    may take that memory, and a device that broke fails the batch rather than the image."""
    good = encode(photo_like(300, 200, seed=1), "JPEG")
    events: list[str] = []

    def refusing(data: list[torch.Tensor], device: torch.device) -> list[torch.Tensor]:
        events.append(f"decode {len(data)}")
        raise RuntimeError("nvjpegDecode failed: unsupported JPEG")

    def works(device: torch.device) -> bool:
        events.append("device waited for")
        return True

    def pillow(decoder: DeviceJpegDecoder, blob: bytes) -> torch.Tensor | None:
        events.append("pillow")
        return pillow_pixels(blob)

    monkeypatch.setattr(device_decode, "device_works", works)
    monkeypatch.setattr(DeviceJpegDecoder, "_pillow_or_none", pillow)
    decoder = DeviceJpegDecoder(torch.device("cpu"), 64, 64, 64)
    decoder._nvjpeg = refusing
    _, decoded = decoder([good])
    assert decoded == [True] and decoder.refused_by_nvjpeg == 1
    # the batch call (of one), then the image alone, each refusal followed by the wait
    assert events == ["decode 1", "device waited for"] * 2 + ["pillow"]

    # The batch's refusal left the device working; the image's alone broke it.
    answers = iter([True, False])
    monkeypatch.setattr(device_decode, "device_works", lambda device: next(answers))
    with pytest.raises(RuntimeError, match="unsupported JPEG"):
        decoder([good])
    assert decoder.refused_by_nvjpeg == 1


def test_a_failing_copy_to_the_device_is_not_blamed_on_the_image(monkeypatch):
    """Pillow decoded the JPEG; the device then could not take its pixels (out of memory, as
    stood in for here). That fails the batch (the API answers 503), not the image (a 422)."""
    good = encode(photo_like(300, 200, seed=1), "JPEG")
    decoder = DeviceJpegDecoder(torch.device("cpu"), 64, 64, 64)

    to_device = torch.Tensor.to

    def out_of_memory_for_images(self: torch.Tensor, *args: object, **kwargs: object):
        if self.dim() == 3:  # one image's (3, H, W) pixels
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 MiB")
        return to_device(self, *args, **kwargs)

    monkeypatch.setattr(torch.Tensor, "to", out_of_memory_for_images)
    with pytest.raises(torch.cuda.OutOfMemoryError):
        decoder([good])


def test_a_failed_batch_raises_once_every_decode_in_it_has_ended(monkeypatch):
    """The first image's copy to the device fails (out of memory) while the pool still decodes
    the others. The batch is then retried in halves (device_health.py), which must not race
    the failed batch's own decodes for the device's memory: the error waits for them."""
    blobs = jpeg_set()[:6]
    ended: list[int] = []

    def decode(decoder: DeviceJpegDecoder, blob: bytes) -> torch.Tensor | None:
        index = blobs.index(blob)
        if index == 0:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 MiB")
        threading.Event().wait(0.2)
        ended.append(index)
        return pillow_pixels(blob)

    monkeypatch.setattr(DeviceJpegDecoder, "_pillow_or_none", decode)
    with pytest.raises(torch.cuda.OutOfMemoryError):
        DeviceJpegDecoder(torch.device("cpu"), 224, 224, 224, threads=4)(blobs)
    assert sorted(ended) == [1, 2, 3, 4, 5]


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def jpegs_sent(server: ServedBento) -> float:
    """JPEG files the server's API workers have sent the runner so far (0 before any)."""
    metrics = httpx.get(f"{server.url}/metrics", timeout=10).text
    found = re.search(
        r'^clip_service_runner_call_images_sum\{sent_as="jpeg"\} (\S+)$', metrics, re.M
    )
    return float(found.group(1)) if found else 0.0


def test_forwarding_server_answers_as_the_api_path(gpu_like, served):
    pictures = [photo_like(200 + 10 * i, 150, seed=40 + i) for i in range(4)]
    images = [b64(encode(p, "JPEG", quality=90)) for p in pictures]
    images.append(b64(encode(pictures[1], "PNG")))  # decoded by the API worker
    # A phone's photo and a scan stored turned: forwarded too, and turned upright by the runner.
    for picture, orientation in ((pictures[2], 6), (pictures[3].convert("L"), 8)):
        exif = oriented_exif(picture, orientation)
        images.append(b64(encode(picture, "JPEG", quality=90, exif=exif)))
    # The runner decodes with Pillow (as on a GPU by default): a progressive JPEG, a camera's
    # MPO and a CMYK JPEG are forwarded too.
    images.append(b64(encode(pictures[0], "JPEG", quality=90, progressive=True)))
    images.append(b64(with_preview(pictures[3], photo_like(40, 30, seed=1), quality=90)))
    images.append(b64(encode(pictures[2].convert("CMYK"), "JPEG", quality=90)))
    body = {"images": images, "classes": SEED_CLASSES}
    decodes_before, decode_s_before = histogram(gpu_like, "clip_runner_jpeg_decode_seconds")
    sent_before = jpegs_sent(gpu_like)  # the server is shared (the CUDA graphs' suite)
    forwarded = httpx.post(f"{gpu_like.url}/invocations", json=body, timeout=60)
    decoded_here = httpx.post(f"{served.url}/invocations", json=body, timeout=60)
    assert forwarded.status_code == decoded_here.status_code == 200
    assert_same_answer(forwarded.json(), decoded_here.json(), tolerance=1e-6)
    assert jpegs_sent(gpu_like) - sent_before == 9
    # The runner timed its decode of the forwarded nine, a part of its image passes' time.
    decodes, decode_s = histogram(gpu_like, "clip_runner_jpeg_decode_seconds")
    _, pass_s = histogram(gpu_like, "clip_runner_inference_seconds")
    assert decodes > decodes_before and decode_s > decode_s_before
    assert decode_s <= pass_s


def test_every_process_hands_the_gil_over_as_set(gpu_like, served):
    """CLIP_SWITCH_INTERVAL_MS reaches the runner and each API worker (gil_handover.py);
    without it they keep Python's 5 ms."""
    for server, interval in ((gpu_like, "0.2"), (served, "5")):
        for process in ("runner", "API worker"):
            line = f"{process}: a thread running Python yields the GIL to a waiting one after"
            log = server.wait_for_log(f"{line} {interval} ms")
            assert re.findall(rf"{line} (\S+) ms", log) == [interval] * log.count(line), process


def test_a_forwarded_jpeg_that_does_not_decode_is_a_422_naming_it(gpu_like):
    """A complete JPEG (so it is forwarded) whose coded data is garbage: the runner's decode
    fails, that image alone."""
    good = encode(photo_like(120, 90, seed=3), "JPEG")
    scan = good.find(b"\xff\xda")
    garbled = bytearray(good)
    for position in range(scan + 20, len(good) - 2, 7):  # stray 0xFF bytes: markers it cannot be
        garbled[position] = 0xFF if garbled[position - 1] != 0xFF else 0x00
    body = {"images": [b64(good), b64(bytes(garbled))], "classes": SEED_CLASSES}
    response = httpx.post(f"{gpu_like.url}/invocations", json=body, timeout=60)
    assert response.status_code == 422
    error = response.json()["error"]
    assert error["index"] == 1 and "images[1]" in error["message"]
    assert "the JPEG decoder refused it" in error["message"]  # the runner's, not the API's
    ok = httpx.post(
        f"{gpu_like.url}/invocations",
        json={"images": [b64(good)], "classes": SEED_CLASSES},
        timeout=60,
    )
    assert ok.status_code == 200


def test_nvjpeg_is_not_used_beside_other_passes(monkeypatch, caplog):
    """With forward passes running beside a decode, the drain before it cannot stop another
    pass from queueing work and freeing memory that nvJPEG then overwrites: Pillow decodes."""
    allow_tf32 = torch.backends.cuda.matmul.allow_tf32
    monkeypatch.setattr(device_decode, "drain_queued_work", lambda device, spin: None)
    monkeypatch.setattr(device_decode, "_torchvision_decoder", lambda: nvjpeg_on_the_cpu)
    try:
        with caplog.at_level(logging.WARNING, logger=device_decode.__name__):

            def nvjpeg(device: torch.device, passes: int) -> DeviceJpegDecoder:
                return DeviceJpegDecoder(device, 224, 224, 224, use_nvjpeg=True, passes=passes)

            assert nvjpeg(torch.device("cuda"), passes=2).name == PILLOW
            assert "2 forward passes at once (CLIP_RUNNER_PASSES)" in caplog.text
            caplog.clear()
            assert nvjpeg(torch.device("cuda"), passes=1).name == NVJPEG
            assert nvjpeg(torch.device("cpu"), passes=2).name == PILLOW
            assert caplog.text == ""  # on CPU nvJPEG is not wanted: nothing to warn about
    finally:
        torch.backends.cuda.matmul.allow_tf32 = allow_tf32
