"""glibc's malloc, set for a server process: freed memory kept for reuse, not handed back to the
operating system after every request.

glibc gives a block of 128 KiB or more its own mapping and unmaps it when freed (the threshold
then rises to that block's size), and hands the top of its heap back once more than twice that
threshold is free there. An API worker handles each request's image in buffers of about a
megabyte (the decoded pixels, their copy, the crop), several requests at once: freed, they went
back to the operating system, and the next request faulted the same pages in again, zeroed. At
the tiny model's seed load that was 310-350 page faults and about 0.6 ms of the API worker's
3.9 ms of CPU per request (BENCHMARKS.md, "Start-up"). Importing torch had hidden it: its import
leaves glibc's thresholds raised, and the API workers no longer import it.

So every server process sets both thresholds once (`mallopt`): blocks above `MMAP_THRESHOLD`
still get their own mapping, returned when freed (a 12-megapixel photo's pixels), and up to
`TRIM_THRESHOLD` of freed memory stays in the heap for the next request. A threshold set in
glibc's own environment variable (`MALLOC_MMAP_THRESHOLD_`, `MALLOC_TRIM_THRESHOLD_`) is the
operator's choice and is left as it is. Elsewhere than glibc (no `mallopt`) nothing changes.
"""

from __future__ import annotations

import ctypes
import os

from clip_runner.config import MIB

# glibc's <malloc.h> parameter numbers.
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 16 * MIB
TRIM_THRESHOLD = 64 * MIB
# Each parameter: (its number, this module's value, glibc's environment variable for it).
THRESHOLDS = (
    (M_MMAP_THRESHOLD, MMAP_THRESHOLD, "MALLOC_MMAP_THRESHOLD_"),
    (M_TRIM_THRESHOLD, TRIM_THRESHOLD, "MALLOC_TRIM_THRESHOLD_"),
)


def reuse_freed_memory() -> list[str]:
    """Set glibc's thresholds in this process, except those its environment sets; returns the
    variables set here (none where the C library has no `mallopt`)."""
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return []
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    return [
        variable
        for parameter, value, variable in THRESHOLDS
        if variable not in os.environ and mallopt(parameter, value) == 1
    ]
