"""Whether this host resolves its own name at once, and a warning with the fix where it does not.

BentoML's supervisor (circus's `Arbiter`) calls `socket.getfqdn()` before it starts any worker.
Where the host's name is in no `/etc/hosts` and the DNS server it names does not answer (an
air-gapped machine), that lookup waits out the resolver's timeouts, 10 s or more, at every
`bentoml serve`, before the supervisor's first log line, and nothing in the log says why (the
likely cause of the first GPU run's 33-42-s server starts, BENCHMARKS.md). The lookup happens
before any of this project's code runs in a worker, so it cannot be avoided from here; one API
worker makes the same lookup as it starts, in a thread of its own, and if it is slow says so,
with the fix.
A Docker container has its own name in `/etc/hosts` (Docker writes it).
"""

from __future__ import annotations

import logging
import socket
import threading
import time
from collections.abc import Callable

logger = logging.getLogger(__name__)

# Slower than this is a resolver timing out, not a lookup: /etc/hosts answers in microseconds
# and a reachable DNS server in milliseconds.
SLOW_LOOKUP_S = 1.0


def slow_lookup_warning(name: str, seconds: float) -> str | None:
    """The warning for a lookup of `name` that took `seconds`, or None where that is quick."""
    if seconds < SLOW_LOOKUP_S:
        return None
    return (
        f"resolving this host's own name ({name!r}, socket.getfqdn()) took {seconds:.1f} s: "
        "BentoML's supervisor makes that lookup before it starts any worker, so this server's "
        f"start waited about as long. Add the name to /etc/hosts (`127.0.0.1 {name}`) to start "
        "without that wait"
    )


def timed_lookup(
    lookup: Callable[[], object] = socket.getfqdn, clock: Callable[[], float] = time.monotonic
) -> float:
    """Seconds `lookup` (the supervisor's own) takes."""
    started = clock()
    lookup()
    return clock() - started


def check_host_lookup(lookup: Callable[[], object] = socket.getfqdn) -> None:
    """Time the lookup and log the warning if it is slow; never raises (a check, not a step of
    the start)."""
    try:
        warning = slow_lookup_warning(socket.gethostname(), timed_lookup(lookup))
    except OSError as exc:
        logger.debug("could not time this host's name lookup: %s", exc)
        return
    if warning:
        logger.warning(warning)


def check_host_lookup_in_background(
    lookup: Callable[[], object] = socket.getfqdn,
) -> threading.Thread:
    """`check_host_lookup` in a daemon thread: a lookup that hangs for its 30 s delays nothing,
    not even the process's exit."""
    thread = threading.Thread(
        target=check_host_lookup, args=(lookup,), name="clip-host-lookup", daemon=True
    )
    thread.start()
    return thread
