"""As many open files as the machine allows this process, for every worker it starts.

Each connection holds a file descriptor until it ends (a silent one for the header deadline, an
idle keep-alive one for 5 s), and processes start with a soft limit that is often 1,024 (Docker
25 and later give containers 1024:524288): 1,100 connections that sent nothing filled an API
worker's 1,024, and every good request failed to connect until their deadline closed them. The
hard limit is what the machine's administrator allows; the soft one, raised to it, is ours to set.
"""

from __future__ import annotations

import logging
import resource

logger = logging.getLogger("clip_runner")

# Where the hard limit is "unlimited" (a soft limit cannot be; Linux caps it at nr_open).
MOST_OPEN_FILES = 1_048_576


def raise_open_file_limit() -> int:
    """Raise this process's soft RLIMIT_NOFILE to its hard limit; the soft limit it now has."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = MOST_OPEN_FILES if hard == resource.RLIM_INFINITY else hard
    if soft != resource.RLIM_INFINITY and soft < wanted:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
        except (ValueError, OSError) as error:  # a platform that refuses: keep what there is
            logger.warning("could not raise the open-file limit from %d: %s", soft, error)
            return soft
        return wanted
    return soft
