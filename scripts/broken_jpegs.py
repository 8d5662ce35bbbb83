"""What the runner's JPEG decoder makes of forwarded JPEGs whose coded data is broken, against
the API path's own decode of the same bytes.

    python scripts/broken_jpegs.py                  # 600 mutations, a summary as JSON
    python scripts/broken_jpegs.py --lines out.jsonl --count 2000

On a GPU the API workers forward a JPEG's bytes once its header parses and an end marker follows
its scan (`device_decodable_jpeg`); the coded data in between is not checked. Where Pillow
(libjpeg-turbo) refuses such a file the API path answers a 422. nvJPEG may instead decode it (the
caller gets an answer where it would have had a 422), refuse it (the runner then asks Pillow:
the same 422), decode it to other pixels than Pillow does, leave the CUDA context broken (the
runner restarts, device_health.py), or, decoded in a batch, change the pixels of the other
callers' images beside it. This counts each, on mutated copies of baseline JPEGs (bytes
overwritten, half of them also cut short with an end marker appended, as tests/test_fuzz.py
does): every copy the forwarding check accepts is decoded alone by the runner's decoder and by
the API path, then again in a batch beside intact JPEGs, as the runner decodes.

Each JPEG's outcome is written as a JSON line as soon as it is known, so that a decode which
kills the process (or hangs it) is named by the line that is missing: `scripts/bench.py
--gpu-targets` runs this in a process of its own, last, and summarises the lines it finds.
On a CPU the runner's decoder is Pillow, so every outcome is "same crop" or "both refused" (the
property tests/test_fuzz.py proves); run there, it checks only this script.
"""

from __future__ import annotations

import argparse
import base64
import dataclasses
import json
import sys
import time
import traceback
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # tests.helpers and tests.hard_images: the images the tests use

from clip_runner.errors import RequestError  # noqa: E402
from clip_runner.images.loading import (  # noqa: E402
    ImageGeometry,
    device_decodable_jpeg,
    prepare_image,
)
from clip_runner.model.device_decode import DeviceJpegDecoder  # noqa: E402
from clip_runner.model.encoding import pick_device  # noqa: E402

# ViT-B/32's geometry, as the GPU run serves it.
GEOMETRY = ImageGeometry(224, 224, 224)
MAX_PIXELS = 40_000_000  # far above the sources' 0.3 Mpx: no mutation is refused for size
# The runner's batches mix callers' images: each broken JPEG is decoded again among this many
# intact ones.
NEIGHBOURS = 7

SAME = "same crop"
BOTH_REFUSED = "both refused"
PIXELS_DIFFER = "both decoded, pixels differ"
ANSWERED_NOT_422 = "decoded where the API path refuses (an answer instead of a 422)"
REFUSED_NOT_ANSWERED = "refused where the API path decodes (a 422 instead of an answer)"
# The first line, written once the harness's own set-up is done (before nvJPEG runs).
STARTED = "started on"
# Any exception stops the run: on a GPU most likely a broken CUDA context (the runner would
# restart), so its traceback is kept to tell.
RAISED = "raised an exception"


def intact_jpegs() -> list[tuple[str, bytes]]:
    """(name, bytes) of the baseline JPEGs the API workers forward: 4:2:0, one stored turned
    (an EXIF orientation), 4:4:4, greyscale, with restart markers (where libjpeg resynchronises
    after damage), and a page of text."""
    from tests.hard_images import text_page
    from tests.helpers import encode, oriented_exif, photo_like

    photo = photo_like(640, 480, seed=11)
    turned = oriented_exif(photo, 6)  # a phone's: the runner reads the tag and turns the pixels
    return [
        ("photo 640x480 4:2:0 q90", encode(photo, "JPEG", quality=90)),
        ("phone photo 640x480 stored turned (EXIF 6)", encode(photo, "JPEG", exif=turned)),
        ("photo 480x640 4:4:4 q75", encode(photo_like(480, 640, 12), "JPEG", subsampling=0)),
        ("greyscale 640x480", encode(photo.convert("L"), "JPEG")),
        ("photo 640x480, restart markers", encode(photo, "JPEG", restart_marker_rows=1)),
        ("text page 640x480 4:2:0", encode(text_page(640, 480, seed=13), "JPEG", quality=85)),
    ]


def mutations(
    sources: list[tuple[str, bytes]], count: int, seed: int
) -> Iterator[tuple[str, bytes]]:
    """`count` deterministic mutations of the sources in turn: 1-8 bytes overwritten at random
    places, and half of them cut short at a random place with an end marker appended."""
    from tests.helpers import damaged_copy

    rng = np.random.default_rng(seed)
    for number in range(count):
        name, original = sources[number % len(sources)]
        yield f"{name} #{number}", damaged_copy(original, rng)


def forwarded(blob: bytes) -> bool:
    """Whether the API workers would forward these bytes to the runner's decoder."""
    return device_decodable_jpeg(blob, MAX_PIXELS, GEOMETRY.shortest_edge)


def api_crop(blob: bytes) -> np.ndarray | None:
    """The API path's crop (H, W, 3) of `blob`, or None where it answers a 422."""
    try:
        return prepare_image(blob, 0, GEOMETRY, MAX_PIXELS)
    except RequestError:
        return None


class RunnerDecode:
    """The runner's decoder (nvJPEG on a GPU, Pillow otherwise), one JPEG or a batch at a time,
    each call waited for on the device so that an error shows at the JPEG that caused it."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.decoder = DeviceJpegDecoder(device, *dataclasses.astuple(GEOMETRY), use_nvjpeg=True)

    def batch(self, blobs: list[bytes]) -> list[np.ndarray | None]:
        crops, decoded = self.decoder(blobs)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        rows = iter(crops.permute(0, 2, 3, 1).cpu().numpy())
        return [next(rows) if ok else None for ok in decoded]

    def one(self, blob: bytes) -> tuple[np.ndarray | None, bool]:
        """The crop (or None) and whether nvJPEG refused the JPEG and Pillow decided."""
        refused_before = self.decoder.refused_by_nvjpeg
        crop = self.batch([blob])[0]
        return crop, self.decoder.refused_by_nvjpeg > refused_before


def mean_abs_difference(ours: np.ndarray, theirs: np.ndarray) -> float:
    return float(np.abs(ours.astype(np.int16) - theirs.astype(np.int16)).mean())


def outcome(ours: np.ndarray | None, theirs: np.ndarray | None) -> str:
    if ours is None:
        return BOTH_REFUSED if theirs is None else REFUSED_NOT_ANSWERED
    if theirs is None:
        return ANSWERED_NOT_422
    return SAME if np.array_equal(ours, theirs) else PIXELS_DIFFER


def same_result(first: np.ndarray | None, second: np.ndarray | None) -> bool:
    """The same crop, or refused both times."""
    return outcome(first, second) in (SAME, BOTH_REFUSED)


def intact_line(runner: RunnerDecode, sources: list[tuple[str, bytes]]) -> tuple[dict, list]:
    """The intact JPEGs first: how far the runner's pixels are from the API path's on them (the
    scale against which a broken JPEG's difference is judged), and whether decoding them as
    one batch gives the pixels each gets alone. Returns the line and their solo crops."""
    solo = [runner.one(blob)[0] for _, blob in sources]
    differences = {
        name: mean_abs_difference(crop, api_crop(blob))
        for (name, blob), crop in zip(sources, solo, strict=True)
    }
    batched = runner.batch([blob for _, blob in sources])
    line = {
        "intact": True,
        "decoder": runner.decoder.name,
        "device": str(runner.device),
        "mean_abs_difference": differences,
        "batch_differs_from_solo": sum(
            not same_result(alone, together) for alone, together in zip(solo, batched, strict=True)
        ),
    }
    return line, solo


def broken_line(
    runner: RunnerDecode,
    name: str,
    blob: bytes,
    sources: list[tuple[str, bytes]],
    solo_intact: list,
    slot: int,
) -> dict:
    """One forwarded broken JPEG: its outcome alone against the API path, then decoded at
    `slot` among intact JPEGs: whether its own result or any neighbour's pixels changed."""
    ours, refused_by_nvjpeg = runner.one(blob)
    theirs = api_crop(blob)
    line: dict = {"name": name, "outcome": outcome(ours, theirs)}
    if refused_by_nvjpeg:
        line["refused_by_nvjpeg"] = True
    if ours is not None and theirs is not None:
        line["mean_abs_difference"] = round(mean_abs_difference(ours, theirs), 3)
    neighbours = [index % len(sources) for index in range(NEIGHBOURS)]
    blobs = [sources[index][1] for index in neighbours]
    blobs.insert(slot, blob)
    together = runner.batch(blobs)
    mine = together.pop(slot)
    line["batch_changed_it"] = not same_result(ours, mine)
    line["batch_changed_neighbours"] = sum(
        not same_result(solo_intact[index], crop)
        for index, crop in zip(neighbours, together, strict=True)
    )
    return line


def run(lines_path: Path, count: int, seed: int) -> None:
    """Writes the started line, the intact line, then one line per forwarded broken JPEG, each
    flushed as it ends; stops at the first exception (the CUDA context may be gone)."""
    sources = intact_jpegs()
    device = pick_device()[0]
    rng = np.random.default_rng(seed + 1)
    with lines_path.open("w") as lines:

        def write(line: dict) -> None:
            lines.write(json.dumps(line) + "\n")
            lines.flush()

        # All before this line is the harness's (imports, the sources, the device): a process
        # that ends without it did not run, rather than stop on nvJPEG.
        write({STARTED: str(device)})
        runner = RunnerDecode(device)  # nvJPEG's first decode, where it is asked for
        first, solo_intact = intact_line(runner, sources)
        write({**first, "mutations": count, "seed": seed})
        for name, blob in mutations(sources, count, seed):
            if not forwarded(blob):
                continue
            # Named before it is decoded: a crash leaves this line without its outcome.
            write({"trying": name})
            slot = int(rng.integers(NEIGHBOURS + 1))
            try:
                write(broken_line(runner, name, blob, sources, solo_intact, slot))
            except Exception:  # noqa: BLE001 - the finding itself: recorded, then stop
                write({"name": name, "outcome": RAISED, "error": traceback.format_exc()[-2000:]})
                return


def summary(lines: list[dict], seconds: float | None = None) -> dict:
    """The lines as counts: each outcome, nvJPEG's refusals, the pixel differences against the
    intact JPEGs' largest, what batching changed, and the JPEG a crash or hang stopped at."""
    lines = [line for line in lines if STARTED not in line]
    if not lines or not lines[0].get("intact"):
        return {"error": "no intact line: the decoder never ran"}
    intact = lines[0]
    intact_scale = max(intact["mean_abs_difference"].values())
    results = [line for line in lines[1:] if "outcome" in line]
    names = {line["name"] for line in results}
    unfinished = [line for line in lines[1:] if "trying" in line and line["trying"] not in names]
    differences = [line["mean_abs_difference"] for line in results if "mean_abs_difference" in line]
    counted = {
        "decoder": intact["decoder"],
        "device": intact["device"],
        "mutations": intact["mutations"],
        "tried": len(results) + len(unfinished),  # forwarded ones, up to where a run stopped
        "outcomes": dict(Counter(line["outcome"] for line in results)),
        "refused_by_nvjpeg": sum(bool(line.get("refused_by_nvjpeg")) for line in results),
        "intact_largest_mean_abs_difference": round(intact_scale, 3),
        "intact_batch_differs_from_solo": intact["batch_differs_from_solo"],
        "largest_mean_abs_difference": max(differences, default=None),
        "differ_more_than_intact": sum(value > intact_scale for value in differences),
        "batch_changed_the_broken_jpeg": sum(
            bool(line.get("batch_changed_it")) for line in results
        ),
        "batch_changed_neighbours": sum(
            line.get("batch_changed_neighbours", 0) for line in results
        ),
    }
    errors = [line for line in results if line["outcome"] == RAISED]
    if errors:
        counted["raised"] = {
            "error": errors[0]["error"],
            **culprit(errors[0]["name"], intact),
        }
    if unfinished:  # the process died or hung on this JPEG
        counted["stopped_at"] = culprit(unfinished[0]["trying"], intact)
    if seconds is not None:
        counted["seconds"] = round(seconds, 1)
    return counted


def culprit(name: str, intact: dict) -> dict:
    """A mutation's name and bytes (base64), made again from the run's seed, to reproduce it
    on a machine of the same kind (the same Pillow encodes the same sources)."""
    blob = dict(mutations(intact_jpegs(), intact["mutations"], intact["seed"]))[name]
    return {"name": name, "bytes": base64.b64encode(blob).decode()}


def read_lines(path: Path) -> list[dict]:
    """The lines a run wrote, up to a last one cut off mid-write."""
    if not path.exists():
        return []
    lines = []
    for text in path.read_text().splitlines():
        try:
            lines.append(json.loads(text))
        except json.JSONDecodeError:
            break
    return lines


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--count", type=int, default=600, help="mutations to try")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--lines", type=Path, help="where each JPEG's line goes (JSON lines)")
    args = parser.parse_args()
    lines_path = args.lines or Path("/tmp/broken-jpegs.jsonl")
    started = time.monotonic()
    run(lines_path, args.count, args.seed)
    print(json.dumps(summary(read_lines(lines_path), time.monotonic() - started), indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
