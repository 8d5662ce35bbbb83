"""Answers brought to the host, and how a thread waits for the GPU first (asleep by default)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from clip_runner.model import device_wait
from clip_runner.model.device_wait import to_device, to_host, wait_for_queued_work


@pytest.mark.parametrize("spin", [False, True])
def test_an_answer_is_a_host_copy_that_later_writes_do_not_change(spin):
    rows = torch.arange(12, dtype=torch.float32).view(4, 3)
    copied = to_host(rows[1:3], spin)  # a slice, as the graphs' output buffers are read
    assert isinstance(copied, np.ndarray) and copied.dtype == np.float32
    np.testing.assert_array_equal(copied, rows[1:3].numpy())
    rows.fill_(-1.0)  # the next replay overwrites its buffer
    np.testing.assert_array_equal(copied, [[3.0, 4.0, 5.0], [6.0, 7.0, 8.0]])


class RecordingStream:
    """Stands in for a CUDA stream, which cannot exist without a GPU."""

    def __init__(self) -> None:
        self.synchronized = 0

    def synchronize(self) -> None:
        self.synchronized += 1


class RecordingEvent:
    """Stands in for `torch.cuda.Event`: what it was created with and what was done with it."""

    made: list[RecordingEvent] = []

    def __init__(self, blocking: bool = False) -> None:
        self.blocking = blocking
        self.recorded_on: RecordingStream | None = None
        self.synchronized = False
        RecordingEvent.made.append(self)

    def record(self, stream: RecordingStream) -> None:
        self.recorded_on = stream

    def synchronize(self) -> None:
        assert self.recorded_on is not None, "waited on an event never recorded"
        self.synchronized = True


@pytest.fixture
def fake_cuda(monkeypatch) -> RecordingStream:
    stream = RecordingStream()
    RecordingEvent.made = []
    monkeypatch.setattr(device_wait.torch.cuda, "current_stream", lambda device: stream)
    monkeypatch.setattr(device_wait.torch.cuda, "Event", RecordingEvent)
    return stream


def test_a_thread_waits_for_the_gpu_asleep_on_a_blocking_event(fake_cuda):
    """CUDA's default wait polls the device from the waiting thread (a core at 100%); an event
    created with blocking sync lets it sleep. The wait covers the stream's queued work."""
    wait_for_queued_work(torch.device("cuda"))
    (event,) = RecordingEvent.made
    assert event.blocking and event.recorded_on is fake_cuda and event.synchronized
    assert fake_cuda.synchronized == 0  # not the stream's own (polling) synchronize


def test_spinning_polls_an_event_not_the_stream(fake_cuda):
    """Polling too waits only for the work queued before it: a stream's own synchronize would
    also wait for what other threads queue on it meanwhile (another pass, a JPEG batch)."""
    wait_for_queued_work(torch.device("cuda"), spin=True)
    (event,) = RecordingEvent.made
    assert not event.blocking and event.recorded_on is fake_cuda and event.synchronized
    assert fake_cuda.synchronized == 0


class RecordingDeviceRows:
    """Stands in for answer rows on a GPU that is not there: how they were brought back, and
    how many events had been made when each copy was asked for."""

    device = torch.device("cuda")

    def __init__(self, rows: torch.Tensor, pinned_memory: bool = True) -> None:
        self.rows = rows
        self.pinned_memory = pinned_memory
        self.copies: list[tuple[bool, int]] = []
        self.host: list[torch.Tensor] = []  # what each copy gave: on a GPU, a pinned block

    def to(self, device: str, non_blocking: bool = False, copy: bool = False) -> torch.Tensor:
        assert device == "cpu"
        self.copies.append((non_blocking, len(RecordingEvent.made)))
        if non_blocking and not self.pinned_memory:
            raise RuntimeError("CUDA error: out of memory (cudaHostAlloc)")
        self.host.append(self.rows.clone())
        return self.host[-1]


@pytest.mark.parametrize("spin", [False, True])
def test_answers_from_the_gpu_are_queued_into_host_memory_then_waited_for_once(fake_cuda, spin):
    rows = RecordingDeviceRows(torch.arange(6, dtype=torch.float32).view(2, 3))
    np.testing.assert_array_equal(to_host(rows, spin), rows.rows.numpy())
    assert rows.copies == [(True, 0)]  # queued before the one event, which covers it
    (event,) = RecordingEvent.made
    assert event.blocking is not spin and event.synchronized
    assert fake_cuda.synchronized == 0


def test_an_answer_from_the_gpu_holds_no_pinned_block(fake_cuda):
    """The queued copy lands in a pinned block of torch's pool, rounded up to a power of two;
    a cached row viewing it would keep the whole block page-locked. The answer is memory of
    its own."""
    rows = RecordingDeviceRows(torch.arange(6, dtype=torch.float32).view(2, 3))
    answer = to_host(rows)
    (pinned,) = rows.host
    assert not np.shares_memory(answer, pinned.numpy())
    np.testing.assert_array_equal(answer, pinned.numpy())


def test_without_pinned_memory_the_answer_is_copied_after_the_wait(fake_cuda):
    rows = RecordingDeviceRows(torch.ones(2, 3), pinned_memory=False)
    np.testing.assert_array_equal(to_host(rows), np.ones((2, 3), dtype=np.float32))
    assert rows.copies == [(True, 0), (False, 1)]  # the blocking copy after the event's wait
    (event,) = RecordingEvent.made
    assert event.blocking and event.synchronized


def test_on_cpu_there_is_nothing_to_wait_for(fake_cuda):
    for spin in (False, True):
        wait_for_queued_work(torch.device("cpu"), spin)
        to_host(torch.ones(2, 2), spin)
    assert fake_cuda.synchronized == 0 and RecordingEvent.made == []


class RecordingHostTensor:
    """Stands in for a host tensor copied to a GPU that is not there: how it was copied."""

    def __init__(self) -> None:
        self.copies: list[tuple[torch.device, bool]] = []

    def to(self, device: torch.device, non_blocking: bool = False) -> RecordingHostTensor:
        self.copies.append((device, non_blocking))
        return self


def test_a_copy_to_the_gpu_is_queued_not_waited_for(fake_cuda):
    """torch's blocking copy waits (polling) for everything queued on the stream before it."""
    host = RecordingHostTensor()
    to_device(host, torch.device("cuda"))
    assert host.copies == [(torch.device("cuda"), True)]
    assert fake_cuda.synchronized == 0 and RecordingEvent.made == []


def test_on_cpu_a_copy_to_the_device_is_the_tensor_itself():
    host = torch.arange(6).view(2, 3)
    assert to_device(host, torch.device("cpu")) is host
