"""A soak of mixed good and hostile requests: zero 5xx, every good answer right, RSS steady.

`SOAK_REQUESTS` (default 1500) sets the size; the figures (latencies, `/ping` latency under load,
RSS) print with `pytest -s` and are recorded in the README; timings are reported, not asserted.
"""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import Callable

import httpx
import numpy as np

from tests.helpers import SEED_CLASSES, as_base64, photo_like
from tests.reference import reference_probabilities
from tests.soak import SoakRequest, soak
from tests.test_hostile_requests import BAD_BODIES, REFUSED_IMAGES

CLASS_SETS = [
    SEED_CLASSES,
    [["cat", 1], ["dog", 0]],
    [["red car", 0], ["blue car", 1], ["green tree", 0], ["a house", 0], ["the sky", 1]],
]


def good_requests(tiny_clip) -> list[SoakRequest]:
    requests = []
    for seed in range(8):
        pictures = [photo_like(80 + 13 * seed, 60 + 7 * seed, seed=500 + seed)]
        if seed % 3 == 0:
            pictures.append(photo_like(120, 90, seed=900 + seed))
        classes = CLASS_SETS[seed % len(CLASS_SETS)]
        names = [name for name, _ in classes]
        reference = reference_probabilities(
            tiny_clip, pictures, [f"a photo of a {n}" for n in names]
        )
        body = {"images": [as_base64(p) for p in pictures], "classes": classes}

        def check(response: httpx.Response, reference=reference) -> bool:
            if response.status_code != 200:
                return False
            for prediction, row in zip(response.json(), reference, strict=True):
                indices, _, probabilities = prediction["prompts"]
                expected = np.argsort(-row, kind="stable")[: len(indices)]
                if list(indices) != list(expected):
                    return False
                if not np.allclose(probabilities, row[indices], atol=1e-5):
                    return False
            return True

        requests.append(SoakRequest(json.dumps(body).encode(), "application/json", check, True))
    return requests


def bad_requests() -> list[SoakRequest]:
    def refused(response: httpx.Response) -> bool:
        return 400 <= response.status_code < 500 and "error" in response.json()

    def refused_with(status: int) -> Callable[[httpx.Response], bool]:
        return lambda response: response.status_code == status and refused(response)

    good_image = as_base64(photo_like(30, 30, seed=1))
    requests = [
        SoakRequest(body, "application/json", refused_with(status), False)
        for body, status, _ in BAD_BODIES.values()
    ]
    bodies = [
        json.dumps({"images": [good_image, image], "classes": [["a", 1]]}).encode()
        for name, image in REFUSED_IMAGES.items()
        if name != "pixel bomb"
    ]
    requests += [SoakRequest(body, "application/json", refused, False) for body in bodies]
    requests.append(SoakRequest(b'{"images": ["x"]}', "text/plain", refused, False))
    return requests


def test_soak_mixed_traffic(served, tiny_clip):
    pool = good_requests(tiny_clip) * 5 + bad_requests()  # about 60% good, 40% hostile
    count = int(os.environ.get("SOAK_REQUESTS", "1500"))
    report = asyncio.run(soak(served.url, served.process.pid, pool, count, concurrency=16))
    summary = report.summary()
    print("\nsoak:", json.dumps(summary))
    assert report.requests == count
    assert report.server_errors == 0, summary
    assert report.wrong_answers == 0, summary
    assert report.good_requests > 0 and report.bad_requests > 0
    assert summary["pings_not_200"] == 0, summary
    # Reported, not a target: the API worker grows while warming up (about 350 MB over the first
    # 4000 requests, then flat; see README). This bound only catches a gross leak.
    assert summary["rss_growth_mb"] < 400, summary
