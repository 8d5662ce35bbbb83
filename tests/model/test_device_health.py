"""A runner whose device broke exits to be restarted; one whose device works passes errors on.

A broken CUDA context cannot be made without a GPU: its stand-in here is `device_works`
answering False. Everything around it is real: a real forward pass that fails, and a real
process that exits with the runner's status.
"""

from __future__ import annotations

import copy
import subprocess
import sys

import numpy as np
import pytest
import torch

from clip_runner.model.device_health import (
    EXIT_DEVICE_BROKEN,
    device_works,
    exits_when_device_breaks,
)
from clip_runner.model.encoding import ClipEncoder
from tests.helpers import REPO_ROOT

CPU = torch.device("cpu")


def test_the_cpu_always_works():
    assert device_works(CPU)


def test_a_failing_pass_on_a_working_device_reaches_its_callers_and_the_process_stays(tiny_clip):
    """A real forward pass that fails (four-channel pixels for a three-channel model): its
    callers get the error (the API answers 503), and nothing exits."""
    encoder = ClipEncoder(copy.deepcopy(tiny_clip.model), tiny_clip.processor, CPU, torch.float32)
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
