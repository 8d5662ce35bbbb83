"""How the runner spreads its forward passes over the machine: passes at once, threads, batch.

On CPU, two passes at once with half the torch threads each beat one pass with all of them: a
pass on all cores stalls at every OpenMP barrier whenever another process (the API worker, the
OS) takes one core, and the other core then sits idle. Measured on 2 cores (BENCHMARKS.md): the
bare encoder 1.05-1.28 x (batch 8 and 16, 5 rounds), the service at 32 clients 1.17 x (median
of 5 paired rounds). On a GPU the passes share one device, so one at a time with large batches.
"""

from __future__ import annotations

from dataclasses import dataclass

# Largest batch per pass when CLIP_MAX_BATCH_SIZE is left to the device. On 2 CPU cores batch 8
# runs as fast per image as 16 or 32, and smaller batches keep both passes fed under load.
CPU_MAX_BATCH = 8
GPU_MAX_BATCH = 32
# Text batches are this many times the image batch limit by default. A prompt costs a fraction
# of an image (ViT-B/32 on 2 cores: about 75 short prompts/s against 18 images/s), so at the
# image limit a text pass is short and every runner call carries few prompts. Bare text encoder
# on 2 cores, prompts/s at batch 8 / 32: ViT-B/32 65-71 / 75-78, the tiny model 4,400-4,700 /
# 6,100-8,300; served, uncached /embed_texts at 32 clients (tiny model): batches of 8 gave
# 1,030-1,570 prompts/s, of about 30 1,940-3,790 (BENCHMARKS.md). Past 4 x, 64 and 128 were no
# faster bare on CPU; on a GPU a text pass of 128 prompts is still far shorter than one of 32
# images.
TEXT_BATCH_FACTOR = 4


@dataclass(frozen=True)
class PassLayout:
    passes: int  # forward passes running at once, each on its own thread
    threads_per_pass: int  # torch threads each pass uses
    max_batch: int  # most images in one pass
    max_text_batch: int  # most prompts in one pass


def pass_layout(
    on_gpu: bool,
    torch_threads: int,
    passes: int,
    max_batch: int,
    max_text_batch: int = 0,
    compiled: bool = False,
) -> PassLayout:
    """The layout for this device; `passes`, `max_batch` or `max_text_batch` of 0 means "choose
    for the device" (texts: TEXT_BATCH_FACTOR x the image limit).

    A `torch.compile`d model gets one pass at a time unless told otherwise: called from two
    threads at once it ran at 0.32 x the throughput, with requests timing out (BENCHMARKS.md).
    On CPU each pass runs on a torch thread of its own, so there are at most as many passes as
    threads: more had run more threads than CLIP_RUNNER_THREADS allows (4 passes of 1 thread
    each where 1 was set).
    """
    if not passes:
        passes = 1 if on_gpu or compiled or torch_threads < 2 else 2
    if not on_gpu:
        passes = min(passes, max(torch_threads, 1))
    if not max_batch:
        max_batch = GPU_MAX_BATCH if on_gpu else CPU_MAX_BATCH
    if not max_text_batch:
        max_text_batch = TEXT_BATCH_FACTOR * max_batch
    return PassLayout(passes, max(torch_threads // passes, 1), max_batch, max_text_batch)
