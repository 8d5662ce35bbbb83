"""The runner's model: the served CLIP loaded, placed on its device and warmed, and its three
batch encoders (pixels, forwarded JPEGs, prompts' token ids), each for one batch on one
inference thread.

Only the runner's worker imports this module, when its service starts (runner.py). The
supervisor and the API workers import the runner's service class as well, to reach it, and must
not load torch and transformers for it: that was most of their start (BENCHMARKS.md, "Start-up").
"""

from __future__ import annotations

import dataclasses
import io
import logging
import time

import bentoml
import numpy as np
import torch
from PIL import Image

from clip_runner.config import get_settings, runner_decode_threads
from clip_runner.cpu_quota import usable_cores
from clip_runner.cuda_check import usable_gpus
from clip_runner.metrics import (
    RUNNER_BATCH_IMAGES,
    RUNNER_BATCH_TEXTS,
    RUNNER_INFERENCE_SECONDS,
    RUNNER_JPEG_DECODE_SECONDS,
)
from clip_runner.model.cuda_graphs import ReplayedForward
from clip_runner.model.device_decode import NVJPEG, DeviceJpegDecoder
from clip_runner.model.device_health import (
    StalledPassWatch,
    exits_when_device_breaks,
    halves_when_out_of_memory,
)
from clip_runner.model.encoding import ClipEncoder, pick_device
from clip_runner.model.model_source import load_served_clip
from clip_runner.model.pass_layout import pass_layout
from clip_runner.model.simplejpeg_pixels import cpu_decoder_name
from clip_runner.model.startup_phases import StartupPhases

logger = logging.getLogger("clip_runner")


class ServedModel:
    """The model this runner worker serves, with what the API service needs to know of it
    (`facts`, `tokenizer_json`) and how the runner spreads its passes (`layout`).

    `encode_images`, `encode_jpegs` and `encode_tokens` each take one batch and the torch
    threads to run it with; a CUDA context broken by one batch would fail every later one, so
    each ends the process then, to be restarted (device_health.py).
    """

    def __init__(self, stored: bentoml.Model, phases: StartupPhases | None = None) -> None:
        """`phases` times each step of the start (startup_phases.py: the runner logs them)."""
        phases = phases or StartupPhases()
        settings = get_settings()
        cores = usable_cores()  # its CPU affinity, capped by a CPU quota (cpu_quota.py)
        # On CPU the runner workers share the cores (each had taken them all: two workers on 2
        # cores ran 4 threads); on a GPU the device does the work.
        share = cores if usable_gpus() else max(1, cores // settings.runner_workers)
        if settings.runner_threads:
            torch.set_num_threads(settings.runner_threads)
        elif torch.get_num_threads() > share:  # torch counts the cores, not the quota
            torch.set_num_threads(share)
        with phases.phase("model read"):
            loaded = load_served_clip(stored, settings.model_dir)  # CLIP_MODEL_DIR or the store
        # How the runner's threads wait for the GPU: asleep by default (device_wait.py).
        spin_waits = settings.cuda_wait == "spin"
        with phases.phase("placed on the device"):  # a GPU's CUDA context is made here
            device, dtype = pick_device(dtype_choice=settings.dtype)
            self.encoder = ClipEncoder(loaded.model, loaded.processor, device, dtype, spin_waits)
        facts = self.encoder.facts(loaded.tag, loaded.random_weights)
        self.tokenizer_json = self.encoder.tokenizer_json()  # before the warm-up: may refuse
        self.torch_threads = torch.get_num_threads()
        self.layout = pass_layout(
            device.type == "cuda",
            self.torch_threads,
            settings.runner_passes,
            settings.max_batch_size,
            settings.max_text_batch_size,
            compiled=settings.torch_compile,
        )
        if settings.runner_passes > self.layout.passes:
            logger.warning(
                "CLIP_RUNNER_PASSES=%d, but on CPU each pass needs a torch thread of its own and "
                "the runner has %d (CLIP_RUNNER_THREADS, or its share of the cores): %d pass(es) "
                "at once",
                settings.runner_passes,
                self.torch_threads,
                self.layout.passes,
            )
        with phases.phase("JPEG decoder"):
            self.jpeg_decoder = DeviceJpegDecoder(
                device,
                facts.shortest_edge,
                facts.crop_height,
                facts.crop_width,
                use_nvjpeg=settings.runner_jpeg_decoder == "nvjpeg",
                threads=runner_decode_threads(cores, settings.runner_workers),
                passes=self.layout.passes,
                spin_waits=spin_waits,
            )
        if settings.torch_compile:
            self.encoder.compile_towers()
        if loaded.random_weights:
            logger.warning(
                "!!! SERVING %s, A MODEL WITH RANDOM WEIGHTS: its answers are meaningless. "
                "Import a real checkpoint with `python scripts/import_model.py` for real use. !!!",
                loaded.tag,
            )
        with phases.phase("warm-up"):  # with torch.compile: its compilation
            self._warm_up(settings.torch_compile)
            text_pass_s = self._timed_text_pass()
        if settings.cuda_graphs:
            with phases.phase("CUDA graphs"):
                self._replay_image_passes(self.layout.max_batch)
        self.facts = dataclasses.replace(
            facts,
            device=device.type,
            dtype=str(dtype).removeprefix("torch."),
            passes=self.layout.passes,
            max_batch=self.layout.max_batch,
            max_text_batch=self.layout.max_text_batch,
            text_pass_s=text_pass_s,
            jpeg_decoder=self.jpeg_decoder.name,
        )
        # After the warm-up and the graphs' recording, which may take long on purpose.
        watch = StalledPassWatch(settings.stalled_pass_s) if settings.stalled_pass_s else None
        if watch is not None:
            watch.start()
        self.stalled_pass_watch = watch
        self.encode_images = exits_when_device_breaks(self._encode_image_batch, device, watch=watch)
        self.encode_jpegs = exits_when_device_breaks(self._encode_jpeg_batch, device, watch=watch)
        self.encode_tokens = exits_when_device_breaks(self._encode_token_batch, device, watch=watch)
        logger.info(
            "CLIP model %s ready on %s (%s, up to %d pass(es) at once of %d thread(s) (a lone pass "
            "gets all), batches up to %d images or %d prompts (a full text pass %.1f ms)%s%s, "
            "forwarded JPEGs decoded by %s%s%s%s)",
            loaded.tag,
            device,
            dtype,
            self.layout.passes,
            self.layout.threads_per_pass,
            self.layout.max_batch,
            self.layout.max_text_batch,
            1000 * text_pass_s,
            ", torch.compile" if settings.torch_compile else "",
            _replay_note(self.encoder.replayed),
            self.jpeg_decoder.name if self.jpeg_decoder.name == NVJPEG else cpu_decoder_name(),
            " into pinned memory" if self.jpeg_decoder.pinned else "",
            _wait_note(device, spin_waits),
            _stall_note(self.stalled_pass_watch),
        )

    def _warm_up(self, compiled: bool) -> None:
        """Passes of each encoder and a JPEG decode, so the first request pays no lazy
        initialisation (nvJPEG's included).

        A compiled model also gets a batch of two: it specialises on size 1 and compiles a
        second, dynamic graph for larger batches.
        """
        height, width = self.encoder.crop_height, self.encoder.crop_width
        for batch in (1, 2) if compiled else (1,):
            blank = np.zeros((batch, height, width, 3), dtype=np.uint8)
            self.encoder.encode_images(blank)
            self.encoder.encode_texts(["a photo of a cat"] * batch)
        jpeg = io.BytesIO()
        Image.new("RGB", (width, height)).save(jpeg, "JPEG")
        self.jpeg_decoder([jpeg.getvalue()])

    def _timed_text_pass(self) -> float:
        """Seconds of a full text pass (`max_text_batch` short prompts, as in an ensemble) on
        the threads one pass gets: the API workers size their text calls by it
        (`answers/runner_calls.text_call_passes`). The faster of two, the first having met the
        batch's size for the first time; tokenizing is left out, as the API workers do it."""
        prompts = [f"a photo of thing {index}." for index in range(self.layout.max_text_batch)]
        token_ids = self.encoder.tokenizer(prompts)["input_ids"]
        torch.set_num_threads(self.layout.threads_per_pass)
        try:
            times = []
            for _ in range(2):
                start = time.perf_counter()
                self.encoder.encode_token_ids(token_ids)
                times.append(time.perf_counter() - start)
        finally:
            torch.set_num_threads(self.torch_threads)
        return min(times)

    def _replay_image_passes(self, max_batch: int) -> None:
        """CLIP_CUDA_GRAPHS (on a GPU by default): record the image tower per batch bucket
        (cuda_graphs.py). A model that cannot be recorded is served as it is, with a warning,
        not refused."""
        try:
            self.encoder.replay_image_passes(max_batch)
        except RuntimeError as exc:
            logger.warning("CUDA graphs could not be recorded (%s): passes run eagerly", exc)
            return
        if not self.encoder.replayed.recorded:
            logger.warning(
                "CLIP_CUDA_GRAPHS=on without a GPU: nothing to record, image passes run eagerly "
                "through the same per-bucket staging (as the tests run it)"
            )

    def _encode_image_batch(self, pixels: np.ndarray, threads: int) -> np.ndarray:
        torch.set_num_threads(threads)  # under OpenMP, for this inference thread only
        RUNNER_BATCH_IMAGES.observe(len(pixels))
        with RUNNER_INFERENCE_SECONDS.labels(encoder="image").time():
            return halves_when_out_of_memory(self.encoder.encode_images)(pixels)

    def _encode_jpeg_batch(self, jpegs: list[bytes], threads: int) -> np.ndarray:
        torch.set_num_threads(threads)
        RUNNER_BATCH_IMAGES.observe(len(jpegs))
        with RUNNER_INFERENCE_SECONDS.labels(encoder="image").time():
            return halves_when_out_of_memory(self._decode_and_encode_jpegs)(jpegs)

    def _decode_and_encode_jpegs(self, jpegs: list[bytes]) -> np.ndarray:
        """Decoded and resized on the device, then encoded; a JPEG that did not decode gets a
        row of NaN (the API answers that image with a 422) and its batch goes on."""
        with RUNNER_JPEG_DECODE_SECONDS.time():
            crops, decoded = self.jpeg_decoder(jpegs)
        output = np.full((len(jpegs), self.facts.embedding_dim), np.nan, np.float32)
        if len(crops):
            output[np.flatnonzero(decoded)] = self.encoder.encode_pixels(crops)
        return output

    def _encode_token_batch(self, token_ids: list[list[int]], threads: int) -> np.ndarray:
        torch.set_num_threads(threads)
        RUNNER_BATCH_TEXTS.observe(len(token_ids))
        with RUNNER_INFERENCE_SECONDS.labels(encoder="text").time():
            return halves_when_out_of_memory(self.encoder.encode_token_ids)(token_ids)


def _wait_note(device: torch.device, spin_waits: bool) -> str:
    if device.type != "cuda":
        return ""
    return (
        ", GPU waited for by polling (CLIP_CUDA_WAIT=spin)"
        if spin_waits
        else ", GPU waited for asleep"
    )


def _stall_note(watch: StalledPassWatch | None) -> str:
    if watch is None:
        return ""
    return f", a pass in progress over {watch.limit_s:g} s ends this process"


def _replay_note(replayed: ReplayedForward | None) -> str:
    if replayed is None:
        return ""
    how = "CUDA graphs" if replayed.recorded else "eager passes (no GPU)"
    return f", image passes per batch bucket {list(replayed.buckets)} from {how}"
