"""The runner's pass layout: what each device gets by default, and settings taking precedence."""

from clip_runner.model.pass_layout import (
    CPU_MAX_BATCH,
    GPU_MAX_BATCH,
    TEXT_BATCH_FACTOR,
    PassLayout,
    pass_layout,
)

CPU_TEXTS = TEXT_BATCH_FACTOR * CPU_MAX_BATCH
GPU_TEXTS = TEXT_BATCH_FACTOR * GPU_MAX_BATCH


def test_cpu_with_several_cores_runs_two_passes_splitting_the_threads():
    assert pass_layout(False, 2, 0, 0) == PassLayout(2, 1, CPU_MAX_BATCH, CPU_TEXTS)
    assert pass_layout(False, 16, 0, 0) == PassLayout(2, 8, CPU_MAX_BATCH, CPU_TEXTS)


def test_one_core_and_gpus_run_one_pass_with_every_thread():
    assert pass_layout(False, 1, 0, 0) == PassLayout(1, 1, CPU_MAX_BATCH, CPU_TEXTS)
    assert pass_layout(True, 16, 0, 0) == PassLayout(1, 16, GPU_MAX_BATCH, GPU_TEXTS)


def test_a_compiled_model_runs_one_pass_at_a_time_unless_told_otherwise():
    assert pass_layout(False, 2, 0, 0, compiled=True) == PassLayout(1, 2, CPU_MAX_BATCH, CPU_TEXTS)
    assert pass_layout(False, 2, 2, 0, compiled=True) == PassLayout(2, 1, CPU_MAX_BATCH, CPU_TEXTS)


def test_settings_take_precedence_and_every_pass_keeps_a_thread():
    assert pass_layout(False, 8, 4, 64) == PassLayout(4, 2, 64, TEXT_BATCH_FACTOR * 64)
    assert pass_layout(False, 8, 4, 64, 100) == PassLayout(4, 2, 64, 100)
    assert pass_layout(True, 16, 0, 0, 512) == PassLayout(1, 16, GPU_MAX_BATCH, 512)
    assert pass_layout(True, 16, 2, 0) == PassLayout(2, 8, GPU_MAX_BATCH, GPU_TEXTS)
    assert pass_layout(True, 1, 4, 0) == PassLayout(4, 1, GPU_MAX_BATCH, GPU_TEXTS)


def test_on_cpu_passes_never_outnumber_the_threads():
    """Each pass is a thread: 4 passes of 1 thread each had run 4 where CLIP_RUNNER_THREADS=1."""
    assert pass_layout(False, 1, 4, 0) == PassLayout(1, 1, CPU_MAX_BATCH, CPU_TEXTS)
    assert pass_layout(False, 2, 3, 0) == PassLayout(2, 1, CPU_MAX_BATCH, CPU_TEXTS)
    assert pass_layout(False, 1, 2, 0, compiled=True) == PassLayout(1, 1, CPU_MAX_BATCH, CPU_TEXTS)
