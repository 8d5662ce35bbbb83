"""Which GPU each runner worker serves, on a machine with several.

BentoML's own allocator gives every worker of a service the same `CUDA_VISIBLE_DEVICES` (the
runner's `resources={"gpu": 1}`: the first GPU), so on an instance with four GPUs every runner
worker would share the first and leave three idle. Instead the runner workers go round the usable
GPUs in turn (worker 1 on the first, worker 2 on the second, ..., worker n + 1 on the first
again), each process seeing only its own: it sets `CUDA_VISIBLE_DEVICES` to that one entry
before torch starts CUDA, which reads the variable once, when the driver first starts in a
process (cuda_check.py keeps the runner's settings from starting it earlier). Every piece of
device code then keeps using the index-less "cuda", which is that GPU, in every thread.
"""

from __future__ import annotations

from collections.abc import MutableMapping

# The supervisor leaves the runner workers' CUDA_VISIBLE_DEVICES alone with this set (runner.py).
BENTOML_GPU_ALLOCATION_OFF = "BENTOML_DISABLE_GPU_ALLOCATION"


def worker_gpu(visible: str | None, gpus: int, worker_index: int | None) -> str | None:
    """The `CUDA_VISIBLE_DEVICES` entry runner worker `worker_index` (BentoML's, from 1) serves,
    of the `gpus` usable ones listed in `visible` (unset: all of them, by index; entries may be
    indices or UUIDs); None where there is nothing to choose (one GPU or none)."""
    if gpus < 2 or not worker_index or worker_index < 1:
        return None
    entries = [entry.strip() for entry in visible.split(",")] if visible else []
    entries = entries[:gpus] or [str(index) for index in range(gpus)]
    return entries[(worker_index - 1) % len(entries)]


def place_worker(
    environ: MutableMapping[str, str], gpus: int, worker_index: int | None
) -> str | None:
    """Narrows this process's `CUDA_VISIBLE_DEVICES` to its worker's GPU (`worker_gpu`), and
    returns that entry; leaves it as it is, and returns None, where there is one GPU or none."""
    gpu = worker_gpu(environ.get("CUDA_VISIBLE_DEVICES"), gpus, worker_index)
    if gpu is not None:
        environ["CUDA_VISIBLE_DEVICES"] = gpu
    return gpu
