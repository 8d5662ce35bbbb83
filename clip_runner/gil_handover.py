"""How soon a thread running Python hands the GIL to another thread of its process waiting for
it (CLIP_SWITCH_INTERVAL_MS, Python's `sys.setswitchinterval`).

Each process of the service runs several threads: its event loop, the threads decoding images,
the runner's inference thread. A thread that let go of the GIL for C code (Pillow's decode, a
torch call, a socket) must take it back afterwards, and waits until the thread running Python
lets go by itself or has run for the switch interval. With one thread busy in Python beside it,
a thread decoding the seed's JPEG the runner's way (three hand-overs an image) did 48 instead of
700 images/s on this project's development machine with Python's 5 ms, 472 with 0.2 ms. Served
on that machine's two cores, which are busy either way, 0.2 ms gained as much as it lost
(BENCHMARKS.md), so Python's 5 ms is the default; where cores sit idle while threads wait (a GPU
machine), the GPU run measures 0.2 ms against it.
"""

from __future__ import annotations

import logging
import sys

logger = logging.getLogger(__name__)


def hand_over_gil_after(interval_ms: float, process: str) -> None:
    """Set this process's switch interval, and log it under `process` (its role)."""
    sys.setswitchinterval(interval_ms / 1000)
    logger.info(
        "%s: a thread running Python yields the GIL to a waiting one after %g ms",
        process,
        interval_ms,
    )
