"""The Hugging Face SageMaker toolkit's zero-shot shape and the custom-attributes header."""

from __future__ import annotations

import pytest

from clip_runner.answers.hf_toolkit import (
    DEFAULT_HYPOTHESIS_TEMPLATE,
    labels_from_custom_attributes,
    parse_custom_attributes,
    parse_zero_shot_request,
    toolkit_answer,
)
from clip_runner.answers.prompts import fill_template
from clip_runner.errors import RequestError


def test_one_image_and_defaults():
    request = parse_zero_shot_request("aGk=", {"candidate_labels": ["cat", "dog"]})
    assert request.images == ["aGk="] and request.single_image
    assert request.labels == ["cat", "dog"] and request.template == DEFAULT_HYPOTHESIS_TEMPLATE


def test_a_list_of_images_comma_separated_labels_and_a_template():
    request = parse_zero_shot_request(
        ["a", "b"], {"candidate_labels": "cat, dog", "hypothesis_template": "a {} here"}
    )
    assert request.images == ["a", "b"] and not request.single_image
    assert request.labels == ["cat", "dog"] and request.template == "a {} here"


@pytest.mark.parametrize(
    ("template", "label"),
    [
        ("This is a photo of {}.", "cat"),
        ("a photo of {0}", "cat"),  # a numbered slot, as str.format has it
        ("{0}, {0} and {0}", "dog"),
        ("a {} {{braced}} thing", "cat"),  # doubled braces are literal ones
        ("{}", "a red car"),
        ("{0!s} and more", "cat"),
        ("{} {{}}", "cat"),  # a literal {} beside the slot
    ],
)
def test_a_template_fills_as_the_pipelines_str_format(template, label):
    """transformers' pipeline makes each prompt as `hypothesis_template.format(label)`."""
    parameters = {"candidate_labels": [label], "hypothesis_template": template}
    request = parse_zero_shot_request("x", parameters)
    assert fill_template(request.template, label) == template.format(label)


def test_the_originals_name_slot_is_taken_in_the_toolkit_shape_too():
    parameters = {"candidate_labels": ["cat"], "hypothesis_template": "a {name} here"}
    assert fill_template(parse_zero_shot_request("x", parameters).template, "cat") == "a cat here"


@pytest.mark.parametrize(
    "template",
    [
        *("", "no slot", "{1}", "{label}", "a {", "{{}}", "{name} {}", "{} {0}", 3),
        *("{{name}} {}", "a photo of a {name:}"),  # a {name} that is not the label's slot
        # evaluated on the label by str.format (an attribute lookup on caller text raised
        # AttributeError: a 500), or a prompt this server would not build alike
        *("{0.x}", "{0[x]}", "{0[0]}", "{:>10}", "{0!r}", "{!a}"),
        # two automatic slots: str.format(label) raises IndexError at the second (the toolkit's
        # container failed); they had been answered, the label in each
        *("a {} or a {}", "{} {} {}", "a {} {!s}"),
    ],
)
def test_templates_the_pipeline_could_not_fill_or_fills_without_the_label_are_refused(template):
    """An empty one among them: it had been replaced by the default unasked."""
    if isinstance(template, str) and template.count("{}") + template.count("{!s}") > 1:
        with pytest.raises(IndexError):
            template.format("a")  # what the pipeline does with it
    with pytest.raises(RequestError) as raised:
        parse_zero_shot_request("x", {"candidate_labels": ["a"], "hypothesis_template": template})
    assert raised.value.status == 422
    assert raised.value.message.startswith("parameters.hypothesis_template: ")


@pytest.mark.parametrize(
    ("inputs", "parameters", "field"),
    [
        ([], {"candidate_labels": ["a"]}, "inputs"),
        ([3], {"candidate_labels": ["a"]}, "inputs[0]"),
        ("x", None, "parameters.candidate_labels"),
        ("x", {"candidate_labels": []}, "parameters.candidate_labels"),
        ("x", {"candidate_labels": ["a", " "]}, "parameters.candidate_labels[1]"),
        ("x", {"candidate_labels": ["a"], "hypothesis_template": "no slot"}, "hypothesis_template"),
        (["x"] * 33, {"candidate_labels": ["a"]}, "inputs: at most 32 images per request, not 33"),
        (
            "x",
            {"candidate_labels": [f"l{index}" for index in range(1001)]},
            "parameters.candidate_labels: at most 1000 labels per request, not 1001",
        ),
        (
            "x",
            {"candidate_labels": "a, " + "b" * 301},
            "parameters.candidate_labels[1]: at most 300 characters, not 301",
        ),
        (
            "x",
            {"candidate_labels": ["a"], "hypothesis_template": "{} " + "c" * 298},
            "parameters.hypothesis_template: at most 300 characters, not 301",
        ),
    ],
)
def test_mistakes_name_the_field(inputs, parameters, field):
    with pytest.raises(RequestError) as raised:
        parse_zero_shot_request(inputs, parameters)
    assert raised.value.status == 422 and field in raised.value.message


def test_answers_take_the_pipelines_shape():
    ranked = [[{"label": "dog", "score": 0.7}, {"label": "cat", "score": 0.3}]]
    assert toolkit_answer(ranked, single_image=True) == [
        {"score": 0.7, "label": "dog"},
        {"score": 0.3, "label": "cat"},
    ]
    assert toolkit_answer(ranked * 2, single_image=False) == [ranked[0]] * 2
    assert list(toolkit_answer(ranked, single_image=True)[0]) == ["score", "label"]


def test_custom_attributes():
    assert parse_custom_attributes("labels=cat,dog; Template=a {} ;junk;=x") == {
        "labels": "cat,dog",
        "template": "a {}",
    }
    labels, template = labels_from_custom_attributes("labels=cat, hot%2C dog;template=a%3B{}")
    assert labels == ["cat", "hot, dog"] and template == "a;{}"
    assert labels_from_custom_attributes("labels=cat") == (["cat"], None)


def test_attribute_values_are_read_as_sent_or_refused():
    # An empty template is one (refused by the request's checks, as the JSON shape's is): it had
    # become the default template, unasked.
    assert labels_from_custom_attributes("labels=cat;template=") == (["cat"], "")
    # A blank label keeps its place, for the checks to name it as sent (it had been dropped,
    # and the labels after it named one place early).
    assert labels_from_custom_attributes("labels=cat,,%20,dog")[0] == ["cat", "", "", "dog"]
    with pytest.raises(RequestError, match=r"labels\[1\]: 'caf%E9' is not UTF-8") as raised:
        labels_from_custom_attributes("labels=dog,caf%E9")  # had become 'caf\ufffd', unsaid
    assert raised.value.status == 400
    for twice in ("labels=cat;labels=dog", "labels=cat;template={};Template=a {}"):
        with pytest.raises(RequestError, match="names (labels|template) twice"):
            labels_from_custom_attributes(twice)  # the last one had won
    assert parse_custom_attributes("trace=1;trace=2;labels=a")["trace"] == "2"  # not ours


@pytest.mark.parametrize("header", [None, "", "template=a {}", "labels=", "labels= , "])
def test_missing_labels_are_a_400_naming_the_header(header):
    with pytest.raises(RequestError) as raised:
        labels_from_custom_attributes(header)
    assert raised.value.status == 400
    assert "X-Amzn-SageMaker-Custom-Attributes" in raised.value.message
