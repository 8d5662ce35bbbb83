"""A batch the device has no memory for is encoded in halves; a runner whose device broke exits
to be restarted; one whose device works passes errors on.

Neither a full GPU nor a broken CUDA context can be made without a GPU: their stand-ins here
are an encoder that refuses passes above a row count and `device_works` answering False.
Everything around them is real: the tiny model's forward passes, a real failing pass, and a
real process that exits with the runner's status.
"""

from __future__ import annotations

import copy
import subprocess
import sys
import threading
import weakref

import numpy as np
import pytest
import torch

from clip_runner.model import device_health
from clip_runner.model.device_health import (
    EXIT_DEVICE_BROKEN,
    StalledPassWatch,
    device_works,
    exits_when_device_breaks,
    halves_when_out_of_memory,
)
from clip_runner.model.encoding import ClipEncoder
from tests.helpers import REPO_ROOT, FakeClock

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def encoder(tiny_clip) -> ClipEncoder:
    return ClipEncoder(copy.deepcopy(tiny_clip.model), tiny_clip.processor, CPU, torch.float32)


def memory_for(rows: int, encode, passes: list[int]):
    """`encode` on a device with memory for at most `rows` rows at once; records each pass."""

    def limited(batch):
        passes.append(len(batch))
        if len(batch) > rows:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 96.00 MiB")
        return encode(batch)

    return limited


def test_a_batch_the_device_has_no_memory_for_is_encoded_in_halves_in_order(encoder):
    rng = np.random.default_rng(4)
    pixels = rng.integers(0, 256, (7, 224, 224, 3), dtype=np.uint8)
    passes: list[int] = []
    halved = halves_when_out_of_memory(memory_for(2, encoder.encode_images, passes))(pixels)
    assert passes == [7, 3, 1, 2, 4, 2, 2]  # 7 -> 3 + 4 -> (1 + 2) + (2 + 2)
    np.testing.assert_allclose(halved, encoder.encode_images(pixels), atol=1e-6)
    texts = [f"a photo of a thing number {number}" for number in range(5)]
    passes.clear()
    halved = halves_when_out_of_memory(memory_for(3, encoder.encode_texts, passes))(texts)
    assert passes == [5, 2, 3]
    np.testing.assert_allclose(halved, encoder.encode_texts(texts), atol=1e-6)


def test_the_memory_of_the_pass_that_ran_out_is_free_before_the_halves_run():
    """The error's traceback holds the failed pass's frame, and the tensors that filled the
    memory: the halves must not run while it is alive."""
    made: list[weakref.ref] = []
    alive_at_each_pass: list[list[bool]] = []

    def encode(rows: list[int]) -> np.ndarray:
        activations = torch.empty((len(rows), 1000))  # what a pass holds on the device
        alive_at_each_pass.append([ref() is not None for ref in made])
        made.append(weakref.ref(activations))
        if len(rows) > 1:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 96.00 MiB")
        return np.zeros((1, 4), np.float32)

    assert halves_when_out_of_memory(encode)([1, 2]).shape == (2, 4)
    assert alive_at_each_pass == [[], [False], [False, False]]


def test_a_single_row_the_device_has_no_memory_for_still_fails(encoder):
    passes: list[int] = []
    encode = halves_when_out_of_memory(memory_for(0, encoder.encode_texts, passes))
    with pytest.raises(torch.cuda.OutOfMemoryError):
        encode(["a photo of a cat", "a photo of a dog"])
    assert passes == [2, 1]  # the first half alone already failed


def test_the_cpu_always_works():
    assert device_works(CPU)


def test_a_failing_pass_on_a_working_device_reaches_its_callers_and_the_process_stays(encoder):
    """A real forward pass that fails (four-channel pixels for a three-channel model): its
    callers get the error (the API answers 503), and nothing exits."""
    exits: list[int] = []
    encode = exits_when_device_breaks(
        lambda pixels, _threads: encoder.encode_pixels(pixels), CPU, exits.append
    )
    good = torch.zeros((2, 3, 224, 224), dtype=torch.uint8)
    np.testing.assert_array_equal(encode(good, 1), encoder.encode_pixels(good))
    with pytest.raises(RuntimeError):
        encode(torch.zeros((2, 4, 224, 224), dtype=torch.uint8), 1)
    assert exits == []


def test_an_error_that_broke_the_device_ends_the_process_with_its_status():
    """The real exit, in a process of its own: the batch's error, the device found broken (the
    stand-in), the log line that says why, and the status BentoML's supervisor sees."""
    script = """
import logging
from clip_runner.model import device_health

logging.basicConfig()
device_health.device_works = lambda device: False  # the stand-in for a broken CUDA context

def failing_pass(rows, threads):
    raise RuntimeError("CUDA error: an illegal memory access was encountered")

import torch
device_health.exits_when_device_breaks(failing_pass, torch.device("cpu"))([1], 1)
print("still running")
"""
    done = subprocess.run(
        [sys.executable, "-c", script], cwd=REPO_ROOT, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == EXIT_DEVICE_BROKEN, done.stderr
    assert "still running" not in done.stdout
    assert "no longer works after RuntimeError: CUDA error: an illegal memory access" in (
        done.stderr
    )
    assert "BentoML starts a fresh one" in done.stderr


def test_a_pass_in_progress_past_the_limit_ends_the_process_and_finished_ones_never_do():
    clock, exits = FakeClock(), []
    watch = StalledPassWatch(60, exit_process=exits.append, clock=clock)
    with watch.watching():  # a pass that ends in time
        clock.now += 59
        watch.check()
    clock.now += 3600  # nothing in progress: an idle runner is not a stalled one
    watch.check()
    assert exits == [] and watch.longest_s() == 0
    with watch.watching():
        clock.now += 30
        with watch.watching():  # a second pass, begun later: the oldest counts
            clock.now += 30
            watch.check()
            assert exits == [] and watch.longest_s() == 60
            clock.now += 0.5
            watch.check()
    assert exits == [EXIT_DEVICE_BROKEN] and watch.longest_s() == 0


def test_each_batch_of_a_watched_encoder_is_a_pass_in_progress_while_it_runs(encoder):
    clock, exits = FakeClock(), []
    watch = StalledPassWatch(60, exit_process=exits.append, clock=clock)
    seen: list[float] = []

    def stalling_pass(rows, threads):
        clock.now += 61
        seen.append(watch.longest_s())
        watch.check()
        return encoder.encode_pixels(rows)

    encode = exits_when_device_breaks(stalling_pass, CPU, exit_process=exits.append, watch=watch)
    encode(torch.zeros((1, 3, 224, 224), dtype=torch.uint8), 1)
    assert seen == [61] and exits == [EXIT_DEVICE_BROKEN] and watch.longest_s() == 0
    with pytest.raises(RuntimeError):  # a failing pass leaves the watch too
        encode(torch.zeros((1, 4, 224, 224), dtype=torch.uint8), 1)
    assert watch.longest_s() == 0


def test_a_stalled_pass_ends_the_process_with_the_broken_devices_status():
    """The real watching thread and exit, in a process of its own: a pass that never ends (a
    stand-in for a kernel that never finishes) with a limit of 0.4 s."""
    script = """
import logging
import threading
import torch
from clip_runner.model import device_health

logging.basicConfig()
watch = device_health.StalledPassWatch(0.4)
watch.start()

def stalled_pass(rows, threads):
    threading.Event().wait()  # as a thread waiting for a device that stopped

device_health.exits_when_device_breaks(stalled_pass, torch.device("cpu"), watch=watch)([1], 1)
print("still running")
"""
    done = subprocess.run(
        [sys.executable, "-c", script], cwd=REPO_ROOT, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == EXIT_DEVICE_BROKEN, done.stderr
    assert "still running" not in done.stdout
    assert "(CLIP_STALLED_PASS_S=0.4): the device has stopped without an error" in done.stderr


def test_the_watching_thread_is_a_daemon_named_for_what_it_does():
    thread = StalledPassWatch(3600, exit_process=lambda status: None).start()
    assert thread.daemon and thread.name == "clip-stalled-pass-watch" and thread.is_alive()
    assert thread in threading.enumerate()


def test_the_device_check_after_a_failed_pass_is_watched_too(monkeypatch):
    """After a pass fails, the check that the device still works waits for it: where that wait
    never ends (the device stopped), the watch still ends the process."""
    clock, exits = FakeClock(), []
    watch = StalledPassWatch(60, exit_process=exits.append, clock=clock)

    def stalled_check(device: torch.device) -> bool:
        clock.now += 61
        watch.check()  # as the watching thread would, while the check waits
        return True

    def failing_pass(rows, threads):
        raise RuntimeError("nvjpegDecode failed: unsupported JPEG")

    monkeypatch.setattr(device_health, "device_works", stalled_check)
    encode = exits_when_device_breaks(failing_pass, CPU, exit_process=exits.append, watch=watch)
    with pytest.raises(RuntimeError, match="unsupported JPEG"):
        encode([1], 1)
    assert exits == [EXIT_DEVICE_BROKEN] and watch.longest_s() == 0
