"""Request and response models of every API: `/invocations` (the original container's contract,
plus the Hugging Face toolkit's shape), `/classify`, `/embed_images` and `/embed_texts`.

The same annotated types are used by the BentoML API signature in service.py (so they appear in
the OpenAPI schema and drive validation, BentoML's endpoint's and the direct path's alike) and by
`web/jsonlines.InvocationLine`, which parses each JSON Lines record.
"""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import AfterValidator, BaseModel, Field, PlainValidator, Strict, WithJsonSchema

from clip_runner.answers.embedding_format import EncodingFormat
from clip_runner.answers.prompts import check_template
from clip_runner.config import MAX_TEMPLATES, get_settings
from clip_runner.errors import quoted

_settings = get_settings()

# The original container's README example classes (also the benchmarks' and deploy script's).
SEED_CLASSES: list[list[str | int]] = [
    ["person", 1],
    ["bag", 0],
    ["person with a bag", 1],
    ["woman riding a horse", 1],
    ["woman with a bag", 1],
    ["woman with black shirt and a bag", 1],
]
SEED_IMAGE_URL = (
    "https://images.unsplash.com/photo-1597308680537-1ba44407ffc0?ixid=MXwxMjA3fDB8MHxwaG90by1w"
    "YWdlfHx8fGVufDB8fHw%3D&ixlib=rb-1.2.1&auto=format&fit=crop&w=1834&q=80"
)


def _parse_flag(value: Any) -> bool:
    """Flags are 0, 1, true or false: anything else is a caller mistake, not a truthy guess."""
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    raise ValueError(f"flag must be 0, 1, true or false, got {quoted(repr(value))}")


def _check_template(template: str) -> str:
    if "{name}" not in template:
        raise ValueError("template must contain the placeholder {name}")
    return template


Flag = Annotated[
    bool,
    PlainValidator(_parse_flag),
    WithJsonSchema({"anyOf": [{"type": "boolean"}, {"enum": [0, 1]}]}),
]
# Empty, as whitespace-only, is a name: the original answered `["", 1]` with the prompt
# "a photo of a " (`/classify`'s labels refuse both, `_check_label`).
ClassName = Annotated[str, Field(max_length=_settings.max_class_name_chars)]
ClassEntry = tuple[ClassName, Flag]

ImageList = Annotated[
    list[str],
    Field(
        min_length=1,
        max_length=_settings.max_images_per_request,
        description="Images as http(s) or s3://bucket/key URLs, base64 strings or data: URIs.",
        examples=[[SEED_IMAGE_URL]],
    ),
]
ClassList = Annotated[
    list[ClassEntry],
    Field(
        min_length=1,
        max_length=_settings.max_classes_per_request,
        description="[name, flag] pairs; flag (0/1/bool) marks the classes that count as positive.",
        examples=[[["person", 1], ["bag", 0], ["person with a bag", 1]]],
    ),
]
# Field before the validator: a length limit after it is worded for a list ("at most 300 items").
Template = Annotated[
    str,
    Field(
        max_length=_settings.max_class_name_chars,
        description="Prompt template; {name} is replaced by each class name.",
    ),
    AfterValidator(_check_template),
]
# Whole JSON numbers only, as the flags are strict: `true` had been taken as 1, "2" and 2.0 as 2.
WholeNumber = Annotated[int, Strict()]
TopK = Annotated[
    WholeNumber, Field(ge=1, description="How many classes to return per image (<= N).")
]


class Prediction(BaseModel):
    """One image's answer, in the original's exact shape and key order."""

    classification: int = Field(description="1 if a flagged class wins (0.02 tie rule), else 0.")
    confidence: float = Field(description="Probability of the top-1 class.")
    prompts: tuple[list[int], list[str], list[float]] = Field(
        description="[indices into classes, class names, probabilities], top-k descending."
    )


# ---------------------------------------------------------------- beyond the original


def _check_label(label: str) -> str:
    """A label of whitespace only names nothing (the toolkit shape's `candidate_labels` refused
    one already; `/classify` had scored its empty prompt like any other label)."""
    if not label.strip():
        raise ValueError("a label must not be blank")
    return label


Label = Annotated[ClassName, AfterValidator(_check_label)]
LabelList = Annotated[
    list[Label],
    Field(
        min_length=1,
        max_length=_settings.max_classes_per_request,
        description="Plain labels to score each image against.",
        examples=[["cat", "dog", "person with a bag"]],
    ),
]
EnsembleTemplate = Annotated[
    str, Field(max_length=_settings.max_class_name_chars), AfterValidator(check_template)
]
TemplateList = Annotated[
    list[EnsembleTemplate],
    Field(
        min_length=1,
        max_length=MAX_TEMPLATES,
        description=(
            "Prompt templates with {} for the label (filled as str.format fills it: {{ }} are "
            "literal braces) or the original's {name}; several are averaged per label (CLIP's "
            "prompt ensembling). The default matches /invocations."
        ),
        examples=[["a photo of a {}.", "a blurry photo of a {}.", "a close-up photo of a {}."]],
    ),
]
OptionalTopK = Annotated[
    WholeNumber | None,
    Field(ge=1, description="How many labels to return per image; default all, sorted."),
]
TextList = Annotated[
    list[Annotated[str, Field(min_length=1, max_length=_settings.max_class_name_chars)]],
    Field(
        min_length=1,
        max_length=_settings.max_classes_per_request,
        description="Texts to embed (each at most the model's 77 tokens).",
        examples=[["a photo of a cat", "a photo of a dog"]],
    ),
]
EncodingFormatField = Annotated[
    EncodingFormat,
    Field(
        description="float: JSON numbers; base64: each embedding as base64 of little-endian "
        "float32 bytes (np.frombuffer(base64.b64decode(s), '<f4'))."
    ),
]


class LabelScore(BaseModel):
    label: str
    score: float


class ClassifyResponse(BaseModel):
    """`/classify`: per image, labels by descending score."""

    model: str = Field(description="The served model's BentoML tag.")
    results: list[list[LabelScore]] = Field(description="One list per image, in request order.")


class EmbeddingResponse(BaseModel):
    """`/embed_images` and `/embed_texts`: L2-normalised embeddings, one per input, in order."""

    model: str = Field(description="The served model's BentoML tag.")
    dimension: int = Field(description="Length of each embedding.")
    encoding_format: EncodingFormat
    embeddings: list[str | list[float]] = Field(
        description="float: one list of numbers per input; base64: one string per input."
    )


class ZeroShotParameters(BaseModel):
    """The Hugging Face toolkit's `parameters` for zero-shot image classification."""

    # The string first: BentoML's /schema.json keeps an anyOf's first branch only, and its
    # Python client split a string sent to an array field into one label per character.
    candidate_labels: str | list[str] = Field(
        description="Labels, as a list or one comma-separated string.",
        examples=[["cat", "dog"]],
    )
    hypothesis_template: str | None = Field(
        default=None, description='Template with {}; default "This is a photo of {}."'
    )


ToolkitInputs = Annotated[
    str | list[str] | None,
    Field(
        description="Hugging Face toolkit shape: one image (URL, base64, data: URI) or a list. "
        "Send with `parameters` instead of `images`/`classes`; the answer is then "
        '[{"score", "label"}] sorted (a list per image for a list).',
    ),
]
