"""Runner workers go round the machine's GPUs, each process seeing only its own."""

from __future__ import annotations

import pytest

from clip_runner.model.gpu_placement import place_worker, worker_gpu


@pytest.mark.parametrize(
    ("visible", "gpus", "expected"),
    [
        (None, 4, ["0", "1", "2", "3", "0", "1", "2", "3"]),  # unset: every GPU, by index
        ("2,3", 2, ["2", "3", "2", "3", "2", "3", "2", "3"]),  # the user's own list
        ("GPU-a1, GPU-b2", 2, ["GPU-a1", "GPU-b2"] * 4),  # UUIDs; spaces ignored
        ("5,7,9", 2, ["5", "7"] * 4),  # CUDA stopped at the third (an invalid entry)
    ],
)
def test_workers_go_round_the_usable_gpus_in_turn(visible, gpus, expected):
    assert [worker_gpu(visible, gpus, worker) for worker in range(1, 9)] == expected


@pytest.mark.parametrize(
    ("visible", "gpus", "worker"),
    [
        (None, 0, 1),  # a CPU machine
        (None, 1, 2),  # one GPU: every worker shares it, as BentoML would place them
        ("3", 1, 1),
        (None, 4, None),  # not a BentoML worker (a script, a test)
        (None, 4, 0),
    ],
)
def test_nothing_is_chosen_without_several_gpus_and_a_worker(visible, gpus, worker):
    assert worker_gpu(visible, gpus, worker) is None


def test_a_placed_worker_sees_its_gpu_alone():
    environ = {"CUDA_VISIBLE_DEVICES": "4,5,6", "OTHER": "x"}
    assert place_worker(environ, 3, 2) == "5"
    assert environ == {"CUDA_VISIBLE_DEVICES": "5", "OTHER": "x"}
    unset: dict[str, str] = {}
    assert place_worker(unset, 2, 2) == "1"
    assert unset == {"CUDA_VISIBLE_DEVICES": "1"}
    one_gpu = {"CUDA_VISIBLE_DEVICES": "4"}
    assert place_worker(one_gpu, 1, 2) is None
    assert one_gpu == {"CUDA_VISIBLE_DEVICES": "4"}
    cpu: dict[str, str] = {}
    assert place_worker(cpu, 0, 1) is None
    assert cpu == {}
