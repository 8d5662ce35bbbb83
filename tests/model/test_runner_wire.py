"""The runner's wire format: every kind of rows comes back as it went, and malformed bodies are
refused with a message naming what was wrong."""

from __future__ import annotations

import numpy as np
import pytest

from clip_runner.model.runner_wire import (
    pack_embeddings,
    pack_jpegs,
    pack_pixels,
    pack_token_ids,
    unpack_embeddings,
    unpack_jpegs,
    unpack_pixels,
    unpack_token_ids,
)


def test_images_come_back_as_they_went():
    pixels = np.random.default_rng(0).integers(0, 256, (3, 5, 7, 3), dtype=np.uint8)
    body, header = pack_pixels(pixels)
    assert header == "3,5,7,3"
    np.testing.assert_array_equal(unpack_pixels(bytes(body), header), pixels)


def test_a_strided_view_of_images_is_sent_as_its_pixels():
    pixels = np.random.default_rng(1).integers(0, 256, (4, 6, 6, 3), dtype=np.uint8)
    view = pixels[::2, :, ::-1]
    body, header = pack_pixels(view)
    np.testing.assert_array_equal(unpack_pixels(bytes(body), header), view)


def test_jpegs_come_back_as_they_went_whatever_their_lengths():
    jpegs = [b"\xff\xd8first", b"", b"\xff\xd8" + bytes(range(256)) * 3, b"x"]
    body, header = pack_jpegs(jpegs)
    assert unpack_jpegs(body, header) == jpegs


def test_token_ids_come_back_as_they_went():
    token_ids = [[49406, 320, 1125, 49407], [49406, 49407], [0, 2**31 - 1]]
    body, header = pack_token_ids(token_ids)
    assert unpack_token_ids(body, header) == token_ids


def test_embeddings_come_back_exactly():
    embeddings = np.random.default_rng(2).standard_normal((5, 12)).astype(np.float32)
    body, header = pack_embeddings(embeddings)
    answer = unpack_embeddings(body, header)
    assert answer.dtype == np.float32 and answer.shape == (5, 12)
    np.testing.assert_array_equal(answer, embeddings)


@pytest.mark.parametrize(
    ("unpack", "body", "header", "message"),
    [
        (unpack_pixels, bytes(12), "1,2,2", "shape of 4 numbers"),
        (unpack_pixels, bytes(11), "1,2,2,3", "take 12 bytes, not 11"),
        (unpack_pixels, bytes(16), "1,2,2,4", "3 channels"),
        (unpack_pixels, bytes(12), "1,2,two,3", "whole numbers"),
        (unpack_pixels, bytes(12), "", "shape of 4 numbers"),
        (unpack_pixels, b"", "0,2,2,3", "no images"),
        (unpack_jpegs, b"abc", "1,1", "take 2 bytes, not 3"),
        (unpack_jpegs, b"abc", "", "is empty"),
        (unpack_jpegs, b"abc", "4,-1", "must not be negative"),
        (unpack_token_ids, bytes(10), "2", "take 8 bytes, not 10"),
        (unpack_embeddings, bytes(8), "2,2", "take 16 bytes, not 8"),
    ],
)
def test_malformed_bodies_are_refused_naming_what_was_wrong(unpack, body, header, message):
    with pytest.raises(ValueError, match=message):
        unpack(body, header)
