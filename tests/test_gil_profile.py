"""scripts/gil_profile.py: py-spy's samples of a server under load, summarised per role. The
share of time a process held its GIL is the figure that says whether it is the limit, so it is
checked against real processes whose share is known, through py-spy itself."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from scripts import gil_profile

# A parent and two children: one spins in Python all the time, the other half of the time.
# Each stops by itself after LIFETIME_S, and the fixture kills their process group: a child
# left spinning would take a core from every test after it.
LIFETIME_S = 20
SPINNERS = f"""
import multiprocessing, time

END = time.monotonic() + {LIFETIME_S}

def spin():
    while time.monotonic() < END:
        pass

def half():  # 50 ms periods: a busy machine's late wake-ups (a few ms) hardly move the half
    while time.monotonic() < END:
        busy_until = time.perf_counter() + 0.05
        while time.perf_counter() < busy_until:
            pass
        time.sleep(0.05)

if __name__ == "__main__":
    children = [multiprocessing.Process(target=f) for f in (spin, half)]
    for child in children:
        child.start()
    print(*(child.pid for child in children), flush=True)
    for child in children:
        child.join()
"""


@pytest.fixture
def spinners(tmp_path):
    script = tmp_path / "spinners.py"
    script.write_text(SPINNERS)
    parent = subprocess.Popen(
        [sys.executable, str(script)], stdout=subprocess.PIPE, text=True, start_new_session=True
    )
    try:
        spinning, halving = (int(pid) for pid in parent.stdout.readline().split())
        yield parent.pid, spinning, halving
    finally:
        os.killpg(parent.pid, signal.SIGKILL)  # the children are in the parent's group
        parent.wait()


def test_py_spy_measures_the_share_of_time_each_process_holds_its_gil(spinners, tmp_path):
    parent, spinning, halving = spinners
    time.sleep(0.5)  # both loops running
    output = tmp_path / "stacks.txt"
    spy = gil_profile.start(parent, 3, output, {min(os.sched_getaffinity(0))})
    roles = {parent: "server", spinning: "runner", halving: "api"}
    profile = gil_profile.finish(spy, output, 3, roles)
    assert profile["runner"]["gil_held_share"][0] >= 0.85
    assert 0.3 <= profile["api"]["gil_held_share"][0] <= 0.7
    assert profile.get("server", {}).get("gil_held_share", [0])[0] <= 0.05  # asleep
    assert next(iter(profile["runner"]["self"])).startswith("spin (")
    assert profile["runner"]["own_code"] == {}  # no frame of this project's code


RUNNER = (
    'process 1:"bentoml serve";process 2:"worker clip_runner";main (x/run.py:5);'
    "encode_jpegs (clip_runner/model/runner.py:200)"
)
API = (
    'process 1:"bentoml serve";process 3:"worker service";main (_bentoml_impl/worker/service.py:2)'
)
DECODE, LOAD = "decode (clip_runner/model/device_decode.py", "load (PIL/ImageFile.py"
FORWARD = "forward (clip_runner/model/encoding.py:9)"
RAW = "\n".join(
    [
        f"{RUNNER};{DECODE}:80);{LOAD}:300) 30",
        f"{RUNNER};{DECODE}:81);{LOAD}:301) 20",
        f"{RUNNER};{FORWARD};{FORWARD} 50",
        f"{API};invoke (service.py:40);loads (json/decoder.py:3) 10",
        'process 1:"bentoml serve";process 4:"gone";main (x/run.py:5) 5',
    ]
)


def test_the_summary_gives_each_role_its_processes_shares_and_functions():
    profile = gil_profile.summary(RAW, seconds=2, roles={1: "server", 2: "runner", 3: "api"})
    assert set(profile) == {"runner", "api", "exited"}  # pid 4 restarted meanwhile
    runner = profile["runner"]
    assert runner["processes"] == 1 and runner["gil_held_share"] == [0.5]  # 100 of 200 ticks
    # A function's lines are counted together; innermost frames by share of the role's samples.
    assert runner["self"] == {
        "forward (clip_runner/model/encoding.py)": 0.5,
        "load (PIL/ImageFile.py)": 0.5,
    }
    # The innermost of the project's frames, whatever called it (encode_jpegs) or it called.
    assert runner["own_code"] == {
        "forward (clip_runner/model/encoding.py)": 0.5,
        "decode (clip_runner/model/device_decode.py)": 0.5,
    }
    # service.py at the top level is the project's; BentoML's worker module of that name is not.
    assert profile["api"]["own_code"] == {"invoke (service.py)": 1.0}
    assert profile["api"]["gil_held_share"] == [0.05]
