"""glibc keeps what a request freed for the next one, once the process has asked it to."""

from __future__ import annotations

import os
import subprocess
import sys

# A request's image buffers, as an API worker has them: several megabyte-sized blocks alive at
# once, then all freed. Prints the page faults the loop took.
REQUESTS = """
import resource, sys
import numpy as np
from clip_runner.malloc_tuning import reuse_freed_memory

if sys.argv[1] == "tuned":
    assert reuse_freed_memory() == ["MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_"]
elif sys.argv[1] == "operator's":
    assert reuse_freed_memory() == []
for _ in range(20):  # the first requests map what later ones reuse
    buffers = [np.ones(1_300_000, np.uint8) for _ in range(4)]
    del buffers
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(200):
    buffers = [np.ones(1_300_000, np.uint8) for _ in range(4)]
    del buffers
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def page_faults(mode: str, **env: str) -> int:
    result = subprocess.run(
        [sys.executable, "-c", REQUESTS, mode],
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, **env},
    )
    return int(result.stdout)


def test_freed_buffers_are_reused_not_faulted_in_again():
    default, tuned = page_faults("default"), page_faults("tuned")
    # glibc's defaults hand the freed blocks back: each loop faults about 1,270 pages again
    assert default > 200 * 1000
    assert tuned < default / 20


def test_thresholds_set_in_glibcs_environment_variables_are_left_alone():
    """An operator's MALLOC_*_THRESHOLD_ wins: here glibc's defaults, asked for explicitly."""
    operators = page_faults(
        "operator's", MALLOC_MMAP_THRESHOLD_="131072", MALLOC_TRIM_THRESHOLD_="131072"
    )
    assert operators > 200 * 1000
