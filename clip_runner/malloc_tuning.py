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
`TRIM_THRESHOLD` of freed memory stays in the heap for the next request. Elsewhere than glibc
(no `mallopt`) nothing changes.
"""

from __future__ import annotations

import ctypes

MIB = 1024 * 1024
# glibc's <malloc.h> parameter numbers.
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 16 * MIB
TRIM_THRESHOLD = 64 * MIB


def reuse_freed_memory() -> bool:
    """Set glibc's thresholds for this process; False where the C library has no `mallopt`."""
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    return bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(
        mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD)
    )
