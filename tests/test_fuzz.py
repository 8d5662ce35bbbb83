"""Property-based attacks: hypothesis on the decoders and schemathesis on the live API.

Both are bounded (example counts, deadlines) and talk only to 127.0.0.1.
"""

from __future__ import annotations

import httpx
import numpy as np
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from clip_runner.errors import RequestError
from clip_runner.images.loading import ImageGeometry, decode_image, decode_inline, resize_and_crop
from tests.helpers import encode, photo_like

GEOMETRY = ImageGeometry(224, 224, 224)
SEED_PNG = encode(photo_like(24, 16, seed=1))
SEED_JPEG = encode(photo_like(24, 16, seed=1), "JPEG")


def decode_or_refuse(data: bytes) -> None:
    """The decoder's contract: an RGB image, or a 422 naming the image; nothing else escapes."""
    try:
        image = decode_image(data, index=3, max_pixels=4_000_000)
    except RequestError as error:
        assert error.status == 422 and error.index == 3 and error.message.startswith("images[3]")
        return
    assert image.mode == "RGB"
    pixels = resize_and_crop(image, GEOMETRY)
    assert pixels.shape == (224, 224, 3) and pixels.dtype == np.uint8


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=2048))
def test_arbitrary_bytes_decode_or_are_refused(data):
    decode_or_refuse(data)


@settings(max_examples=300, deadline=None)
@given(st.sampled_from([SEED_PNG, SEED_JPEG]), st.data())
def test_mutated_real_images_decode_or_are_refused(original, data):
    mutated = bytearray(original)
    for _ in range(data.draw(st.integers(1, 8))):
        position = data.draw(st.integers(0, len(mutated) - 1))
        mutated[position] = data.draw(st.integers(0, 255))
    cut = data.draw(st.integers(0, len(mutated)))
    decode_or_refuse(bytes(mutated[:cut]))


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=300))
def test_arbitrary_strings_as_inline_sources(text):
    try:
        data = decode_inline(text, index=0, max_bytes=10_000)
    except RequestError as error:
        assert error.status == 422 and error.index == 0
        return
    assert isinstance(data, bytes) and data


def test_openapi_fuzzing_finds_no_server_errors(served):
    """schemathesis generates /invocations bodies from the service's own OpenAPI schema.

    Driven through hypothesis directly: schemathesis' pytest plugin does not load under pytest 9.
    """
    schema = schemathesis.openapi.from_url(f"{served.url}/docs.json")
    operation = schema["/invocations"]["POST"]
    statuses: list[int] = []

    @settings(
        max_examples=80,
        deadline=None,
        database=None,
        suppress_health_check=list(HealthCheck),
    )
    @given(case=operation.as_strategy())
    def call(case):
        response = case.call(base_url=served.url, timeout=30)
        statuses.append(response.status_code)
        assert response.status_code < 500, (response.status_code, response.text[:500])
        if response.status_code >= 400:
            error = response.json()["error"]
            assert isinstance(error["type"], str) and isinstance(error["message"], str)

    call()
    assert len(statuses) >= 20  # random strings are rarely valid images: mostly 422s
    assert httpx.get(f"{served.url}/ping", timeout=5).status_code == 200
