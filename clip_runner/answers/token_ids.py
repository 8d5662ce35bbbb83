"""Prompts -> their token ids, in the API workers, straight from the Rust tokenizer.

The API workers tokenize every prompt they have not seen: its length is checked there, and its
ids are what the runner encodes. transformers' tokenizer call wraps the Rust tokenizer
(`tokenizers`) in Python work (argument handling, truncation and padding set-up, a
`BatchEncoding`) that cost more CPU than the tokenizing itself: for 8 new prompts 311-349 us
against 212-222 us for the Rust tokenizer's own `encode` (BENCHMARKS.md).

So each API worker keeps its own copy of the served model's Rust tokenizer, sent by the runner
as JSON (its `tokenizer` API: the API workers never load transformers), set never to truncate or
pad. transformers sets truncation on the runner's tokenizer at each call, and a saved
tokenizer.json can carry it too: a count read through that state could come back cut at the
model's limit and let an over-long prompt through. One `encode` per prompt rather than
`encode_batch`: the batch call spreads a request's few prompts over a thread pool, which cost
more CPU than it saved (316 against 222 us for 8 prompts on 2 cores).
"""

from __future__ import annotations

import threading
from array import array
from collections import OrderedDict
from collections.abc import Callable

from tokenizers import Tokenizer


def untruncated_encoder(tokenizer_json: str) -> Callable[[str], list[int]]:
    """A prompt -> its ids as the tokenizer's own call gives them when nothing truncates
    (special tokens included), from the tokenizer's JSON (`backend_tokenizer.to_str()`)."""
    own = Tokenizer.from_str(tokenizer_json)
    own.no_truncation()
    own.no_padding()
    return lambda prompt: own.encode(prompt).ids


class PromptTokenizer:
    """Token ids of prompts, memoised per prompt: the same class lists come with every request.

    At most `cache_size` prompts are remembered (none at 0), and only those within the model's
    `max_tokens`: a prompt refused as too long is not asked for again, and had filled the
    memo with ids of up to 2,300 tokens (a 600-character prompt of emoji), some 230 MB of an
    API worker, even with the caches turned off. The ids are kept as 4-byte integers: about 6
    MB for 16,384 prompts of 77 tokens.
    """

    def __init__(self, tokenizer_json: str, cache_size: int, max_tokens: int) -> None:
        self._encode = untruncated_encoder(tokenizer_json)
        self._cache_size = cache_size
        self._max_tokens = max_tokens
        self._ids: OrderedDict[str, array] = OrderedDict()
        # A request of many prompts tokenizes on a thread while others do on the event loop.
        self._lock = threading.Lock()

    def __call__(self, prompts: list[str]) -> list[array]:
        return [self._ids_of(prompt) for prompt in prompts]

    def _ids_of(self, prompt: str) -> array:
        with self._lock:
            ids = self._ids.get(prompt)
            if ids is not None:
                self._ids.move_to_end(prompt)
                return ids
        ids = array("i", self._encode(prompt))
        if self._cache_size and len(ids) <= self._max_tokens:
            with self._lock:
                self._ids[prompt] = ids
                if len(self._ids) > self._cache_size:
                    self._ids.popitem(last=False)
        return ids
