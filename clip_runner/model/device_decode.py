"""JPEG bytes -> model-ready uint8 crops on the model's device, a whole batch at once.

On a GPU the API workers forward JPEG bytes instead of decoding them (images/loading.py decides
which), and the runner decodes the batch and resizes it on the device with Pillow's exact
arithmetic (resample.py), so the API workers only parse JSON and check headers. The runner
decodes with Pillow (libjpeg-turbo, the API path's and CLIPImageProcessor's exact pixels) in
threads, or, opted in (CLIP_RUNNER_JPEG_DECODER=nvjpeg), with nvJPEG on the GPU
(`torchvision.io.decode_jpeg` on CUDA): faster, but its pixels differ, and on an H200 they moved
a probability by 0.0062 on the hard-image set, beyond the 1e-3 bound (BENCHMARKS.md, GPU). On
CPU the same code decodes with Pillow and resizes on the CPU: that is what the tests exercise
without a GPU.

An image that fails to decode here does not fail its batch: its row is reported as failed and
the API answers that one image with a 422.
"""

from __future__ import annotations

import io
import logging
import math
from collections import defaultdict
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor, wait

import torch
from PIL import Image

from clip_runner.model.device_health import device_works
from clip_runner.model.device_resample import resize_and_crop
from clip_runner.model.device_wait import to_device, wait_for_queued_work
from clip_runner.model.model_facts import NVJPEG, PILLOW
from clip_runner.model.pillow_pixels import (
    decode_into_array,
    decodes_into_array,
    exif_orientation,
    pixel_shape,
)
from clip_runner.model.resample import UPRIGHT

logger = logging.getLogger(__name__)


def _torchvision_decoder() -> Callable | None:
    """torchvision's batched nvJPEG decoder, or None where torchvision is absent or built for
    another torch (a CUDA torchvision beside a CPU torch does not load)."""
    try:
        from torchvision.io import ImageReadMode, decode_jpeg
    except (ImportError, RuntimeError, OSError):
        return None

    def decode(data: list[torch.Tensor], device: torch.device) -> list[torch.Tensor]:
        return decode_jpeg(data, mode=ImageReadMode.RGB, device=device)

    return decode


def drain_queued_work(device: torch.device, spin: bool = False) -> None:
    """Waits until the work queued on `device`'s current stream has run (asleep unless `spin`:
    device_wait.py); nothing on CPU.

    Called before every nvJPEG decode. torchvision (0.28 included) allocates the decode's output
    from the caller's stream but has nvJPEG write it from a stream of its own that does not wait
    for the caller's: a block freed while queued kernels still read it can be handed to the
    decode and overwritten before they run, silently corrupting another pass's numbers
    (pytorch/vision#9606, reproduced on H100s, not on an A100). nvJPEG is only used with one
    pass at a time (DeviceJpegDecoder's `passes`), and each pass ends by copying its answer to
    the CPU, so nothing should be queued here: this makes sure. With passes running beside the
    decode it would not be enough: another pass could queue work and free memory between this
    wait and the decode's allocation.
    """
    wait_for_queued_work(device, spin)


# How Pillow fails on a JPEG it cannot decode (as on the API path, which answers a 422).
PILLOW_DECODE_ERRORS = (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError)


# Largest decode (its bytes) put in pinned memory: 1 MP in colour (RGBX), 4 MP in greyscale,
# so 1280x720 and the seed's 640x480 photo are, a 12-MP phone photo (80 ms of decode, beside
# which its 48-MB staging copy is a few ms) is not.
# torch's caching host allocator rounds each block up to a power of two and keeps every block
# it ever handed out for reuse (pinned memory is slow to get). A block is in use from its
# image's decode until its copy to the GPU has run, within its batch's pass, so a runner
# process keeps at most max_batch x passes blocks of each size, 2 x max_batch x passes x 4 MiB
# over all sizes (256 MiB at the GPU defaults, one pass of 32), for photos of one size far less.
PINNED_MAX_BYTES = 4 << 20


def host_pixels(shape: tuple[int, ...], pinned: bool) -> torch.Tensor:
    """An empty uint8 CPU tensor of `shape`, in pinned memory when `pinned` and it is at most
    PINNED_MAX_BYTES, and where pinned memory can be had: a host whose pinned memory has run
    out (or a torch without CUDA) gets pageable memory, as every image had before."""
    if pinned and math.prod(shape) <= PINNED_MAX_BYTES:
        try:
            return torch.empty(shape, dtype=torch.uint8, pin_memory=True)
        except RuntimeError as exc:
            logger.debug("no pinned memory for a decode (%s): pageable memory instead", exc)
    return torch.empty(shape, dtype=torch.uint8)


def _pinned_memory_works() -> bool:
    """Whether this host gives pinned memory at all; if not, the log says so once, at start,
    rather than every image falling back to pageable memory unseen."""
    try:
        torch.empty((16,), dtype=torch.uint8, pin_memory=True)
    except RuntimeError as exc:
        logger.warning(
            "no pinned host memory here (%s): JPEGs are decoded into pageable memory", exc
        )
        return False
    return True


def decoded_on_host(blob: bytes, pinned: bool = False) -> tuple[torch.Tensor, int]:
    """uint8 on the CPU: the pixels as Pillow stores them, (H, W, 4) RGB and a padding byte,
    or (H, W) for a greyscale JPEG; and the JPEG's EXIF orientation, still to apply
    (`upright_pixels`). The API workers forward only JPEGs whose stored pixels these are
    exactly, as their own decode gives them (images/loading.py's `device_decodable`).

    The JPEG is decoded straight into the tensor (pillow_pixels.py): copying Pillow's pixels
    out afterwards had cost about a third of the decode's CPU, holding the GIL that the
    runner's event loop and its other decoding threads wait for, and a greyscale one had been
    converted to RGB first. With `pinned` (the runner on a GPU) that tensor is in pinned memory
    (`host_pixels`), which the GPU copies from directly while the decoding thread goes on: from
    pageable memory CUDA first copies the bytes into a staging buffer of its own, on the
    decoding thread. A CMYK JPEG (sent where Pillow decodes here), or any JPEG where this Pillow
    cannot decode into an array, is converted to RGB and copied, as the API workers convert it.

    Moved to the device as they are and viewed there as planes (`rgb_planes`): repacking them
    into three bytes on the CPU first (`np.array(image)`) cost more than the extra third of
    bytes to copy, and a greyscale image's one plane is copied once and viewed three times."""
    # Forwarded bytes are JPEGs (an MPO opens through JPEG's): no other parser need read them.
    with Image.open(io.BytesIO(blob), formats=("JPEG",)) as opened:
        orientation = exif_orientation(opened)
        if decodes_into_array(opened):
            pixels = host_pixels(pixel_shape(opened), pinned)
            decode_into_array(opened, blob, pixels.numpy())
            return pixels, orientation
        image = opened if opened.mode == "RGB" else opened.convert("RGB")
        width, height = image.size
        stored = bytearray(image.tobytes("raw", "RGBX"))  # writable, as torch wants
    return torch.frombuffer(stored, dtype=torch.uint8).view(height, width, 4), orientation


def stored_orientation(blob: bytes) -> int:
    """A JPEG's EXIF orientation, read from its header alone (nvJPEG's decode ignores it)."""
    with Image.open(io.BytesIO(blob), formats=("JPEG",)) as opened:
        return exif_orientation(opened)


def rgb_planes(pixels: torch.Tensor) -> torch.Tensor:
    """(H, W, 4) RGBX or (H, W) greyscale -> a (3, H, W) view of its colour bytes (the grey
    plane three times: what Pillow's RGB of it holds), on the tensor's device."""
    if pixels.ndim == 2:
        return pixels.expand(3, *pixels.shape)
    return pixels[..., :3].permute(2, 0, 1)


def upright(image: torch.Tensor, orientation: int) -> torch.Tensor:
    """`image`, whose last two dimensions are the rows and columns of a JPEG stored with this
    EXIF orientation -> the upright image, as `ImageOps.exif_transpose` turns it
    (resample.py's `UPRIGHT`; any other value leaves it as stored), on its device. A turned
    image is copied once, transposed, and a mirrored one once (a flip)."""
    turn = UPRIGHT.get(orientation, UPRIGHT[1])
    if turn.turned:
        image = image.transpose(-2, -1).contiguous()
    reversed_dims = [
        dim for dim, reverse in ((-2, turn.rows_reversed), (-1, turn.columns_reversed)) if reverse
    ]
    return image.flip(reversed_dims) if reversed_dims else image


def upright_pixels(pixels: torch.Tensor, orientation: int) -> torch.Tensor:
    """`decoded_on_host`'s pixels ((H, W, 4) RGBX or (H, W) greyscale), turned upright where the
    JPEG's orientation says (`upright`). Each RGBX pixel's four bytes move as one 32-bit word:
    a quarter turn of a 12-MP photo's planes byte by byte took the CPU twin 310-312 ms, of its
    words 60-62 ms (its whole decode, turn and resize 493-522 ms, 435 upright; on a GPU
    unmeasured)."""
    if pixels.ndim == 2:
        return upright(pixels, orientation)
    words = pixels.view(torch.int32).squeeze(-1)
    return upright(words, orientation).unsqueeze(-1).view(torch.uint8)


# Most pixels resized in one go: bounds the device memory a batch of large photos takes to
# about 1 GB (the resize's peak, measured on the CPU: 940 MiB for 32 photos of 1000x1000, 606
# for 32 of 1280x720, 361 for 32 of the seed's 640x480).
GROUP_MAX_PIXELS = 32_000_000


def resized_by_size(
    images: Sequence[torch.Tensor], shortest_edge: int, crop_height: int, crop_width: int
) -> torch.Tensor:
    """uint8 (N, 3, crop_height, crop_width) of each (3, H, W) image, resized and cropped.

    Images of one size are resized together (`resize_and_crop` on a stack of them, up to
    GROUP_MAX_PIXELS at a time): on a GPU each operation is a kernel launch the CPU issues under
    the GIL, so a batch of same-size photos costs the launches of one image, not one set each.
    """
    by_size: dict[tuple[int, ...], list[int]] = defaultdict(list)
    for index, image in enumerate(images):
        by_size[tuple(image.shape)].append(index)
    crops: list[torch.Tensor | None] = [None] * len(images)
    for (_, height, width), indices in by_size.items():
        per_group = max(1, GROUP_MAX_PIXELS // (height * width))
        for start in range(0, len(indices), per_group):
            group = indices[start : start + per_group]
            stacked = torch.stack([images[index] for index in group])
            resized = resize_and_crop(stacked, shortest_edge, crop_height, crop_width)
            for index, crop in zip(group, resized, strict=True):
                crops[index] = crop
    return torch.stack(crops)


class DeviceJpegDecoder:
    """Decodes and resizes forwarded JPEGs where the model runs (see the module docstring).

    By default (as the service) it decodes with Pillow even on a GPU: libjpeg-turbo's pixels,
    exactly the API path's, at the cost of the runner's CPU (in `threads` threads per batch).
    `use_nvjpeg` (CLIP_RUNNER_JPEG_DECODER=nvjpeg) decodes with nvJPEG on a GPU, whose pixels
    differ from libjpeg's by its own IDCT and upsampling (BENCHMARKS.md, fidelity). Pillow decodes
    with `passes` > 1 too (forward passes that may run beside a decode): nvJPEG can
    overwrite memory another pass's queued kernels still read (drain_queued_work).
    """

    def __init__(
        self,
        device: torch.device,
        shortest_edge: int,
        crop_height: int,
        crop_width: int,
        use_nvjpeg: bool = False,
        threads: int = 1,
        passes: int = 1,
        spin_waits: bool = False,
        pinned: bool = True,
    ) -> None:
        self.device = device
        self.spin_waits = spin_waits  # how the nvJPEG path waits for queued work
        self.geometry = (shortest_edge, crop_height, crop_width)
        wants_nvjpeg = use_nvjpeg and device.type == "cuda"
        if wants_nvjpeg and passes > 1:
            logger.warning(
                "%d forward passes at once (CLIP_RUNNER_PASSES): JPEGs are decoded with Pillow, "
                "not nvJPEG, which is only safe on a GPU with one pass at a time "
                "(pytorch/vision#9606)",
                passes,
            )
            wants_nvjpeg = False
        self._nvjpeg = _torchvision_decoder() if wants_nvjpeg else None
        if wants_nvjpeg and self._nvjpeg is None:
            logger.warning(
                "no torchvision built for torch %s: JPEGs are decoded on the CPU, not with "
                "nvJPEG (requirements.txt pins the release built for the pinned torch)",
                torch.__version__,
            )
        if self._nvjpeg is not None and not self._nvjpeg_decodes_a_plain_jpeg():
            self._nvjpeg = None
        self.name = NVJPEG if self._nvjpeg is not None else PILLOW
        # Pillow decodes into pinned memory on a GPU (decoded_on_host); `pinned=False` is the
        # benchmark's comparison (scripts/bench.py, "runner decode"). Not with nvJPEG, whose
        # input is the JPEG bytes: its refusals, decoded by Pillow, are few.
        self.pinned = (
            pinned and self.name == PILLOW and device.type == "cuda" and _pinned_memory_works()
        )
        self.refused_by_nvjpeg = 0  # JPEGs nvJPEG refused and Pillow then decoded (or not)
        self.threads = threads  # Pillow's decoding threads for a batch
        self._pool = (
            ThreadPoolExecutor(threads, thread_name_prefix="clip-jpeg") if threads > 1 else None
        )
        if device.type == "cuda":
            # The resize's float32 products are exact only in IEEE float32 (torch's default);
            # TF32 would round them. The model runs in fp16, which this does not touch.
            torch.backends.cuda.matmul.allow_tf32 = False

    def _nvjpeg_decodes_a_plain_jpeg(self) -> bool:
        """Whether nvJPEG works here at all. Where it cannot start (a driver or container
        without its hardware path), every batch call would fail and every image be retried
        alone before Pillow decoded it: twice the work, unseen, under the name "nvjpeg"."""
        plain = io.BytesIO()
        Image.new("RGB", (16, 16), (90, 140, 200)).save(plain, "JPEG")
        try:
            self._nvjpeg_decode([torch.frombuffer(bytearray(plain.getvalue()), dtype=torch.uint8)])
        # Not only RuntimeError: a torchvision whose C extension did not load imports, then
        # raises AttributeError for its missing op.
        except Exception as exc:  # noqa: BLE001 - any failure here means Pillow decodes
            logger.warning(
                "nvJPEG could not decode a plain JPEG on %s (%s): JPEGs are decoded on the CPU "
                "with Pillow",
                self.device,
                exc,
            )
            return False
        return True

    def __call__(self, blobs: Sequence[bytes]) -> tuple[torch.Tensor, list[bool]]:
        """uint8 (N_ok, 3, crop_h, crop_w) on the device for the images that decoded, and
        which of `blobs` did (in order)."""
        decoded = self._decode_all(blobs)
        ok = [image is not None for image in decoded]
        images = [image for image in decoded if image is not None]
        if not images:
            empty = torch.empty((0, 3, self.geometry[1], self.geometry[2]), dtype=torch.uint8)
            return empty.to(self.device), ok
        return resized_by_size(images, *self.geometry), ok

    def _decode_all(self, blobs: Sequence[bytes]) -> list[torch.Tensor | None]:
        if self._nvjpeg is not None:
            data = [torch.frombuffer(bytearray(blob), dtype=torch.uint8) for blob in blobs]
            try:
                planes = self._nvjpeg_decode(data)
            except torch.cuda.OutOfMemoryError:
                raise  # the batch is too large, not refused: retried in halves (device_health.py)
            except RuntimeError:  # one image it refuses fails the batch call: one at a time
                if not device_works(self.device):
                    raise  # not the images' fault: the runner restarts (device_health.py)
                pairs = zip(blobs, data, strict=True)
                return [self._nvjpeg_or_pillow(blob, datum) for blob, datum in pairs]
            pairs = zip(planes, blobs, strict=True)
            return [upright(image, stored_orientation(blob)) for image, blob in pairs]
        if self._pool is not None and len(blobs) > 1:
            decodes = [self._pool.submit(self._pillow_or_none, blob) for blob in blobs]
            # All of them done before any error is raised: a batch that failed (the device out
            # of memory, say) is retried in halves, which must not race its own leftovers.
            wait(decodes)
            return [decode.result() for decode in decodes]
        return [self._pillow_or_none(blob) for blob in blobs]

    def _nvjpeg_decode(self, data: list[torch.Tensor]) -> list[torch.Tensor]:
        # nvJPEG must not overtake queued work (drain_queued_work's docstring).
        drain_queued_work(self.device, self.spin_waits)
        return list(self._nvjpeg(data, self.device))

    def _nvjpeg_or_pillow(self, blob: bytes, data: torch.Tensor) -> torch.Tensor | None:
        """nvJPEG refuses some JPEGs that libjpeg decodes; Pillow then decides, so such an
        image gets the answer (or the 422) it would get from the API workers' own decode."""
        try:
            planes = self._nvjpeg_decode([data])[0]
        except torch.cuda.OutOfMemoryError:
            raise  # not the image's fault: the batch is retried in halves (device_health.py)
        except RuntimeError as exc:
            # nvJPEG may have queued its decode on its own stream before it failed, and the
            # output it was given is already back in torch's pool for the next allocation
            # (Pillow's copy below): device_works waits for every stream before that.
            if not device_works(self.device):
                raise  # not the image's fault: the runner restarts (device_health.py)
            logger.debug("nvJPEG refused a forwarded JPEG (%s); decoding it with Pillow", exc)
            self.refused_by_nvjpeg += 1
            return self._pillow_or_none(blob)
        return upright(planes, stored_orientation(blob))

    def _pillow_or_none(self, blob: bytes) -> torch.Tensor | None:
        """The image on the device, or None when Pillow cannot decode it. A failing copy to the
        device (out of memory, a broken CUDA context) is the server's fault, not the image's:
        it fails the batch rather than become a 422."""
        try:
            pixels, orientation = decoded_on_host(blob, self.pinned)
        except PILLOW_DECODE_ERRORS as exc:
            # The caller's mistake, answered with a 422 for that image: not worth a log line.
            logger.debug("a forwarded JPEG did not decode: %s", exc)
            return None
        # Queued, not waited for: a blocking copy polled until all work queued before it on
        # the stream had run, another pass's forward pass included (device_wait.py).
        return rgb_planes(upright_pixels(to_device(pixels, self.device), orientation))
