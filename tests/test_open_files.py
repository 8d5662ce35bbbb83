"""The open-file limit: raised to the hard limit, in the process and the ones it starts."""

from __future__ import annotations

import resource

from tests.helpers import python_output

PROBE = """
import resource
from clip_runner.open_files import raise_open_file_limit
print(raise_open_file_limit(), *resource.getrlimit(resource.RLIMIT_NOFILE))
"""


def test_a_low_soft_limit_is_raised_to_the_hard_one():
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    low = 256

    def start_low() -> None:  # as a container's 1024, lower still
        resource.setrlimit(resource.RLIMIT_NOFILE, (low, hard))

    said = python_output(PROBE, preexec_fn=start_low).split()
    expected = hard if hard != resource.RLIM_INFINITY else 1_048_576
    assert [int(value) for value in said] == [expected, expected, hard]
    assert expected > low and soft <= expected
