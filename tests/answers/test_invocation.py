"""The request flow with the real tiny model in-process (no server): parity and caching."""

from __future__ import annotations

import asyncio
import contextvars
import copy
import dataclasses
import threading

import httpx
import numpy as np
import pytest
import torch

from clip_runner.answers.invocation import (
    CHUNK_PASSES,
    LENGTH_CHECK_SLICE,
    TOKENIZE_ON_THE_LOOP,
    InvocationContext,
    classify,
    embed_texts,
    invoke,
)
from clip_runner.answers.token_ids import PromptTokenizer
from clip_runner.errors import RequestError
from clip_runner.images.fetch import AddressPolicy, FetchLimits, new_fetch_client
from clip_runner.images.loading import ImageLimits
from clip_runner.model.embedding_cache import EmbeddingCache
from clip_runner.model.encoding import ClipEncoder
from tests.helpers import SEED_CLASSES, as_base64, photo_like
from tests.reference import assert_matches_reference, reference_probabilities

TEMPLATES = "templates[{}]".format  # how /classify names the templates the caller sent


class CountingEncoder:
    """The real encoder behind the async interface the runner offers, counting calls."""

    def __init__(self, encoder: ClipEncoder) -> None:
        self.encoder = encoder
        self.token_calls: list[list[list[int]]] = []

    async def encode_images(self, pixels: np.ndarray) -> np.ndarray:
        return self.encoder.encode_images(pixels)

    async def encode_tokens(self, token_ids: list[list[int]]) -> np.ndarray:
        self.token_calls.append(list(token_ids))
        return self.encoder.encode_token_ids(token_ids)


def tokenized(tiny_clip, prompts: list[str]) -> list[list[int]]:
    """Each prompt's token ids, untruncated, as the API service's tokenizer gives them."""
    return tiny_clip.processor.tokenizer(prompts)["input_ids"]


@pytest.fixture()
def counting(tiny_clip) -> CountingEncoder:
    model = copy.deepcopy(tiny_clip.model)  # the encoder changes its model's first layer
    encoder = ClipEncoder(model, tiny_clip.processor, torch.device("cpu"), torch.float32)
    return CountingEncoder(encoder)


def run_invoke(tiny_clip, counting, images, classes, template="a photo of a {name}", top_k=3):
    limits = ImageLimits(FetchLimits(5_000_000, 5), max_pixels=50_000_000)

    async def go():
        async with new_fetch_client(AddressPolicy(), limits.fetch) as client:
            context = InvocationContext(
                facts=counting.encoder.facts(tiny_clip.tag, True),
                encode_images=counting.encode_images,
                encode_tokens=counting.encode_tokens,
                tokenize=PromptTokenizer(counting.encoder.tokenizer_json(), 64, 77),
                http_client=client,
                text_cache=cache,
                label_cache=EmbeddingCache(100),
                image_limits=limits,
            )
            first = await invoke(context, images, classes, template, top_k)
            second = await invoke(context, images, classes, template, top_k)
            return first, second

    cache = EmbeddingCache(100)
    return asyncio.run(go())


def test_probabilities_equal_transformers_within_1e5(tiny_clip, counting):
    pictures = [photo_like(640, 480, seed=11), photo_like(300, 500, seed=12)]
    classes = [(name, bool(flag)) for name, flag in SEED_CLASSES]
    names = [name for name, _ in classes]
    answer, _ = run_invoke(tiny_clip, counting, [as_base64(p) for p in pictures], classes)
    reference = reference_probabilities(tiny_clip, pictures, [f"a photo of a {n}" for n in names])
    assert_matches_reference(answer, reference, names)


def test_repeated_class_lists_are_encoded_once(tiny_clip, counting):
    classes = [("cat", True), ("dog", False), ("cat", True)]
    first, second = run_invoke(tiny_clip, counting, [as_base64(photo_like(50, 50, 1))], classes)
    assert first == second
    assert counting.token_calls == [tokenized(tiny_clip, ["a photo of a cat", "a photo of a dog"])]
    # the class named twice gets probabilities a float rounding apart (its column of the
    # image-text product is summed elsewhere), the larger first
    indices, _, probabilities = first[0]["prompts"]
    where = {index: place for place, index in enumerate(indices)}
    assert abs(probabilities[where[0]] - probabilities[where[2]]) < 1e-6
    assert probabilities == sorted(probabilities, reverse=True)


def test_template_and_top_k_overrides(tiny_clip, counting):
    classes = [("cat", True), ("dog", False), ("bird", False), ("car", False)]
    picture = photo_like(80, 60, seed=4)
    answer, _ = run_invoke(
        tiny_clip,
        counting,
        [as_base64(picture)],
        classes,
        template="a drawing of a {name}",
        top_k=4,
    )
    names = [name for name, _ in classes]
    reference = reference_probabilities(
        tiny_clip, [picture], [f"a drawing of a {n}" for n in names]
    )
    indices, _, probabilities = answer[0]["prompts"]
    assert len(indices) == 4
    np.testing.assert_allclose(sum(probabilities), 1.0, atol=1e-5)
    np.testing.assert_allclose(probabilities, reference[0][indices], atol=1e-5)


def test_prompts_over_the_token_limit_are_refused_naming_the_class(tiny_clip, counting):
    classes = [("cat", True), ("very " * 80 + "long cat", False)]
    with pytest.raises(RequestError) as raised:
        run_invoke(tiny_clip, counting, [as_base64(photo_like(20, 20, 1))], classes)
    assert raised.value.status == 422
    assert "classes[1][0]" in raised.value.message and "at most 77" in raised.value.message
    assert counting.token_calls == []


def recording_context(
    tiny_clip, counting, tokenized_counts: list[int], on_the_loop: list[bool] | None = None
) -> InvocationContext:
    """A context whose tokenizer records how many prompts each call of it took, and whether
    it ran on the event loop's thread."""
    tokenizer = PromptTokenizer(counting.encoder.tokenizer_json(), 64, 77)

    def tokenize(prompts: list[str]) -> list:
        tokenized_counts.append(len(prompts))
        if on_the_loop is not None:
            on_the_loop.append(threading.current_thread() is threading.main_thread())
        return tokenizer(prompts)

    return InvocationContext(
        facts=counting.encoder.facts(tiny_clip.tag, True),
        encode_images=counting.encode_images,
        encode_tokens=counting.encode_tokens,
        tokenize=tokenize,
        http_client=httpx.AsyncClient(),
        text_cache=EmbeddingCache(100),
        label_cache=EmbeddingCache(100),
        image_limits=ImageLimits(FetchLimits(5_000_000, 5), max_pixels=50_000_000),
    )


def test_a_template_repeating_its_slot_past_the_prompt_limit_is_refused_before_any_prompt(
    tiny_clip, counting
):
    tokenized_counts: list[int] = []
    context = recording_context(tiny_clip, counting, tokenized_counts)
    labels, templates = ["cat", "x" * 300], ["a photo of a {}", "{} and {} or {}"]
    with pytest.raises(RequestError) as raised:
        asyncio.run(classify(context, [], labels, templates, None, template_field=TEMPLATES))
    assert raised.value.status == 422
    assert raised.value.message == (
        "labels[1] with templates[1]: the prompt would be 909 characters long, over the 600 "
        "taken (shorten the label or the template, and use the template's slot once)"
    )
    assert tokenized_counts == [] and counting.token_calls == []


def test_the_length_check_stops_at_the_first_prompt_over_the_token_limit(tiny_clip, counting):
    tokenized_counts: list[int] = []
    context = recording_context(tiny_clip, counting, tokenized_counts)
    labels = ["very " * 80 + "long"] + [f"thing {index}" for index in range(300)]
    with pytest.raises(RequestError, match=r"^labels\[0\]: the prompt is \d+ tokens long"):
        asyncio.run(classify(context, [], labels, ["a {}"], None))
    assert tokenized_counts == [LENGTH_CHECK_SLICE]


@pytest.mark.parametrize(
    ("name", "template", "blamed"),
    [
        ("very " * 80 + "long", "a photo of a {name}", "classes[0][0]"),  # the default's
        ("cat", "z " * 80 + "{name}", "classes[0][0] with template"),  # the caller's own
    ],
)
def test_an_over_long_prompt_names_the_template_where_the_caller_sent_one(
    tiny_clip, counting, name, template, blamed
):
    """A long template had been blamed on the first class alone."""
    context = recording_context(tiny_clip, counting, [])
    with pytest.raises(RequestError) as raised:
        asyncio.run(invoke(context, [], [(name, True)], template, 3))
    assert raised.value.status == 422
    assert raised.value.message.startswith(f"{blamed}: the prompt is ")


@pytest.mark.parametrize(("labels", "on_a_thread"), [(10, False), (300, True)])
def test_each_prompt_is_tokenized_once_and_many_off_the_event_loop(
    tiny_clip, counting, labels, on_a_thread
):
    tokenized_counts: list[int] = []
    on_the_loop: list[bool] = []
    context = recording_context(tiny_clip, counting, tokenized_counts, on_the_loop)
    names = [f"thing {index}" for index in range(labels)]
    image = as_base64(photo_like(20, 20, 1))
    ranked = asyncio.run(classify(context, [image], names, ["a {}"], None))
    assert sorted(item["label"] for item in ranked[0]) == sorted(names)
    assert sum(tokenized_counts) == labels  # the encoded ids are the length check's
    assert set(on_the_loop) == {not on_a_thread}
    assert sum(len(call) for call in counting.token_calls) == labels


def test_image_size_normalisation_and_scale_come_from_the_checkpoint(monkeypatch, bentoml_home):
    """A checkpoint unlike OpenAI's (64 px, patch 16, gelu, its own mean/std and logit scale)
    goes through the store and the request flow and still equals transformers' own answer."""
    import math

    from clip_runner.model.store import (
        ARCHITECTURES,
        Architecture,
        build_random_architecture,
        load_clip,
        save_clip,
    )

    monkeypatch.setitem(
        ARCHITECTURES, "test-64", Architecture((32, 2, 2), 16, 64, (32, 2, 2), 16, "gelu", None)
    )
    model, processor = build_random_architecture("test-64", seed=5)
    processor.image_processor.image_mean = [0.5, 0.4, 0.3]
    processor.image_processor.image_std = [0.2, 0.25, 0.3]
    with torch.no_grad():
        model.logit_scale.fill_(math.log(50.0))
    loaded = load_clip(save_clip(model, processor, source="random:test-64", random_weights=True))
    model = copy.deepcopy(loaded.model)  # the reference below runs the unchanged one
    encoder = ClipEncoder(model, loaded.processor, torch.device("cpu"), torch.float32)
    facts = encoder.facts(loaded.tag, True)
    assert (facts.crop_height, facts.shortest_edge) == (64, 64)
    assert facts.logit_scale == pytest.approx(50.0)
    pictures = [photo_like(200, 120, seed=31), photo_like(90, 150, seed=32)]
    classes = [(name, bool(flag)) for name, flag in SEED_CLASSES]
    names = [name for name, _ in classes]
    first, _ = run_invoke(
        loaded, CountingEncoder(encoder), [as_base64(p) for p in pictures], classes
    )
    reference = reference_probabilities(loaded, pictures, [f"a photo of a {n}" for n in names])
    assert_matches_reference(first, reference, names)


def test_only_prompts_the_text_cache_lacks_are_tokenized(tiny_clip, counting):
    tokenized_counts: list[int] = []
    context = recording_context(tiny_clip, counting, tokenized_counts)
    known = [f"a thing {index}" for index in range(40)]
    first = asyncio.run(embed_texts(context, known))
    assert sum(tokenized_counts) == 40
    tokenized_counts.clear()
    again = asyncio.run(embed_texts(context, known))
    np.testing.assert_array_equal(again, first)
    assert tokenized_counts == []
    with_new = known[:20] + ["a new one", "a thing 3", "a new two", "a new one"] + known[20:]
    asyncio.run(embed_texts(context, with_new))
    assert tokenized_counts == [2]  # the two distinct new prompts, once each
    assert counting.token_calls[-1] == tokenized(tiny_clip, ["a new one", "a new two"])


def test_a_repeated_ensemble_is_answered_from_the_label_cache(tiny_clip, counting):
    tokenized_counts: list[int] = []
    context = recording_context(tiny_clip, counting, tokenized_counts)
    image = as_base64(photo_like(20, 20, 1))
    labels, templates = [f"thing {index}" for index in range(5)], ["a {}", "the {}", "my {}"]
    first = asyncio.run(classify(context, [image], labels, templates, None))
    assert sum(tokenized_counts) == 15 and len(context.label_cache) == 5
    tokenized_counts.clear()
    calls = len(counting.token_calls)
    again = asyncio.run(classify(context, [image], labels, templates, None))
    assert again == first  # the same embeddings, not only close ones
    assert tokenized_counts == [] and len(counting.token_calls) == calls
    # Other templates are other ensembles; the prompts they share are in the text cache.
    asyncio.run(classify(context, [image], labels, ["a {}", "your {}"], None))
    assert tokenized_counts == [5]
    assert counting.token_calls[-1] == tokenized(tiny_clip, [f"your thing {i}" for i in range(5)])


def test_labels_the_cache_lacks_are_ensembled_as_in_a_request_of_only_new_labels(
    tiny_clip, counting
):
    context = recording_context(tiny_clip, counting, [])
    image = as_base64(photo_like(30, 20, 2))
    templates = ["a {}", "the {}"]
    asyncio.run(classify(context, [image], ["cat", "bird"], templates, None))
    labels = ["dog", "cat", "car", "dog", "bird"]
    mixed = asyncio.run(classify(context, [image], labels, templates, None))
    assert counting.token_calls[-1] == tokenized(
        tiny_clip, ["a dog", "the dog", "a car", "the car"]
    )
    cold = asyncio.run(
        classify(recording_context(tiny_clip, counting, []), [image], labels, templates, None)
    )
    assert [[item["label"] for item in ranked] for ranked in mixed] == [
        [item["label"] for item in ranked] for ranked in cold
    ]
    np.testing.assert_allclose(
        [item["score"] for item in mixed[0]], [item["score"] for item in cold[0]], atol=1e-6
    )


def test_an_over_long_prompt_behind_cached_ones_is_named_by_its_place(tiny_clip, counting):
    context = recording_context(tiny_clip, counting, [])
    templates = ["a {}", "the {}"]
    image = as_base64(photo_like(20, 20, 1))
    asyncio.run(classify(context, [image], ["cat", "dog"], templates, None))
    labels = ["cat", "dog", "bird", "very " * 80 + "long"]
    with pytest.raises(RequestError, match=r"^labels\[3\] with templates\[0\]: the prompt is"):
        asyncio.run(classify(context, [], labels, templates, None, template_field=TEMPLATES))
    with pytest.raises(RequestError, match=r"^labels\[3\]: the prompt is"):  # a default template
        asyncio.run(classify(context, [], labels, templates[:1], None))


def test_concurrent_requests_with_the_same_new_prompts_encode_them_once(tiny_clip, counting):
    context = recording_context(tiny_clip, counting, [])
    context.text_cache = EmbeddingCache(1000)
    image = as_base64(photo_like(20, 20, 1))
    labels = [f"thing {index}" for index in range(100)]

    async def like_a_runner_call(token_ids: list[list[int]]) -> np.ndarray:
        await asyncio.sleep(0.05)  # the other requests run meanwhile
        return await counting.encode_tokens(token_ids)

    context.encode_tokens = like_a_runner_call

    async def three_at_once():
        return await asyncio.gather(
            *[classify(context, [image], labels, ["a {}", "the {}"], None) for _ in range(3)]
        )

    answers = asyncio.run(three_at_once())
    assert answers[0] == answers[1] == answers[2]
    assert len(answers[0][0]) == 100
    encoded = [tuple(ids) for call in counting.token_calls for ids in call]
    assert len(encoded) == len(set(encoded)) == 200


def test_prompts_cached_while_a_request_tokenized_are_not_encoded_again(tiny_clip, counting):
    """A request that looked the cache up before another finished the same prompts, and joined
    the prompts in flight only after tokenizing them (the other's chunks gone by then), encoded
    them all again."""
    tokenizer = PromptTokenizer(counting.encoder.tokenizer_json(), 64, 77)
    first_is_back = threading.Event()
    in_the_second = contextvars.ContextVar("in_the_second", default=False)

    def tokenize(prompts: list[str]) -> list:
        if in_the_second.get():  # on the second request's thread: until the first is answered
            first_is_back.wait(10)
        return tokenizer(prompts)

    context = recording_context(tiny_clip, counting, [])
    context.tokenize = tokenize
    context.text_cache = EmbeddingCache(1000)
    texts = [f"a thing both requests ask about, number {index}" for index in range(300)]
    assert len(texts) > TOKENIZE_ON_THE_LOOP  # tokenized on a thread: the window

    async def the_second():
        in_the_second.set(True)  # a thread it hands work to sees it too
        return await embed_texts(context, texts)

    async def one_behind_the_other():
        first = asyncio.ensure_future(embed_texts(context, texts))
        second = asyncio.ensure_future(the_second())
        answer = await first
        first_is_back.set()
        return answer, await second

    first, second = asyncio.run(one_behind_the_other())
    np.testing.assert_array_equal(first, second)
    assert sum(len(call) for call in counting.token_calls) == len(texts)


def test_a_request_that_runs_out_of_time_keeps_the_chunks_it_encoded(tiny_clip, counting):
    context = recording_context(tiny_clip, counting, [])
    context.facts = dataclasses.replace(context.facts, max_text_batch=2)
    chunk = CHUNK_PASSES * 2
    image = as_base64(photo_like(20, 20, 1))
    labels = [f"thing {index}" for index in range(chunk + 5)]
    encode = counting.encode_tokens

    async def first_chunk_only(token_ids: list[list[int]]) -> np.ndarray:
        if counting.token_calls:
            await asyncio.sleep(3600)  # the second chunk's call never comes back
        return await encode(token_ids)

    context.encode_tokens = first_chunk_only
    with pytest.raises(TimeoutError):
        asyncio.run(asyncio.wait_for(classify(context, [image], labels, ["a {}"], None), 2))
    assert len(context.text_cache) == chunk and len(context.texts_in_flight) == 0
    context.encode_tokens = encode
    counting.token_calls.clear()
    ranked = asyncio.run(classify(context, [image], labels, ["a {}"], None))
    assert len(ranked[0]) == chunk + 5
    assert [len(call) for call in counting.token_calls] == [5]
