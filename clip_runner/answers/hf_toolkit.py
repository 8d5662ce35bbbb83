"""The Hugging Face SageMaker toolkit's zero-shot image classification shape, mapped to ours.

Clients written for `sagemaker-huggingface-inference-toolkit` send
`{"inputs": <image or list of images>, "parameters": {"candidate_labels": [...],
"hypothesis_template": "This is a photo of {}."}}` and read `[{"score", "label"}]` sorted by
score (a list of such lists for a list of images), the transformers pipeline's output. SageMaker
clients that send raw image bytes pass the labels in the `X-Amzn-SageMaker-Custom-Attributes`
header instead (`labels=cat,dog`), which `parse_custom_attributes` reads.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote

from clip_runner.answers.prompts import automatic_slots, check_template
from clip_runner.config import get_settings
from clip_runner.errors import RequestError, quoted

# transformers' ZeroShotImageClassificationPipeline default.
DEFAULT_HYPOTHESIS_TEMPLATE = "This is a photo of {}."
CUSTOM_ATTRIBUTES_HEADER = "X-Amzn-SageMaker-Custom-Attributes"


@dataclass(frozen=True)
class ZeroShotRequest:
    """A toolkit request in our terms: images, labels and the one template."""

    images: list[str]
    labels: list[str]
    template: str
    single_image: bool  # `inputs` was one image: the answer is one list, not a list of lists


def _invalid(message: str) -> RequestError:
    return RequestError(422, "invalid_request", message)


def parse_candidate_labels(value: Any) -> list[str]:
    """A list of label strings, or one comma-separated string, within the bounds `classes`
    and `/classify`'s labels have. The string is this server's own reading, as transformers'
    text zero-shot pipeline splits one: the image pipeline would iterate it character by
    character (`"cat,dog"` -> seven one-character labels)."""
    if isinstance(value, str):
        value = [label.strip() for label in value.split(",")]
    if not isinstance(value, list) or not value:
        raise _invalid("parameters.candidate_labels: give a non-empty list of labels")
    settings = get_settings()
    if len(value) > settings.max_classes_per_request:
        raise _invalid(
            f"parameters.candidate_labels: at most {settings.max_classes_per_request} labels "
            f"per request, not {len(value)}"
        )
    for index, label in enumerate(value):
        if not isinstance(label, str) or not label.strip():
            raise _invalid(f"parameters.candidate_labels[{index}]: must be a non-empty string")
        _check_length(f"parameters.candidate_labels[{index}]", label)
    return list(value)


def _check_length(field: str, text: str) -> None:
    most = get_settings().max_class_name_chars
    if len(text) > most:
        raise _invalid(f"{field}: at most {most} characters, not {len(text)}")


def pipeline_template(template: Any) -> str:
    """The pipeline's `hypothesis_template.format(label)` as this project's template, by
    `/classify`'s rules (prompts.check_template): a slot with a format spec, a conversion or a
    lookup is refused rather than evaluated on caller text (`{0.x}` raised where no 4xx was made:
    a 500, and a JSON Lines mini-batch left unanswered); so is an empty template (it had become
    the default unasked), one without a slot, and one of two `{}` slots, which the pipeline
    cannot fill either."""
    if not isinstance(template, str):
        raise _invalid("parameters.hypothesis_template: must be a string")
    try:
        check_template(template)
    except ValueError as exc:
        raise _invalid(f"parameters.hypothesis_template: {exc}") from None
    if (slots := automatic_slots(template)) > 1:  # /classify fills each; the pipeline fails
        raise _invalid(
            f"parameters.hypothesis_template: {slots} {{}} slots, which the pipeline cannot fill "
            "(str.format with one label raises at the second); write {0} for each"
        )
    return template


def parse_zero_shot_request(inputs: Any, parameters: Any) -> ZeroShotRequest:
    """Validate the toolkit's body; errors name the field as the caller wrote it."""
    single_image = isinstance(inputs, str)
    images = [inputs] if single_image else inputs
    if not isinstance(images, list) or not images:
        raise _invalid("inputs: give an image (URL, base64 or data: URI) or a list of them")
    most = get_settings().max_images_per_request
    if len(images) > most:
        raise _invalid(f"inputs: at most {most} images per request, not {len(images)}")
    for index, image in enumerate(images):
        if not isinstance(image, str):
            raise _invalid(f"inputs[{index}]: must be a string (URL, base64 or data: URI)")
    if not isinstance(parameters, dict) or "candidate_labels" not in parameters:
        raise _invalid('parameters.candidate_labels: required, e.g. {"candidate_labels": [...]}')
    template = parameters.get("hypothesis_template")
    template = DEFAULT_HYPOTHESIS_TEMPLATE if template is None else pipeline_template(template)
    _check_length("parameters.hypothesis_template", template)
    labels = parse_candidate_labels(parameters["candidate_labels"])
    return ZeroShotRequest(images, labels, template, single_image)


def toolkit_answer(
    ranked_per_image: Sequence[Sequence[dict[str, Any]]], single_image: bool
) -> list[Any]:
    """The pipeline's output shape: `[{"score", "label"}]`, or one such list per image."""
    answers = [
        [{"score": item["score"], "label": item["label"]} for item in ranked]
        for ranked in ranked_per_image
    ]
    return answers[0] if single_image else answers


# The attributes this service reads; a repeated one is refused (the last one had won, unsaid).
READ_ATTRIBUTES = ("labels", "template")


def parse_custom_attributes(header: str) -> dict[str, str]:
    """`labels=cat,dog;template=a photo of a {}` -> {"labels": "cat,dog", "template": ...}.

    Pairs are separated by `;`; values may be percent-encoded (`%2C` for a comma inside a label,
    `%3B` for a semicolon). Keys are case-insensitive.
    """
    attributes: dict[str, str] = {}
    for pair in header.split(";"):
        key, separator, value = pair.partition("=")
        key = key.strip().lower()
        if separator and key:
            if key in attributes and key in READ_ATTRIBUTES:
                raise RequestError(
                    400, "bad_request", f"{CUSTOM_ATTRIBUTES_HEADER} names {key} twice"
                )
            attributes[key] = value.strip()
    return attributes


def percent_decoded(value: str, named: str) -> str:
    """A percent-encoded attribute value, whose bytes must be UTF-8 (`caf%C3%A9`): `caf%E9` had
    become `caf\ufffd`, unsaid, and the answer's label matched no label the caller sent."""
    try:
        return unquote(value, errors="strict")
    except UnicodeDecodeError:
        raise RequestError(
            400,
            "bad_request",
            f"{CUSTOM_ATTRIBUTES_HEADER} {named}: {quoted(value)!r} is not UTF-8 once "
            "percent-decoded (encode a label's UTF-8 bytes: caf%C3%A9 for café)",
        ) from None


def labels_from_custom_attributes(header: str | None) -> tuple[list[str], str | None]:
    """The labels (required) and optional template a raw-image request carries in its header.
    A blank label among others is kept, for the request's checks to refuse by its place as
    sent (`cat,,dog`: labels[1]); an empty `template=` is a template, refused there as the JSON
    shape's is (it had become the default template, unasked)."""
    attributes = parse_custom_attributes(header or "")
    items = attributes.get("labels", "").split(",")
    labels = [percent_decoded(item, f"labels[{i}]").strip() for i, item in enumerate(items)]
    if not any(labels):
        raise RequestError(
            400,
            "missing_labels",
            f"a raw image body needs its labels in the {CUSTOM_ATTRIBUTES_HEADER} header, "
            "e.g. 'labels=cat,dog' (optionally ';template=a photo of a {}')",
        )
    template = attributes.get("template")
    return labels, None if template is None else percent_decoded(template, "template")
