"""The runner's start-up timing: each step's duration, and the time its process ran before."""

from __future__ import annotations

import os
import time

import pytest

from clip_runner.model.startup_phases import (
    StartupPhases,
    seconds_since_process_start,
    startup_seconds,
)
from tests.helpers import FakeClock


def fake_proc(tmp_path, uptime: float, started_ticks: int, command: str = "python"):
    (tmp_path / "self").mkdir()
    (tmp_path / "uptime").write_text(f"{uptime} 1234.5\n")
    # The fields after the command name: state, then 18 more before starttime (field 22).
    after = ["S", *[str(n) for n in range(3, 21)], str(started_ticks), "999"]
    (tmp_path / "self" / "stat").write_text(f"4242 ({command}) {' '.join(after)}\n")
    return tmp_path


def test_process_age_from_proc_even_with_spaces_and_parentheses_in_the_command(tmp_path):
    ticks = os.sysconf("SC_CLK_TCK")
    proc = fake_proc(tmp_path, uptime=500.0, started_ticks=int(480 * ticks), command="a) (b c")
    assert seconds_since_process_start(proc) == 20.0


def test_no_age_where_proc_does_not_say(tmp_path):
    assert seconds_since_process_start(tmp_path / "missing") is None
    (tmp_path / "uptime").write_text("garbage\n")
    assert seconds_since_process_start(tmp_path) is None


def test_this_process_ages_with_the_clock():
    # Bracketed by the clock (a busy machine may oversleep or pause between the reads): the
    # age advances by no less than the inner interval and no more than the outer one, give or
    # take /proc/uptime's 10 ms steps.
    outer_start = time.monotonic()
    first = seconds_since_process_start()
    inner_start = time.monotonic()
    time.sleep(0.2)
    inner_end = time.monotonic()
    second = seconds_since_process_start()
    outer_end = time.monotonic()
    assert first is not None and first > 0
    step = 0.011
    assert inner_end - inner_start - step <= second - first <= outer_end - outer_start + step


@pytest.fixture
def process_age(monkeypatch):
    """Sets what /proc says of this process's age (None: /proc says nothing)."""

    def set_age(seconds: float | None) -> None:
        monkeypatch.setattr(
            "clip_runner.model.startup_phases.seconds_since_process_start", lambda: seconds
        )

    return set_age


def test_each_step_is_timed_and_the_line_adds_the_time_before(process_age):
    process_age(2.04)
    clock = FakeClock()
    phases = StartupPhases(clock)
    with phases.phase("imports"):
        clock.now += 3.0
    clock.now += 0.5  # between steps: counted in the total, in no step
    with phases.phase("warm-up"):
        clock.now += 0.26
    assert [name for name, _ in phases.steps] == ["imports", "warm-up"]
    assert [seconds for _, seconds in phases.steps] == pytest.approx([3.0, 0.26])
    assert phases.line() == (
        "start-up: 5.8 s since the process began (before the runner: 2.0; imports 3.0, warm-up 0.3)"
    )


def test_a_failing_step_is_still_timed():
    clock = FakeClock()
    phases = StartupPhases(clock)
    try:
        with phases.phase("model read"):
            clock.now += 1.5
            raise RuntimeError("no model")
    except RuntimeError:
        pass
    assert phases.steps == [("model read", 1.5)]


def test_without_proc_the_line_counts_from_the_first_step(process_age):
    process_age(None)
    clock = FakeClock()
    phases = StartupPhases(clock)
    with phases.phase("imports"):
        clock.now += 4.0
    assert phases.line() == "start-up: 4.0 s since its first step (imports 4.0)"


@pytest.mark.parametrize(
    ("before", "total"), [(2.0, {"total": 6.9, "before the runner": 2.0}), (None, {"total": 4.9})]
)
def test_the_lines_figures_read_back(process_age, before, total):
    """What scripts/startup_bench.py compares: the total, the time before, and every step, from
    the line as the runner logs it (its logger's prefix in front), with or without /proc."""
    process_age(before)
    clock = FakeClock()
    phases = StartupPhases(clock)
    with phases.phase("torch and transformers imported"):
        clock.now += 3.71
    with phases.phase("CUDA graphs"):
        clock.now += 1.2
    figures = startup_seconds(f"[service:clip_runner:1] runner {phases.line()}")
    assert figures == {**total, "torch and transformers imported": 3.7, "CUDA graphs": 1.2}


def test_a_line_without_steps_or_without_figures():
    no_steps = "start-up: 0.4 s since the process began (before the runner: 0.4; )"
    assert startup_seconds(no_steps) == {"total": 0.4, "before the runner": 0.4}
    assert startup_seconds("runner ready") == {}
