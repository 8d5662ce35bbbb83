"""What the runner does when its device fails a batch: out of memory, or broken for good.

A batch the device has no memory for is encoded in halves (`halves_when_out_of_memory`).

Most errors in a forward pass or a decode leave the device usable: out of memory, a JPEG that
nvJPEG refuses. Some leave the process's CUDA context broken for good: an illegal memory access
(CUDA error 700, which nvJPEG users have reported after decodes), a launch failure, an
uncorrectable ECC error. Every later CUDA call in that process fails too, and CUDA's own
documentation says the process must be restarted. A runner left like that would answer every
request with an error while its readiness probe (plain HTTP) still passed, so a load balancer
or SageMaker would keep sending traffic to an instance that can serve nothing. So after an
error the runner asks the device for a trivial result; when it cannot give one, the process
exits and BentoML's supervisor starts a fresh one (with a new CUDA context), as after a crash.

A device can also stop without an error: a kernel or a decode that never ends leaves the
thread waiting for it asleep for good (device_wait.py), every later pass queued behind it, and
the readiness probe passing. `StalledPassWatch` ends the process the same way once a pass has
been in progress for longer than CLIP_STALLED_PASS_S (60 s on a GPU, where a pass takes
milliseconds; off on CPU, where a large model's pass on a small machine may take many seconds).
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import os
import threading
import time
from collections.abc import Callable, Iterator
from typing import TypeVar

import numpy as np
import torch

logger = logging.getLogger(__name__)

# EX_SOFTWARE: the exit status of a runner process that left because its device broke.
EXIT_DEVICE_BROKEN = 70

Rows = TypeVar("Rows", np.ndarray, list)
Output = TypeVar("Output")


def halves_when_out_of_memory(encode: Callable[[Rows], np.ndarray]) -> Callable[[Rows], np.ndarray]:
    """`encode(rows)`, run on each half of the rows (and each half's halves, as far as needed)
    when the device runs out of memory for all of them at once, the output rows in order.

    The GPU batch limit is one number for every card: a small card, a large model, large JPEGs
    or another process on the same GPU can leave too little memory for a whole batch, and the
    batch's every request would get a 503. A single row that does not fit still fails.
    (PyTorch's allocator has already returned its cached memory before it raises.)
    """

    def run(rows: Rows) -> np.ndarray:
        try:
            return encode(rows)
        except torch.cuda.OutOfMemoryError:
            if len(rows) < 2:
                raise
        # Not inside the except clause: its traceback holds the failed pass's frames, and with
        # them the tensors that filled the memory.
        logger.warning(
            "out of device memory for %d rows at once: encoding them in halves", len(rows)
        )
        middle = len(rows) // 2
        return np.concatenate([run(rows[:middle]), run(rows[middle:])])

    return run


def device_works(device: torch.device) -> bool:
    """Whether `device` still computes: waits for its queued work, then adds two numbers on it.

    The CPU always does. A CUDA context broken by a sticky error raises on both steps; one that
    is only out of memory is not broken."""
    if device.type != "cuda":
        return True
    try:
        torch.cuda.synchronize(device)
        probe = torch.ones(1, device=device)
        return (probe + probe).item() == 2.0
    except torch.cuda.OutOfMemoryError:  # full, not broken: the failed batch's memory comes back
        return True
    except RuntimeError:  # torch.AcceleratorError and the CUDA errors of older releases
        return False


class StalledPassWatch:
    """Ends the process (EXIT_DEVICE_BROKEN) once a pass has been in progress for longer than
    `limit_s`: a device that stopped without an error (the module's docstring).

    Passes register while they run (`watching`); a daemon thread (`start`) looks at the oldest
    every quarter of `limit_s`, kept between 50 ms and 5 s: a stall of the default 60 s ends
    the process 60-65 s after its pass began."""

    def __init__(
        self,
        limit_s: float,
        exit_process: Callable[[int], object] = os._exit,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.limit_s = limit_s
        self._exit_process = exit_process
        self._clock = clock
        self._started: dict[int, float] = {}  # a pass in progress -> when it began
        self._tokens = itertools.count()
        self._lock = threading.Lock()

    @contextlib.contextmanager
    def watching(self) -> Iterator[None]:
        """One pass, in progress for as long as the block runs."""
        with self._lock:
            token = next(self._tokens)
            self._started[token] = self._clock()
        try:
            yield
        finally:
            with self._lock:
                del self._started[token]

    def longest_s(self) -> float:
        """How long the oldest pass in progress has run (0 when none is)."""
        with self._lock:
            oldest = min(self._started.values(), default=None)
        return 0.0 if oldest is None else self._clock() - oldest

    def check(self) -> None:
        """Ends the process if the oldest pass in progress has run past the limit."""
        longest = self.longest_s()
        if longest <= self.limit_s:
            return
        logger.critical(
            "a pass has been in progress for %.0f s (CLIP_STALLED_PASS_S=%g): the device has "
            "stopped without an error. This runner process exits (status %d) so that BentoML "
            "starts a fresh one with a new CUDA context",
            longest,
            self.limit_s,
            EXIT_DEVICE_BROKEN,
        )
        self._exit_process(EXIT_DEVICE_BROKEN)

    def start(self) -> threading.Thread:
        """The watching thread (a daemon: it never holds the process up). It looks at most
        every 5 s and at least every 50 ms, however small the limit."""
        interval = min(max(self.limit_s / 4, 0.05), 5.0)

        def watch() -> None:
            while True:
                time.sleep(interval)
                self.check()

        thread = threading.Thread(target=watch, name="clip-stalled-pass-watch", daemon=True)
        thread.start()
        return thread


def exits_when_device_breaks(
    infer: Callable[[Rows, int], Output],
    device: torch.device,
    exit_process: Callable[[int], object] = os._exit,
    watch: StalledPassWatch | None = None,
) -> Callable[[Rows, int], Output]:
    """`infer(rows, threads)` (one batch on `device`), re-raising its errors while the device
    still works, and ending the process (EXIT_DEVICE_BROKEN) when it no longer does; with a
    `watch`, each batch is a pass it watches for a stall.

    The batch's callers and any others in flight then lose their connection; the API workers
    retry each runner call once and answer 503 if that fails too, until the supervisor's fresh
    runner process is ready.
    """
    watching = watch.watching if watch is not None else contextlib.nullcontext

    def run(rows: Rows, threads: int) -> Output:
        # The check after a failure is watched too: it waits for the device, which may be
        # what stopped.
        with watching():
            try:
                return infer(rows, threads)
            except RuntimeError as exc:
                if device_works(device):
                    raise
                logger.critical(
                    "the %s device no longer works after %s: %s. This runner process exits "
                    "(status %d) so that BentoML starts a fresh one with a new CUDA context",
                    device,
                    type(exc).__name__,
                    exc,
                    EXIT_DEVICE_BROKEN,
                )
                exit_process(EXIT_DEVICE_BROKEN)
                raise  # reached only where `exit_process` returns (the tests' stand-in)

    return run
