"""The garbage collector, set for a long-running server process once it has loaded what it keeps.

A process that imported torch, transformers and BentoML tracks about 500,000 objects, and a full
(oldest-generation) collection walks all of them: 250-400 ms on this project's development
machine, during which the process does nothing else. Under load the runner ran one
about every 30 s, and every request in flight waited for it (BENCHMARKS.md).

So, once loaded:
- everything alive is frozen (`gc.freeze`): kept out of every later collection, which then walks
  only what was created since;
- young collections run after 10,000 net new container objects instead of 700. Under load each
  request keeps a few hundred objects alive for tens of ms; at 700 a collection ran every few
  requests, found them still alive and promoted them, so they reached the oldest generation and
  their cycles waited for its costly collections. The API workers' collector CPU per request
  fell from 0.08-0.17 to 0.01-0.03 ms (BENCHMARKS.md); the extra memory is at most that many
  small objects.
"""

from __future__ import annotations

import gc

YOUNG_GENERATION_THRESHOLD = 10_000


def settle_after_loading() -> int:
    """Collect, freeze what is alive, raise the young generation's threshold; returns how many
    objects are now frozen. Call once, when the process has loaded what it keeps."""
    gc.collect()
    gc.freeze()
    _, middle, oldest = gc.get_threshold()
    gc.set_threshold(YOUNG_GENERATION_THRESHOLD, middle, oldest)
    return gc.get_freeze_count()
