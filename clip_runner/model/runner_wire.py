"""The runner's direct calls on the wire: rows and embeddings as raw bytes and one header.

BentoML's dependency client sends a call's rows pickled inside its input model, through
aiohttp and its own request builder, and the runner's endpoint unpickles and validates them
before the method runs, then pickles the answer back. These calls carry nothing but arrays, so
here each is its bytes plus a header that says how to cut them (`ROWS_HEADER`):
- images: uint8 (N, H, W, 3), the header their shape;
- JPEGs: the files one after another, the header each one's length;
- prompts' token ids: int32 one after another, the header each prompt's count;
- the answer: float32 (N, D), the header its shape.
"""

from __future__ import annotations

import numpy as np

MEDIA_TYPE = "application/vnd.clip-runner.rows"
ROWS_HEADER = "x-clip-rows"


def _numbers(header: str, what: str) -> list[int]:
    try:
        numbers = [int(part) for part in header.split(",")] if header else []
    except ValueError:
        raise ValueError(f"{ROWS_HEADER} must list whole numbers for {what}: {header!r}") from None
    if any(number < 0 for number in numbers):
        raise ValueError(f"{ROWS_HEADER} must not be negative for {what}: {header!r}")
    return numbers


def _header(numbers: tuple[int, ...] | list[int]) -> str:
    return ",".join(map(str, numbers))


def _array(body: bytes, header: str, dtype: type, ndim: int, what: str) -> np.ndarray:
    shape = _numbers(header, what)
    if len(shape) != ndim:
        raise ValueError(f"{what} need a shape of {ndim} numbers in {ROWS_HEADER}: {header!r}")
    expected = int(np.prod(shape)) * np.dtype(dtype).itemsize
    if len(body) != expected:
        raise ValueError(f"{what} of shape {header} take {expected} bytes, not {len(body)}")
    return np.frombuffer(body, dtype).reshape(shape)


def _ragged_lengths(body: bytes, header: str, itemsize: int, what: str) -> list[int]:
    lengths = _numbers(header, what)
    if not lengths:
        raise ValueError(f"no {what}: {ROWS_HEADER} is empty")
    if sum(lengths) * itemsize != len(body):
        raise ValueError(
            f"{what} of lengths {header} take {sum(lengths) * itemsize} bytes, not {len(body)}"
        )
    return lengths


def pack_pixels(pixels: np.ndarray) -> tuple[memoryview, str]:
    """uint8 (N, H, W, 3) -> its bytes (not copied when contiguous) and header."""
    contiguous = np.ascontiguousarray(pixels, np.uint8)
    return memoryview(contiguous).cast("B"), _header(contiguous.shape)


def unpack_pixels(body: bytes, header: str) -> np.ndarray:
    """The images of `pack_pixels`, a read-only view of `body`."""
    pixels = _array(body, header, np.uint8, 4, "images")
    if len(pixels) == 0:
        raise ValueError(f"no images: {ROWS_HEADER} counts none")
    if pixels.shape[3] != 3:
        raise ValueError(f"images need 3 channels, not {pixels.shape[3]}")
    return pixels


def pack_jpegs(jpegs: list[bytes]) -> tuple[bytes, str]:
    return b"".join(jpegs), _header([len(jpeg) for jpeg in jpegs])


def unpack_jpegs(body: bytes, header: str) -> list[bytes]:
    lengths = _ragged_lengths(body, header, 1, "JPEGs")
    ends = np.cumsum(lengths).tolist()
    return [body[end - length : end] for length, end in zip(lengths, ends, strict=True)]


def pack_token_ids(token_ids: list[list[int]]) -> tuple[bytes, str]:
    flat = np.fromiter((i for ids in token_ids for i in ids), np.int32)
    return flat.tobytes(), _header([len(ids) for ids in token_ids])


def unpack_token_ids(body: bytes, header: str) -> list[list[int]]:
    lengths = _ragged_lengths(body, header, 4, "token ids")
    flat = np.frombuffer(body, np.int32).tolist()
    ends = np.cumsum(lengths).tolist()
    return [flat[end - length : end] for length, end in zip(lengths, ends, strict=True)]


def pack_embeddings(embeddings: np.ndarray) -> tuple[bytes, str]:
    contiguous = np.ascontiguousarray(embeddings, np.float32)
    return contiguous.tobytes(), _header(contiguous.shape)


def unpack_embeddings(body: bytes, header: str) -> np.ndarray:
    return _array(body, header, np.float32, 2, "embeddings")
