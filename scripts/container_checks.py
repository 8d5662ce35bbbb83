"""Black-box checks of a running CLIP server the way SageMaker uses it: /ping, then /invocations.

    python scripts/container_checks.py http://127.0.0.1:8080 [--ready-timeout 300]
        [--expect-model model-dir:/opt/ml/model] [--expect-embedding '[0.1, ...]']

Used by `scripts/container_test.sh` twice: from the host against the container on host
networking, and piped into the container's own Python (`docker exec -i C python - URL`) when the
container has no network at all. So it needs only what the image has: httpx, Pillow, numpy.
Prints one JSON line of figures; exits non-zero with the reason on the first failed check.
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import sys
import time

import httpx
import numpy as np
from PIL import Image

SEED_CLASSES = [["person", 1], ["woman", 1], ["man", 1], ["cat", 0], ["dog", 0], ["car", 0]]
PING_BUDGET_S = 2.0  # SageMaker fails a ping that takes longer
EMBEDDING_TEXT = "a photo of a cat"


class CheckFailed(Exception):
    """One check's failure, in words."""


def expect(condition: bool, message: str) -> None:
    if not condition:
        raise CheckFailed(message)


def synthetic_photo(width: int, height: int, seed: int) -> Image.Image:
    """Smooth gradients plus noise: compresses like a photo, differs per seed."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    phase = rng.uniform(0, 6.3, size=3)
    channels = [127 + 120 * np.sin(x * 0.01 * (c + 1) + y * 0.007 + phase[c]) for c in range(3)]
    pixels = np.stack(channels, axis=-1) + rng.normal(0, 10, size=(height, width, 3))
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8), "RGB")


def encoded(image: Image.Image, fmt: str) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt)
    return buffer.getvalue()


def wait_until_ready(client: httpx.Client, timeout_s: float) -> float:
    """Seconds until /ping first answered 200 (connection refusals count as not ready)."""
    started = time.monotonic()
    while time.monotonic() - started < timeout_s:
        try:
            if client.get("/ping", timeout=PING_BUDGET_S).status_code == 200:
                return time.monotonic() - started
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise CheckFailed(f"/ping did not answer 200 within {timeout_s:.0f} s")


def check_ping(client: httpx.Client, count: int = 10) -> float:
    """Every ping: 200, empty body, under SageMaker's 2 s. Returns the slowest, in ms."""
    slowest = 0.0
    for _ in range(count):
        started = time.monotonic()
        response = client.get("/ping", timeout=PING_BUDGET_S)
        slowest = max(slowest, time.monotonic() - started)
        expect(response.status_code == 200, f"/ping answered {response.status_code}")
        expect(response.content == b"", f"/ping body is not empty: {response.content[:80]!r}")
    return slowest * 1000


def check_seed_request(client: httpx.Client) -> float:
    """The original's request: a large JPEG as base64 and an RGBA PNG as a data: URI."""
    jpeg = base64.b64encode(encoded(synthetic_photo(1834, 2750, 1), "JPEG")).decode()
    rgba = synthetic_photo(320, 240, 2).convert("RGBA")
    png = "data:image/png;base64," + base64.b64encode(encoded(rgba, "PNG")).decode()
    body = {"images": [jpeg, png], "classes": SEED_CLASSES}
    started = time.monotonic()
    response = client.post("/invocations", json=body, timeout=60)
    elapsed_ms = (time.monotonic() - started) * 1000
    expect(response.status_code == 200, f"/invocations: {response.status_code} {response.text}")
    answers = response.json()
    expect(isinstance(answers, list) and len(answers) == 2, f"not one answer per image: {answers}")
    for answer in answers:
        order, names, probabilities = answer["prompts"]  # the top 3 of the six classes
        expect(len(set(order)) == 3 and set(order) <= set(range(6)), f"bad indices: {order}")
        expect(names == [SEED_CLASSES[i][0] for i in order], f"names out of order: {answer}")
        expect(0 < sum(probabilities) <= 1 + 1e-5, f"probabilities out of range: {answer}")
        expect(probabilities == sorted(probabilities, reverse=True), f"not sorted: {answer}")
        top_flags = [
            SEED_CLASSES[i][1]
            for i, p in zip(order, probabilities, strict=True)
            if probabilities[0] - p <= 0.02 + 1e-6
        ]
        expect(answer["classification"] == int(any(top_flags)), f"wrong flag: {answer}")
        expect(answer["confidence"] == probabilities[0], f"confidence is not the top: {answer}")
    return elapsed_ms


def check_bad_requests(client: httpx.Client) -> None:
    """Caller mistakes get a JSON 4xx naming the problem, and the server keeps serving."""
    bad_image = client.post(
        "/invocations", json={"images": ["not base64!"], "classes": SEED_CLASSES}, timeout=30
    )
    expect(400 <= bad_image.status_code < 500, f"bad image: {bad_image.status_code}")
    expect("images[0]" in bad_image.json()["error"]["message"], f"unnamed: {bad_image.text}")
    broken = client.post(
        "/invocations",
        content=b'{"images": [',
        headers={"Content-Type": "application/json"},
        timeout=30,
    )
    expect(400 <= broken.status_code < 500, f"broken JSON: {broken.status_code}")
    expect("error" in broken.json(), f"broken JSON answer is not a JSON error: {broken.text}")
    expect(client.get("/ping", timeout=PING_BUDGET_S).status_code == 200, "down after bad input")


def check_model(
    client: httpx.Client, expect_model: str | None, expect_embedding: list[float] | None
) -> str:
    """Which model answers (`/embed_texts`' `model` field), checked against the expected tag
    prefix and, when given, the expected embedding of EMBEDDING_TEXT. Returns the tag."""
    response = client.post("/embed_texts", json={"texts": [EMBEDDING_TEXT]}, timeout=30)
    expect(response.status_code == 200, f"/embed_texts: {response.status_code} {response.text}")
    answer = response.json()
    tag = answer["model"]
    if expect_model is not None:
        expect(tag.startswith(expect_model), f"serving {tag!r}, expected {expect_model}...")
    if expect_embedding is not None:
        served = np.array(answer["embeddings"][0])
        expected = np.array(expect_embedding)
        expect(
            served.shape == expected.shape and np.allclose(served, expected, atol=1e-4),
            f"the embedding of {EMBEDDING_TEXT!r} is not the expected checkpoint's",
        )
    return tag


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("url", nargs="?", default="http://127.0.0.1:8080")
    parser.add_argument("--ready-timeout", type=float, default=300)
    parser.add_argument("--expect-model", help="the served model's tag starts with this")
    parser.add_argument(
        "--expect-embedding",
        type=json.loads,
        help=f"JSON list: the expected embedding of {EMBEDDING_TEXT!r} (within 1e-4)",
    )
    args = parser.parse_args()
    with httpx.Client(base_url=args.url, trust_env=False) as client:
        try:
            figures = {"ready_s": round(wait_until_ready(client, args.ready_timeout), 1)}
            figures["slowest_ping_ms"] = round(check_ping(client), 1)
            figures["seed_request_ms"] = round(check_seed_request(client))
            check_bad_requests(client)
            figures["model"] = check_model(client, args.expect_model, args.expect_embedding)
        except (CheckFailed, httpx.HTTPError, KeyError, TypeError, ValueError) as exc:
            print(f"FAILED: {type(exc).__name__}: {exc}", file=sys.stderr)
            return 1
    print(json.dumps({"url": args.url, **figures, "checks": "passed"}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
