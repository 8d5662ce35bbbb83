"""Each API's request, from validated fields to its answer: `/invocations` (the original's
contract and the Hugging Face toolkit's shape), `/classify`, `/embed_images`, `/embed_texts`.

The runner is passed in as async callables, so these flows are testable without a server: images
are fetched and decoded concurrently (decode/resize in threads), text embeddings come from the
caches (prompts; `/classify`'s labels, ensembled) or from runner calls of token ids (the prompts
they lack are tokenized here, once, where their lengths are checked), and the math is
`zero_shot`'s and `prompts`' pure functions.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import httpx
import numpy as np

from clip_runner.answers.prompts import (
    ensemble_embeddings,
    ensemble_prompts,
    filled_length,
    ranked_labels,
)
from clip_runner.answers.zero_shot import build_prompts, predict, zero_shot_probabilities
from clip_runner.config import DEFAULT_TEMPLATE
from clip_runner.errors import ImageError, RequestError
from clip_runner.images.loading import ImageGeometry, ImageLimits, load_images
from clip_runner.model.embedding_cache import EmbeddingCache, first_misses, with_cached
from clip_runner.model.encodings_in_flight import EncodingsInFlight
from clip_runner.model.model_facts import ModelFacts

EncodeImages = Callable[[np.ndarray], Awaitable[np.ndarray]]
EncodeJpegs = Callable[[list[bytes]], Awaitable[np.ndarray]]
# Prompts' token ids (special tokens included) -> their embeddings, by the runner.
EncodeTokens = Callable[[list[list[int]]], Awaitable[np.ndarray]]
# Prompts -> their token ids, by the served model's tokenizer, untruncated.
Tokenize = Callable[[list[str]], list[Sequence[int]]]
# A label's ensembled embedding is cached by (model tag, its request's templates, label).
LabelKey = tuple[str, str, str]


@dataclass
class InvocationContext:
    """Everything a request needs besides its own fields; one per API worker."""

    facts: ModelFacts
    encode_images: EncodeImages
    encode_tokens: EncodeTokens
    tokenize: Tokenize
    http_client: httpx.AsyncClient
    text_cache: EmbeddingCache[tuple[str, str]]  # by (model tag, prompt)
    label_cache: EmbeddingCache[LabelKey]  # `/classify`'s labels, ensembled over their templates
    image_limits: ImageLimits
    # Where JPEGs are forwarded as bytes (image_limits.forward_jpegs), the runner's device decodes.
    encode_jpegs: EncodeJpegs | None = None
    # Longest prompt a template and a label may make: a template and a label at their limit
    # (2 x CLIP_MAX_CLASS_NAME_CHARS), so only a template repeating its slot can pass it.
    max_prompt_chars: int = 600
    # The prompts this worker's requests are encoding now, shared between them (keyed as the
    # text cache is).
    texts_in_flight: EncodingsInFlight[tuple[str, str]] = field(default_factory=EncodingsInFlight)

    @property
    def geometry(self) -> ImageGeometry:
        return ImageGeometry(
            self.facts.shortest_edge, self.facts.crop_height, self.facts.crop_width
        )


# Prompts tokenized at a time: a request's first over-long prompt ends the tokenizing.
LENGTH_CHECK_SLICE = 64
# Prompts encoded per chunk, in text passes: each chunk is cached and shared when it is back
# (model/encodings_in_flight.py); between two chunks of a request, its pass slots wait for one pass.
CHUNK_PASSES = 16
# Up to this many prompts (about 10 ms of the tokenizer) are tokenized on the event loop;
# more go to a thread. The seed's request has six, cached after the first time.
TOKENIZE_ON_THE_LOOP = 256


def class_name_field(index: int) -> str:
    """Where `/invocations`' prompt `index` came from: its class's name."""
    return f"classes[{index}][0]"


def class_and_template_field(index: int) -> str:
    """... where the caller sent its own template: the class's name with it (the name alone
    had been blamed for a long template, as /classify's labels had been)."""
    return f"{class_name_field(index)} with template"


def checked_token_ids(
    context: InvocationContext,
    prompts: Sequence[str],
    locate: Callable[[int], str],
) -> list[Sequence[int]]:
    """Each prompt's token ids, refusing the first prompt over the model's token limit (422,
    naming the field: `locate(prompt index)`).

    Truncating would silently change what is asked, and the original's response shape has no
    place to say so. Tokenized `LENGTH_CHECK_SLICE` at a time, so the first over-long prompt
    ends the work without tokenizing the 100,000 behind it.
    """
    limit = context.facts.max_text_tokens
    token_ids: list[Sequence[int]] = []
    for start in range(0, len(prompts), LENGTH_CHECK_SLICE):
        token_ids += context.tokenize(list(prompts[start : start + LENGTH_CHECK_SLICE]))
        for index in range(start, len(token_ids)):
            if (count := len(token_ids[index])) > limit:
                raise RequestError(
                    422,
                    "invalid_request",
                    f"{locate(index)}: the prompt is {count} tokens long; "
                    f"the model reads at most {limit} (shorten the text or template)",
                )
    return token_ids


async def prompt_token_ids(
    context: InvocationContext,
    prompts: Sequence[str],
    locate: Callable[[int], str],
) -> list[Sequence[int]]:
    """`checked_token_ids`, on a thread for a request of many prompts: 100,000 take about 3 s
    of the tokenizer, which on the event loop held every other request of the API worker,
    `/ping` included, for as long (5.8 s with one API worker, when they were tokenized twice)."""
    if len(prompts) <= TOKENIZE_ON_THE_LOOP:
        return checked_token_ids(context, prompts, locate)
    return await asyncio.to_thread(checked_token_ids, context, prompts, locate)


def check_prompt_sizes(
    context: InvocationContext,
    labels: Sequence[str],
    templates: Sequence[str],
    locate: Callable[[int], str],
) -> None:
    """Refuse, before any prompt is made, a template that would make one longer than
    `context.max_prompt_chars` with the longest label (422, naming them). Measured before
    this check: 40 labels of 300 characters and 40 templates of the slot 148 times made
    1,600 prompts of 45,000 characters, which held an API worker's event loop for 27 s (its
    `/ping` waited as long) and grew it by 300 MB, for a 28-kB request."""
    longest = max(range(len(labels)), key=lambda index: len(labels[index]))
    for index, template in enumerate(templates):
        if (length := filled_length(template, labels[longest])) > context.max_prompt_chars:
            raise RequestError(
                422,
                "invalid_request",
                f"{locate(longest * len(templates) + index)}: the prompt would be {length} "
                f"characters long, over the {context.max_prompt_chars} taken (shorten the "
                "label or the template, and use the template's slot once)",
            )


@dataclass
class PromptPlan:
    """A request's prompts, split by the text cache: the embeddings it holds, and the distinct
    prompts it does not with their checked token ids (the only ones tokenized)."""

    prompts: Sequence[str]
    cached: list[np.ndarray | None]
    missing_ids: dict[str, Sequence[int]]  # the distinct missing prompts, in request order


async def plan_prompts(
    context: InvocationContext, prompts: Sequence[str], locate: Callable[[int], str]
) -> PromptPlan:
    """Look `prompts` up in the text cache and tokenize (checking their lengths) only the
    distinct ones it lacks. A cached prompt passed the length check when it was encoded, so
    the first over-long prompt is still the one named. A repeated 80,000-prompt ensemble
    (1,000 labels x 80 templates, all cached, tiny model) took 2.2 s when every prompt was
    tokenized, 0.14 s now."""
    tag = context.facts.tag
    cached = context.text_cache.lookup([(tag, prompt) for prompt in prompts])
    first_index = first_misses(prompts, cached)
    missing = list(first_index)
    positions = list(first_index.values())
    missing_ids = await prompt_token_ids(context, missing, lambda i: locate(positions[i]))
    return PromptPlan(prompts, cached, dict(zip(missing, missing_ids, strict=True)))


@dataclass
class LabelPlan:
    """A `/classify` request's labels, split by the label cache: the ensembled embeddings it
    holds, and the prompts of the distinct labels it does not, planned like any prompts."""

    keys: list[LabelKey]
    cached: list[np.ndarray | None]
    missing: list[LabelKey]  # the distinct missing labels' keys, in request order
    prompts: PromptPlan | None  # their prompts, label-major; None when every label is cached
    template_count: int


async def plan_labels(
    context: InvocationContext,
    labels: Sequence[str],
    templates: Sequence[str],
    locate: Callable[[int], str],
) -> LabelPlan:
    """Look `labels` up in the label cache, and plan the prompts (`plan_prompts`) of only the
    distinct labels it lacks; `locate` names a prompt by its place among all the request's.

    A repeated ensemble (1,000 labels x 80 templates, tiny model) was answered in 83-96 ms with
    all its prompts cached, most of it making, looking up, stacking and averaging its 80,000
    prompts, and in 13-15 s with the default cache, smaller than such an ensemble: every prompt
    encoded again. Now in 8-24 ms either way: the label cache holds one embedding per label, so
    the default holds 4,096 labels' ensembles.
    """
    tag = context.facts.tag
    # one string: hashed once for every label's key, compared in one go on a hit
    templates_key = json.dumps(list(templates))
    keys = [(tag, templates_key, label) for label in labels]
    cached = context.label_cache.lookup(keys)
    first_index = first_misses(keys, cached)
    count = len(templates)
    if not first_index:
        return LabelPlan(keys, cached, [], None, count)
    positions = list(first_index.values())
    prompts = ensemble_prompts([labels[index] for index in positions], templates)

    def locate_missing(index: int) -> str:
        return locate(positions[index // count] * count + index % count)

    plan = await plan_prompts(context, prompts, locate_missing)
    return LabelPlan(keys, cached, list(first_index), plan, count)


async def label_embeddings(context: InvocationContext, plan: LabelPlan) -> np.ndarray:
    """The ensembled embedding of each of `plan`'s labels, in order: the cached ones, and the
    missing ones from their prompts' embeddings (`text_embeddings`), then cached."""
    if plan.prompts is None:
        return np.stack(plan.cached)
    fresh = ensemble_embeddings(await text_embeddings(context, plan.prompts), plan.template_count)
    context.label_cache.store(plan.missing, fresh)
    return with_cached(plan.keys, plan.cached, plan.missing, fresh)


async def text_embeddings(context: InvocationContext, plan: PromptPlan) -> np.ndarray:
    """The embeddings of `plan`'s prompts, in order: the cached ones, and the missing ones
    encoded (or awaited where another request of this worker is encoding them) and cached."""
    if not plan.missing_ids:
        return np.stack(plan.cached)
    tag = context.facts.tag

    async def encode(chunk: list[tuple[str, str]]) -> np.ndarray:
        token_ids = [list(plan.missing_ids[prompt]) for _, prompt in chunk]
        embeddings = np.asarray(await context.encode_tokens(token_ids), dtype=np.float32)
        context.text_cache.store(chunk, embeddings)
        return embeddings

    chunk_size = CHUNK_PASSES * context.facts.max_text_batch
    missing = list(plan.missing_ids)
    keys = [(tag, prompt) for prompt in missing]
    # Looked up again, with no await before the prompts join those in flight: another request
    # may have encoded them while this one was tokenizing (its chunks gone by then), and they
    # had been encoded again.
    late = context.text_cache.lookup(keys)
    still_missing = [key for key, row in zip(keys, late, strict=True) if row is None]
    if still_missing:
        fresh = await context.texts_in_flight.embeddings(still_missing, encode, chunk_size)
        rows = with_cached(keys, late, still_missing, fresh)
    else:
        rows = np.stack(late)
    return with_cached(plan.prompts, plan.cached, missing, rows)


async def image_embeddings(
    context: InvocationContext, images: Sequence[str], field: str = "images"
) -> np.ndarray:
    """One embedding per image, in order: decoded pixels and forwarded JPEGs are encoded by
    their own runner calls, at the same time."""
    loaded = await load_images(
        images, context.http_client, context.geometry, context.image_limits, field
    )
    pixel_rows = [i for i, item in enumerate(loaded) if isinstance(item, np.ndarray)]
    jpeg_rows = [i for i, item in enumerate(loaded) if isinstance(item, bytes)]
    calls = []
    if pixel_rows:
        pixels = [loaded[i] for i in pixel_rows]
        # one image (the common request) goes as a view: the runner call copies it anyway
        calls.append(
            context.encode_images(pixels[0][None] if len(pixels) == 1 else np.stack(pixels))
        )
    if jpeg_rows:
        if context.encode_jpegs is None:
            raise RuntimeError("JPEGs were forwarded but the context has no encode_jpegs")
        calls.append(context.encode_jpegs([loaded[i] for i in jpeg_rows]))
    outputs = await asyncio.gather(*calls)
    embeddings = np.empty((len(loaded), outputs[0].shape[1]), dtype=np.float32)
    for rows, output in zip([r for r in (pixel_rows, jpeg_rows) if r], outputs, strict=True):
        embeddings[rows] = output
    for row in jpeg_rows:
        if np.isnan(embeddings[row]).any():
            reason = "not a decodable image (the JPEG decoder refused it)"
            raise ImageError(row, reason, field=field)
    return embeddings


async def images_and_texts(
    context: InvocationContext,
    images: Sequence[str],
    texts: Awaitable[np.ndarray],
    image_field: str = "images",
) -> tuple[np.ndarray, np.ndarray]:
    """Image and text embeddings, the images loading while `texts` are looked up/encoded."""
    image_task = asyncio.ensure_future(image_embeddings(context, images, image_field))
    try:
        text = await texts
    except BaseException:
        image_task.cancel()
        await asyncio.gather(image_task, return_exceptions=True)
        raise
    return await image_task, text


async def invoke(
    context: InvocationContext,
    images: Sequence[str],
    classes: Sequence[tuple[str, bool]],
    template: str,
    top_k: int,
) -> list[dict[str, Any]]:
    """The original container's answer for one request: one prediction per image, in order."""
    names = [name for name, _ in classes]
    flags = [flag for _, flag in classes]
    locate = class_name_field if template == DEFAULT_TEMPLATE else class_and_template_field
    check_prompt_sizes(context, names, [template], locate)
    prompts = build_prompts(names, template)
    plan = await plan_prompts(context, prompts, locate)
    image, text = await images_and_texts(context, images, text_embeddings(context, plan))
    probabilities = zero_shot_probabilities(image, text, context.facts.logit_scale)
    return [predict(row, names, flags, top_k) for row in probabilities]


async def classify(
    context: InvocationContext,
    images: Sequence[str],
    labels: Sequence[str],
    templates: Sequence[str],
    top_k: int | None,
    label_field: str = "labels",
    image_field: str = "images",
    template_field: Callable[[int], str] | None = None,
) -> list[list[dict[str, Any]]]:
    """Per image, `[{"label", "score"}]` by descending score; several templates are ensembled.

    An over-long prompt is named by its label and, where the caller sent the template
    (`template_field` names template i), its template: the label alone had been blamed for a
    long template.
    """
    count = len(templates)

    def locate(index: int) -> str:
        label = f"{label_field}[{index // count}]"
        if template_field is None:
            return label
        return f"{label} with {template_field(index % count)}"

    check_prompt_sizes(context, labels, templates, locate)
    plan = await plan_labels(context, labels, templates, locate)
    image, text = await images_and_texts(
        context, images, label_embeddings(context, plan), image_field
    )
    probabilities = zero_shot_probabilities(image, text, context.facts.logit_scale)
    return [ranked_labels(row, labels, top_k) for row in probabilities]


async def embed_texts(context: InvocationContext, texts: Sequence[str]) -> np.ndarray:
    """Unit-length text embeddings (cached like prompts); over-long texts are refused."""
    plan = await plan_prompts(context, texts, lambda index: f"texts[{index}]")
    return await text_embeddings(context, plan)
