"""Prompts -> their token ids, in the API workers, straight from the Rust tokenizer.

The API workers tokenize every prompt they have not seen: its length is checked there, and its
ids are what the runner encodes. transformers' tokenizer call wraps the Rust tokenizer
(`tokenizers`) in Python work (argument handling, truncation and padding set-up, a
`BatchEncoding`) that cost more CPU than the tokenizing itself: for 8 new prompts 311-349 us
against 212-222 us for the Rust tokenizer's own `encode` (BENCHMARKS.md).

So each API worker keeps a copy of the served model's Rust tokenizer, set never to truncate or
pad. A copy, because transformers sets truncation on the tokenizer it wraps at each call: a count
read through that shared state could come back cut at the model's limit and let an over-long
prompt through. One `encode` per prompt rather than `encode_batch`: the batch call spreads a
request's few prompts over a thread pool, which cost more CPU than it saved (316 against 222 us
for 8 prompts on 2 cores).
"""

from __future__ import annotations

import functools
from array import array
from collections.abc import Callable

from tokenizers import Tokenizer
from transformers import PreTrainedTokenizerBase


def untruncated_encoder(tokenizer: PreTrainedTokenizerBase) -> Callable[[str], list[int]]:
    """A prompt -> its ids as `tokenizer(prompt)["input_ids"]` gives them when nothing
    truncates (special tokens included): through a private copy of its Rust tokenizer, or the
    tokenizer's own call where it has none (a Python tokenizer; CLIP's has one in transformers
    5)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return lambda prompt: tokenizer(prompt)["input_ids"]
    own = Tokenizer.from_str(backend.to_str())
    own.no_truncation()
    own.no_padding()
    return lambda prompt: own.encode(prompt).ids


class PromptTokenizer:
    """Token ids of prompts, memoised per prompt: the same class lists come with every request.

    The ids are kept as 4-byte integers: about 6 MB at most for `cache_size` = 16,384 prompts of
    77 tokens (as tuples of Python ints, 2.8 KB a prompt).
    """

    def __init__(self, tokenizer: PreTrainedTokenizerBase, cache_size: int) -> None:
        encode = untruncated_encoder(tokenizer)
        self._ids = functools.lru_cache(maxsize=cache_size)(lambda p: array("i", encode(p)))

    def __call__(self, prompts: list[str]) -> list[array]:
        return [self._ids(prompt) for prompt in prompts]
