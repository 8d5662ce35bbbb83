"""JPEG decoding in the service's processes, three ways, in one thread, in a pool, and beside a
thread running Python: simplejpeg into the array (the service), Pillow into the array (the
service where simplejpeg is missing or disagrees with Pillow), Pillow's own memory copied out
(the way before both).

    python scripts/decode_bench.py --out benchmarks/decode-bench.json

The ways take turns in each of:
- milliseconds per image (the best of `--repeats` timed loops) of the API workers' exact path
  (`prepare_image`: decode, compiled resize and crop), also on photos stored turned with an
  EXIF orientation as phones store them and with a preview after them as cameras do (an MPO),
  and of the runner's decode of forwarded JPEGs (`decoded_on_host`); both on colour and on
  greyscale JPEGs (a black-and-white photo, a scanned page);
- milliseconds per image of compositing a transparent image onto white, as transformers does
  (`alpha_composite`) and as the service does (`on_white`), the same bytes;
- the runner's decode rate (the seed's photo) alone and beside one thread spinning in Python,
  at Python's switch interval (5 ms) and at 0.2 ms. A thread back from C code (both decoders
  let go of the GIL, simplejpeg twice per image: for the header, then the decode) waits for
  the GIL until the spinning thread lets go, up to an interval: every such return costs the
  decode a wait, which is what the runner's threads meet beside its event loop on a GPU;
- the runner's decode rate of batches of 32 seed photos handed to a pool of 1 or 2 threads, as
  its decoding threads take them (medians of `--repeats` 2-s windows), alone and beside a
  thread running Python half of the time (the runner's event loop under load).
All ways give the same pixels (checked before timing). malloc is set as in the server.
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import statistics
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor, wait
from pathlib import Path

import torch
from bench import REPO, seed_request_bodies
from PIL import Image

from clip_runner.images.loading import (
    ImageGeometry,
    decode_image,
    on_white,
    prepare_image,
    resize_and_crop,
)
from clip_runner.malloc_tuning import reuse_freed_memory
from clip_runner.model import simplejpeg_pixels
from clip_runner.model.device_decode import decoded_on_host, rgb_planes
from tests.hard_images import text_page
from tests.helpers import encode, oriented_exif, photo_like, with_preview

GEOMETRY = ImageGeometry(224, 224, 224)


def copied_api(blob: bytes):
    """The API path before: Pillow decodes into its own memory, the pixels are copied out."""
    return resize_and_crop(decode_image(blob, 0, 10**9), GEOMETRY)


def into_array_api(blob: bytes):
    return prepare_image(blob, 0, GEOMETRY, 10**9)


def copied_runner(blob: bytes) -> torch.Tensor:
    """The runner's decode before: Pillow's RGBX bytes copied out (a greyscale image converted
    to RGB first), then wrapped for torch."""
    with Image.open(io.BytesIO(blob)) as opened:
        image = opened if opened.mode == "RGB" else opened.convert("RGB")
        width, height = image.size
        stored = bytearray(image.tobytes("raw", "RGBX"))
    return torch.frombuffer(stored, dtype=torch.uint8).view(height, width, 4)


def into_array_runner(blob: bytes) -> torch.Tensor:
    """The runner's decode of a forwarded JPEG: the stored pixels (the EXIF turn, if any, is
    done on the device afterwards)."""
    return decoded_on_host(blob)[0]


def pillow_alone(decode):
    """`decode` with simplejpeg set aside: Pillow decodes into the array."""

    def decode_with_pillow(blob: bytes):
        simplejpeg_pixels.AGREES = False
        try:
            return decode(blob)
        finally:
            simplejpeg_pixels.AGREES = AGREES

    return decode_with_pillow


AGREES = simplejpeg_pixels.AGREES
WAYS = {
    "api": {
        "copied out": copied_api,
        "Pillow into the array": pillow_alone(into_array_api),
        "simplejpeg": into_array_api,
    },
    "runner": {
        "copied out": copied_runner,
        "Pillow into the array": pillow_alone(into_array_runner),
        "simplejpeg": into_array_runner,
    },
}


def oriented(width: int, height: int) -> bytes:
    """A photo JPEG (quality 90) tagged to be shown turned a quarter clockwise, as phones store
    one taken upright."""
    image = photo_like(width, height, 3)
    return encode(image, "JPEG", quality=90, exif=oriented_exif(image, 6))


def camera_jpeg(width: int, height: int) -> bytes:
    """A photo JPEG (quality 90) with a 1920x1440 preview after it (an MPO)."""
    return with_preview(photo_like(width, height, 3), photo_like(1920, 1440, 4), quality=90)


def transparent_images() -> dict[str, Image.Image]:
    """A 1920x1080 photo whose alpha runs from 0 to 255 across it (a cut-out product shot, a
    logo), as RGBA and as a palette with one transparent colour (what PNG optimisers write)."""
    photo = photo_like(1920, 1080, 5)
    alpha = Image.linear_gradient("L").rotate(90).resize(photo.size)
    rgba = photo.convert("RGBA")
    rgba.putalpha(alpha)
    palette = photo.quantize(255)
    palette.info["transparency"] = 0
    return {"RGBA PNG 1920x1080": rgba, "palette PNG 1920x1080, one colour transparent": palette}


def alpha_composited(rgba: Image.Image) -> Image.Image:
    """Onto white as transformers' `convert_to_rgb` composites, and the service did before."""
    background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    return Image.alpha_composite(background, rgba).convert("RGB")


def onto_white_ms(repeats: int) -> dict:
    """ms per image (best of `repeats` loops of 20, the ways taking turns): compositing the
    converted RGBA pixels onto white, both ways; and the API path's whole work on the PNG."""
    result = {}
    for name, image in transparent_images().items():
        rgba = image.convert("RGBA")
        assert alpha_composited(rgba).tobytes() == on_white(rgba).tobytes()
        blob = encode(image, "PNG")
        ways = {  # each way and what it is given
            "alpha_composite": (alpha_composited, rgba),
            "on_white (paste)": (on_white, rgba),
            "prepare_image of the PNG": (into_array_api, blob),
        }
        timings = {way: [] for way in ways}
        for _ in range(repeats):
            for way, (run, given) in ways.items():
                timings[way].append(ms_per_image(run, given, 20))
        result[name] = {way: round(min(times), 3) for way, times in timings.items()}
        print("onto white,", name, result[name], flush=True)
    return result


def ms_per_image(work, given: object, loops: int) -> float:
    """ms per call of `work(given)` (bytes to decode, or an image to composite), after one
    call to warm it."""
    work(given)
    started = time.perf_counter()
    for _ in range(loops):
        work(given)
    return (time.perf_counter() - started) / loops * 1000


def rate_beside_spinner(decode, blob: bytes, spinners: int, seconds: float) -> float:
    """Images/s of `decode` in this thread while `spinners` threads run a Python loop."""
    stop = threading.Event()

    def spin() -> None:
        while not stop.is_set():
            pass

    threads = [threading.Thread(target=spin) for _ in range(spinners)]
    for thread in threads:
        thread.start()
    count, started = 0, time.monotonic()
    while time.monotonic() - started < seconds:
        decode(blob)
        count += 1
    stop.set()
    for thread in threads:
        thread.join()
    return count / (time.monotonic() - started)


def half_busy(stop: threading.Event) -> None:
    """Python for 1 ms, asleep for 1 ms, until `stop`: a stand-in for the runner's event loop
    under load, beside which its decoding threads run."""
    while not stop.is_set():
        burst = time.perf_counter()
        while time.perf_counter() - burst < 0.001:
            pass
        time.sleep(0.001)


def batch_rate(decode, blobs: list[bytes], threads: int, busy: bool, seconds: float) -> float:
    """Images/s of `decode` over `blobs` handed to a pool of `threads` threads one batch at a
    time, as the runner's decoding threads take a batch of forwarded JPEGs (device_decode.py),
    alone or beside a `half_busy` thread."""
    stop = threading.Event()
    beside = threading.Thread(target=half_busy, args=(stop,))
    if busy:
        beside.start()
    count, started = 0, time.monotonic()
    with ThreadPoolExecutor(threads) as pool:
        while time.monotonic() - started < seconds:
            wait([pool.submit(decode, blob) for blob in blobs])
            count += len(blobs)
    stop.set()
    if busy:
        beside.join()
    return count / (time.monotonic() - started)


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "decode-bench.json")
    args = parser.parse_args()
    if not AGREES:
        parser.error("simplejpeg is missing or disagrees with Pillow here (see the log)")
    reuse_freed_memory()
    torch.set_num_threads(1)
    seed = base64.b64decode(json.loads(seed_request_bodies()[0])["images"][0])
    a4_scan = text_page(2480, 3508, 3).convert("L")  # an A4 page at 300 dpi
    images = {
        "seed photo 640x480": (seed, 300),
        "photo 1200x900, quality 90": (encode(photo_like(1200, 900, 1), "JPEG", quality=90), 60),
        "photo 4000x3000, quality 90": (encode(photo_like(4000, 3000, 2), "JPEG", quality=90), 5),
        # "copied out": converted to RGB in Pillow's memory, then copied out.
        "greyscale photo 1200x900, quality 90": (
            encode(photo_like(1200, 900, 1).convert("L"), "JPEG", quality=90),
            60,
        ),
        "greyscale A4 page scanned at 300 dpi, 2480x3508, quality 90": (
            encode(a4_scan, "JPEG", quality=90),
            5,
        ),
    }
    # Photos as phones and cameras store them, and a PNG: timed on the API workers' path only.
    # A runner decoding with Pillow is sent the JPEGs too, and decodes them as it decodes an
    # upright JPEG of their size (a turned one as stored, turned on its device afterwards; an
    # MPO's first image). "copied out" is how the service decoded them before
    # (Pillow turning the pixels, or decoding the MPO's first image, into its own memory, then
    # copying them out).
    api_only = {
        "photo 1200x900 stored turned (EXIF orientation 6)": (oriented(1200, 900), 60),
        "photo 4000x3000 stored turned (EXIF orientation 6)": (oriented(4000, 3000), 5),
        "photo 4000x3000 with a 1920x1440 preview (MPO)": (camera_jpeg(4000, 3000), 5),
        # Converted to RGB, then its RGBX copied out, before; now its grey bytes copied out.
        "greyscale PNG, the A4 page": (encode(a4_scan, "PNG"), 5),
    }
    result: dict = {"ms_per_image": {}, "runner_decodes_per_s": {}}
    for name, (blob, loops) in [*images.items(), *api_only.items()]:
        for role, ways in WAYS.items():
            if role == "runner" and name in api_only:
                continue
            first, *others = (rgb_planes(torch.as_tensor(way(blob))) for way in ways.values())
            assert all(torch.equal(first, other) for other in others)
            timings = {way: [] for way in ways}
            for _ in range(args.repeats):
                for way, decode in ways.items():
                    timings[way].append(ms_per_image(decode, blob, loops))
            best = {way: round(min(times), 3) for way, times in timings.items()}
            result["ms_per_image"][f"{role}, {name}"] = best
            print(role, name, best, flush=True)
    result["onto_white_ms"] = onto_white_ms(args.repeats)
    for interval_ms in (5.0, 0.2):
        sys.setswitchinterval(interval_ms / 1000)
        for spinners in (0, 1):
            rates = {
                way: round(max(rate_beside_spinner(decode, seed, spinners, 2) for _ in range(2)))
                for way, decode in WAYS["runner"].items()
            }
            key = f"switch interval {interval_ms:g} ms, {spinners} thread(s) running Python"
            result["runner_decodes_per_s"][key] = rates
            print(key, rates, flush=True)
    sys.setswitchinterval(0.005)
    batch = [base64.b64decode(json.loads(body)["images"][0]) for body in seed_request_bodies()]
    result["runner_batch_decodes_per_s"] = {}
    for threads in (1, 2):
        for busy in (False, True):
            rates = {way: [] for way in WAYS["runner"]}
            for _ in range(args.repeats):  # the ways taking turns
                for way, decode in WAYS["runner"].items():
                    rates[way].append(batch_rate(decode, batch * 8, threads, busy, 2))
            key = f"{threads} thread(s), {'beside a half-busy thread' if busy else 'alone'}"
            median = {way: round(statistics.median(rate)) for way, rate in rates.items()}
            result["runner_batch_decodes_per_s"][key] = median
            print("batches of 32 seed photos,", key, median, flush=True)
    args.out.write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
