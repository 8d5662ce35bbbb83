"""Integration: `/classify`, `/embed_images`, `/embed_texts`, the Hugging Face toolkit's shape and
raw image bodies on `/invocations`, against a real `bentoml serve` of the tiny model, checked
against transformers computed directly."""

from __future__ import annotations

import asyncio
import base64
import json
import time

import bentoml
import httpx
import numpy as np
import pytest
import torch

from clip_runner.answers.embedding_format import decode_base64_embedding
from clip_runner.answers.hf_toolkit import DEFAULT_HYPOTHESIS_TEMPLATE
from clip_runner.answers.runner_calls import TEXT_CALL_MAX_PASSES
from clip_runner.model.pass_layout import CPU_MAX_BATCH, TEXT_BATCH_FACTOR
from tests.helpers import (
    as_base64,
    assert_same_answer,
    counts_by_result,
    encode,
    histogram,
    photo_like,
)
from tests.reference import reference_probabilities

LABELS = ["cat", "dog", "person with a bag", "car"]


TEXT_LOOKUPS = "clip_service_text_cache_lookups"


def post(served, route: str, body=None, **kwargs) -> httpx.Response:
    return httpx.post(f"{served.url}{route}", json=body, timeout=30, **kwargs)


def unit(rows: torch.Tensor) -> np.ndarray:
    return (rows / rows.norm(dim=-1, keepdim=True)).numpy()


def reference_image_embeddings(clip, images) -> np.ndarray:
    inputs = clip.processor(images=images, return_tensors="pt")
    with torch.inference_mode():
        return unit(clip.model.get_image_features(**inputs).pooler_output)


def reference_text_embeddings(clip, texts) -> np.ndarray:
    tokens = clip.processor(text=texts, return_tensors="pt", padding=True)
    with torch.inference_mode():
        return unit(clip.model.get_text_features(**tokens).pooler_output)


def reference_ensemble(clip, picture, labels: list[str], templates: list[str]) -> np.ndarray:
    """transformers' probabilities of `labels` for `picture`, each label's prompts (one per
    template) averaged as CLIP's prompt ensembling does."""
    prompts = [t.replace("{name}", "{}").format(label) for label in labels for t in templates]
    per_prompt = reference_text_embeddings(clip, prompts)
    per_label = per_prompt.reshape(len(labels), len(templates), -1).mean(axis=1)
    per_label /= np.linalg.norm(per_label, axis=1, keepdims=True)
    image = reference_image_embeddings(clip, [picture])
    logits = float(clip.model.logit_scale.detach().exp()) * image @ per_label.T
    return torch.tensor(logits).softmax(dim=-1).numpy()[0]


def scores_by_label(ranked: list[dict]) -> dict[str, float]:
    return {item["label"]: item["score"] for item in ranked}


@pytest.fixture(scope="module")
def pictures():
    return [photo_like(300, 200, seed=21), photo_like(180, 260, seed=22)]


def test_classify_matches_transformers_and_sorts(served, tiny_clip, tiny_stored_model, pictures):
    response = post(
        served, "/classify", {"images": [as_base64(p) for p in pictures], "labels": LABELS}
    )
    assert response.status_code == 200, response.text
    answer = response.json()
    assert answer["model"] == str(tiny_stored_model.tag)
    reference = reference_probabilities(
        tiny_clip, pictures, [f"a photo of a {label}" for label in LABELS]
    )
    assert len(answer["results"]) == 2
    for ranked, row in zip(answer["results"], reference, strict=True):
        assert [item["label"] for item in ranked] == [LABELS[i] for i in np.argsort(-row)]
        scores = scores_by_label(ranked)
        np.testing.assert_allclose([scores[label] for label in LABELS], row, atol=1e-5)


def test_classify_ensembles_templates_and_cuts_at_top_k(served, tiny_clip, pictures):
    # filled as str.format fills them (the last had kept its braces doubled, a prompt no CLIP
    # template list meant), or the original's {name}
    templates = [
        "a photo of a {}.",
        "a blurry photo of the {name}",
        "art of a {0}",
        "a {{sketch}}: {}",
    ]
    body = {"images": [as_base64(pictures[0])], "labels": LABELS, "templates": templates}
    answer = post(served, "/classify", {**body, "top_k": 2}).json()
    expected = reference_ensemble(tiny_clip, pictures[0], LABELS, templates)
    ranked = answer["results"][0]
    assert len(ranked) == 2
    assert [item["label"] for item in ranked] == [LABELS[i] for i in np.argsort(-expected)[:2]]
    np.testing.assert_allclose(
        [item["score"] for item in ranked], np.sort(expected)[::-1][:2], atol=1e-5
    )


def test_many_prompts_are_encoded_in_bounded_calls_and_passes_and_match_transformers(
    served, tiny_clip, pictures
):
    """120 labels x 20 templates: 2,400 prompts, which went to the runner as one call and one
    forward pass (as 100,000 would have); now in calls of at most TEXT_CALL_MAX_PASSES text
    batches and passes of at most one, and in order."""
    labels = [f"thing number {index}" for index in range(120)]
    templates = [f"picture {index} of a {{}}" for index in range(20)]
    calls_before, sent_before = histogram(served, "clip_service_runner_call_texts")
    passes_before, encoded_before = histogram(served, "clip_runner_batch_texts")
    body = {"images": [as_base64(pictures[0])], "labels": labels, "templates": templates}
    response = httpx.post(f"{served.url}/classify", json=body, timeout=120)
    assert response.status_code == 200, response.text
    calls_after, sent_after = histogram(served, "clip_service_runner_call_texts")
    passes_after, encoded_after = histogram(served, "clip_runner_batch_texts")
    prompts = len(labels) * len(templates)
    text_batch = TEXT_BATCH_FACTOR * CPU_MAX_BATCH  # CLIP_MAX_TEXT_BATCH_SIZE's CPU default
    assert sent_after - sent_before == prompts
    assert calls_after - calls_before >= prompts / (TEXT_CALL_MAX_PASSES * text_batch)
    assert passes_after - passes_before >= prompts / text_batch
    assert encoded_after - encoded_before >= prompts
    expected = reference_ensemble(tiny_clip, pictures[0], labels, templates)
    scores = scores_by_label(response.json()["results"][0])
    np.testing.assert_allclose([scores[label] for label in labels], expected, atol=1e-5)


def test_concurrent_lines_with_the_same_new_classes_encode_their_prompts_once(served, pictures):
    """A Batch Transform mini-batch whose lines share a new class list: its lines run at once
    in one API worker, and each used to encode every prompt itself (4 x 200 here)."""
    classes = [[f"shared thing {index}", 0] for index in range(200)]
    line = json.dumps({"images": [as_base64(pictures[0])], "classes": classes})
    sent_before = histogram(served, "clip_service_runner_call_texts")[1]
    looked_up_before = counts_by_result(served, TEXT_LOOKUPS)
    response = httpx.post(
        f"{served.url}/invocations",
        content="\n".join([line] * 4),
        headers={"Content-Type": "application/jsonlines"},
        timeout=60,
    )
    assert response.status_code == 200, response.text
    answers = [json.loads(answer)[0] for answer in response.text.splitlines()]
    assert len(answers) == 4
    for answer in answers[1:]:  # the same within the batches' rounding
        assert answer["prompts"][:2] == answers[0]["prompts"][:2]
        np.testing.assert_allclose(answer["prompts"][2], answers[0]["prompts"][2], atol=1e-6)
    assert histogram(served, "clip_service_runner_call_texts")[1] - sent_before == 200
    # 800 lookups: 200 misses (encoded), the rest awaited from the line encoding them (shared)
    # or found cached if that line was done first; the awaited ones had counted as misses.
    looked_up = counts_by_result(served, TEXT_LOOKUPS)
    looked_up.subtract(looked_up_before)
    assert looked_up["miss"] == 200 and looked_up["shared"] > 0, looked_up
    assert looked_up["hit"] + looked_up["shared"] == 600, looked_up


def test_new_prompts_that_several_api_workers_send_are_encoded_once(served, tiny_clip):
    """Each API worker caches only what its own requests encoded, so the same new prompts came
    to the runner once from each worker, and were encoded each time. The requests go on new
    connections (spread over the workers by the kernel) until a second worker has sent them."""
    if len(served.api_processes()) < 2:
        pytest.skip("one API worker on this machine: nothing to share between workers")
    texts = [f"a thing every worker is asked about, number {index}" for index in range(300)]
    sent_before = histogram(served, "clip_service_runner_call_texts")[1]
    encoded_before = histogram(served, "clip_runner_batch_texts")[1]
    expected = reference_text_embeddings(tiny_clip, texts)
    sent = 0.0
    # Which worker accepts a connection is the kernel's choice, and on a busy machine the same
    # one may win many times running: a time limit, not a count (repeats are cache hits).
    give_up_at = time.monotonic() + 60
    while time.monotonic() < give_up_at:
        answer = post(served, "/embed_texts", {"texts": texts}).json()
        np.testing.assert_allclose(answer["embeddings"], expected, atol=1e-5)
        sent = histogram(served, "clip_service_runner_call_texts")[1] - sent_before
        if sent >= 2 * len(texts):
            break
    assert sent == 2 * len(texts), "the requests never reached a second API worker"
    assert histogram(served, "clip_runner_batch_texts")[1] - encoded_before == len(texts)


def test_default_classify_agrees_with_invocations(served, pictures):
    image = as_base64(pictures[1])
    ranked = post(served, "/classify", {"images": [image], "labels": LABELS}).json()["results"][0]
    classes = [[label, 0] for label in LABELS]
    original = post(served, "/invocations", {"images": [image], "classes": classes, "top_k": 4})
    indices, names, probabilities = original.json()[0]["prompts"]
    assert [item["label"] for item in ranked] == names
    assert [item["score"] for item in ranked] == probabilities  # the same math, to the bit


@pytest.mark.parametrize(
    ("body", "status", "words"),
    [
        ({"images": ["aGk="], "labels": []}, 422, ["labels"]),
        ({"images": ["aGk="], "labels": ["a"], "templates": ["no slot"]}, 422, ["templates[0]"]),
        # str.format could not fill these, or which slot gets the label could not be told
        *(
            (
                {"images": ["aGk="], "labels": ["a"], "templates": ["a {}", bad]},
                422,
                ["templates[1]"],
            )
            for bad in ("a {} in {braces}", "{} and {name}", "{} or {0}", "{0.x}", "a {")
        ),
        (
            {"images": ["aGk="], "labels": ["a", " \t"]},
            422,
            ["labels[1]: a label must not be blank"],
        ),
        # a field the route does not take: it had been ignored, the defaults answered
        ({"images": ["aGk="], "labels": ["a"], "topk": 1}, 422, ["topk: no such field"]),
        ({"images": ["aGk="], "labels": ["a"], "template": "a {}"}, 422, ["template: no such"]),
        # worded for a string, not a list ("at most 300 items after validation")
        (
            {"images": ["aGk="], "labels": ["a"], "templates": ["{}" + "x" * 299]},
            422,
            ["templates[0]", "at most 300 characters"],
        ),
        ({"images": ["not an image!"], "labels": ["a"]}, 422, ["images[0]"]),
        ({"images": ["aGk="], "labels": ["a"], "top_k": 0}, 422, ["top_k"]),
        ({"labels": ["a"]}, 422, ["images"]),
    ],
)
def test_classify_mistakes_are_json_errors_naming_the_field(served, body, status, words):
    response = post(served, "/classify", body)
    assert response.status_code == status, response.text
    assert int(response.headers["content-length"]) == len(response.content)
    message = response.json()["error"]["message"]
    assert all(word in message for word in words), message
    assert "inputs" not in message and "parameters." not in message


@pytest.mark.parametrize(
    ("templates", "named"),
    [
        (["a {}", "the {}"], "labels[1] with templates[0]: "),
        (["a {}"], "labels[1] with templates[0]: "),  # the label alone had been blamed
        (None, "labels[1]: "),  # the default template: the label's
    ],
)
def test_long_prompts_are_refused_naming_label_and_the_template_sent(
    served, pictures, templates, named
):
    body = {"images": [as_base64(pictures[0])], "labels": ["cat", "very " * 50 + "long"]}
    response = post(served, "/classify", body | ({"templates": templates} if templates else {}))
    assert response.status_code == 422
    assert response.json()["error"]["message"].startswith(named)


def test_a_long_toolkit_prompt_names_the_template_sent(served, pictures):
    parameters = {"candidate_labels": ["dog", "cat"], "hypothesis_template": "a " * 100 + "{}"}
    body = {"inputs": as_base64(pictures[0]), "parameters": parameters}
    response = post(served, "/invocations", body)
    assert response.status_code == 422
    assert response.json()["error"]["message"].startswith(
        "parameters.candidate_labels[0] with parameters.hypothesis_template: the prompt is"
    )


def test_image_embeddings_in_both_formats_match_transformers(served, tiny_clip, pictures):
    images = [as_base64(p) for p in pictures]
    as_float = post(served, "/embed_images", {"images": images}).json()
    as_base64_strings = post(
        served, "/embed_images", {"images": images, "encoding_format": "base64"}
    ).json()
    reference = reference_image_embeddings(tiny_clip, pictures)
    assert as_float["dimension"] == reference.shape[1] == 16
    assert (
        as_float["encoding_format"] == "float" and as_base64_strings["encoding_format"] == "base64"
    )
    floats = np.array(as_float["embeddings"], dtype=np.float32)
    decoded = np.stack([decode_base64_embedding(s) for s in as_base64_strings["embeddings"]])
    np.testing.assert_allclose(floats, reference, atol=1e-5)
    assert np.array_equal(decoded, floats)  # same numbers, only the encoding differs


def test_text_embeddings_match_transformers_and_long_texts_are_refused(served, tiny_clip):
    texts = ["a photo of a cat", "a dog", "person with a bag"]
    answer = post(served, "/embed_texts", {"texts": texts}).json()
    np.testing.assert_allclose(
        answer["embeddings"], reference_text_embeddings(tiny_clip, texts), atol=1e-5
    )
    too_long = post(served, "/embed_texts", {"texts": ["ok", "word " * 100]})
    assert too_long.status_code == 422 and "texts[1]" in too_long.json()["error"]["message"]
    bad_format = post(served, "/embed_texts", {"texts": ["a"], "encoding_format": "hex"})
    assert bad_format.status_code == 422 and "encoding_format" in bad_format.text


@pytest.mark.parametrize(
    ("route", "body", "field"),
    [
        ("/embed_texts", {"texts": ["a cat"], "encoding": "base64"}, "encoding"),
        ("/embed_images", {"images": ["aGk="], "format": "base64"}, "format"),
    ],
)
def test_embedding_routes_refuse_fields_they_do_not_take(served, route, body, field):
    """A misspelt `encoding_format` had been ignored: floats answered where base64 was asked."""
    response = post(served, route, body)
    assert response.status_code == 422
    assert response.json()["error"] == {
        "type": "invalid_request",
        "message": f"{field}: no such field (the route's fields are in /docs.json)",
    }


def test_a_body_of_many_unknown_fields_gets_a_short_answer_and_log_line(served):
    """One long key and thousands of short ones: each had been named in the answer and the long
    one logged whole, a 1-MB key making a 1-MB answer and log line."""
    body = {"images": ["aGk="], "labels": ["a"], "x" * 100_000: 1}
    body |= {f"unknown{i}": i for i in range(5000)}
    response = post(served, "/classify", body)
    assert response.status_code == 422 and len(response.content) < 2000
    message = response.json()["error"]["message"]
    assert "(100000 characters): no such field" in message
    assert message.endswith("and 4991 more problems")
    line = served.wait_for_log("rejected request: 5001 validation error(s)").splitlines()
    (logged,) = [text for text in line if "rejected request: 5001 validation" in text]
    assert len(logged) < 1000


def test_hugging_face_toolkit_shape_on_invocations(served, pictures):
    image = as_base64(pictures[0])
    single = post(
        served, "/invocations", {"inputs": image, "parameters": {"candidate_labels": LABELS}}
    )
    assert single.status_code == 200, single.text
    answer = single.json()
    assert [list(item) for item in answer] == [["score", "label"]] * len(LABELS)
    assert [item["score"] for item in answer] == sorted((i["score"] for i in answer), reverse=True)
    expected = post(
        served,
        "/classify",
        {"images": [image], "labels": LABELS, "templates": [DEFAULT_HYPOTHESIS_TEMPLATE]},
    ).json()["results"][0]
    assert scores_by_label(answer) == pytest.approx(scores_by_label(expected), abs=1e-6)
    several = post(
        served,
        "/invocations",
        {
            "inputs": [image, as_base64(pictures[1])],
            "parameters": {"candidate_labels": "cat, dog", "hypothesis_template": "a {} photo"},
        },
    ).json()
    assert len(several) == 2 and all(len(ranked) == 2 for ranked in several)
    assert {item["label"] for item in several[1]} == {"cat", "dog"}


@pytest.mark.parametrize(
    ("body", "words"),
    [
        (
            {"inputs": "aGk=", "images": ["aGk="], "parameters": {"candidate_labels": ["a"]}},
            ["not both"],
        ),
        ({"inputs": "aGk="}, ["parameters.candidate_labels"]),
        ({"inputs": "not an image!", "parameters": {"candidate_labels": ["a"]}}, ["inputs[0]"]),
    ],
)
def test_toolkit_shape_mistakes_name_the_field(served, body, words):
    response = post(served, "/invocations", body)
    assert 400 <= response.status_code < 500, response.text
    message = response.json()["error"]["message"]
    assert all(word in message for word in words), message


def test_raw_image_bodies_with_labels_in_the_sagemaker_header(served, pictures):
    png = encode(pictures[0], "PNG")
    raw = httpx.post(
        f"{served.url}/invocations",
        content=png,
        headers={
            "Content-Type": "image/png",
            "X-Amzn-SageMaker-Custom-Attributes": "labels=cat,dog,person with a bag",
        },
        timeout=30,
    )
    assert raw.status_code == 200, raw.text
    as_json = post(
        served,
        "/invocations",
        {"inputs": as_base64(pictures[0]), "parameters": {"candidate_labels": LABELS[:3]}},
    )
    assert_same_answer(raw.json(), as_json.json())
    jpeg = httpx.post(
        f"{served.url}/invocations",
        content=encode(pictures[1], "JPEG"),
        headers={
            "Content-Type": "image/jpeg",
            "X-Amzn-SageMaker-Custom-Attributes": "labels=cat,dog;template=art of a {}",
        },
        timeout=30,
    )
    assert jpeg.status_code == 200 and len(jpeg.json()) == 2


@pytest.mark.parametrize(
    ("content_type", "fmt"),
    [
        ("image/jpg", "JPEG"),
        ("application/x-image", "JPEG"),
        ("image/gif", "GIF"),
        ("image/bmp", "BMP"),
    ],
)
def test_raw_images_of_any_image_type_are_answered_as_their_json(
    served, pictures, content_type, fmt
):
    """The decoder judges the bytes, as in a JSON request: a JPEG labelled `image/jpg` (a
    common mislabel) or SageMaker's generic `application/x-image`, a GIF, a BMP."""
    data = encode(pictures[0], fmt)
    raw = httpx.post(
        f"{served.url}/invocations",
        content=data,
        headers={
            "Content-Type": content_type,
            "X-Amzn-SageMaker-Custom-Attributes": "labels=café,dog".encode(),
        },
        timeout=30,
    )
    assert raw.status_code == 200, raw.text
    inputs = base64.b64encode(data).decode()
    as_json = post(
        served,
        "/invocations",
        {"inputs": inputs, "parameters": {"candidate_labels": ["café", "dog"]}},
    )
    assert_same_answer(raw.json(), as_json.json())  # the header's UTF-8 label read as UTF-8


@pytest.mark.parametrize(
    ("content", "content_type", "headers", "status", "words"),
    [
        (b"\x89PNG...", "image/png", {}, 400, ["X-Amzn-SageMaker-Custom-Attributes"]),
        (b"", "image/jpeg", {"X-Amzn-SageMaker-Custom-Attributes": "labels=a"}, 400, ["empty"]),
        # errors in the terms of what was sent, not of the toolkit request it became
        (
            b"garbage",
            "image/jpeg; q=1",
            {"X-Amzn-SageMaker-Custom-Attributes": "labels=a"},
            422,
            ["the image/jpeg body: "],
        ),
        (
            b"GIF89a",
            "image/gif",
            {"X-Amzn-SageMaker-Custom-Attributes": "labels=a"},
            422,
            ["the image/gif body: "],
        ),
        (
            encode(photo_like(40, 30, seed=3), "PNG"),
            "image/png",
            {"X-Amzn-SageMaker-Custom-Attributes": "labels=a;template=no slot"},
            422,
            ["X-Amzn-SageMaker-Custom-Attributes template: a template must hold the label's slot"],
        ),
        (  # a long prompt's template named as sent (it had said parameters.hypothesis_template)
            encode(photo_like(40, 30, seed=3), "PNG"),
            "image/png",
            {"X-Amzn-SageMaker-Custom-Attributes": "labels=a;template=a photo of a {}" + " !" * 80},
            422,
            [
                "X-Amzn-SageMaker-Custom-Attributes labels[0] with "
                "X-Amzn-SageMaker-Custom-Attributes template: the prompt is"
            ],
        ),
        (  # a blank label named by its place as sent (it had been dropped, or named early)
            encode(photo_like(40, 30, seed=3), "PNG"),
            "image/png",
            {"X-Amzn-SageMaker-Custom-Attributes": "labels=a,,b"},
            422,
            ["X-Amzn-SageMaker-Custom-Attributes labels[1]"],
        ),
        (  # an empty template is refused as the JSON shape's (it had become the default)
            encode(photo_like(40, 30, seed=3), "PNG"),
            "image/png",
            {"X-Amzn-SageMaker-Custom-Attributes": "labels=a;template="},
            422,
            ["X-Amzn-SageMaker-Custom-Attributes template: "],
        ),
        (
            b"\x00\x00\x00\x18ftypmp42",
            "video/mp4",
            {"X-Amzn-SageMaker-Custom-Attributes": "labels=a"},
            415,
            ["image/*", "application/x-image"],
        ),
    ],
)
def test_raw_image_mistakes(served, content, content_type, headers, status, words):
    response = httpx.post(
        f"{served.url}/invocations",
        content=content,
        headers={"Content-Type": content_type, **headers},
        timeout=30,
    )
    assert response.status_code == status, response.text
    assert int(response.headers["content-length"]) == len(response.content)
    message = response.json()["error"]["message"]
    assert all(word in message for word in words), message
    assert "inputs" not in message and "parameters." not in message


def test_bentoml_clients_speak_every_api(served, pictures):
    image = as_base64(pictures[0])
    with bentoml.SyncHTTPClient(served.url) as client:
        classified = client.classify(images=[image], labels=LABELS, top_k=2)
        image_vectors = client.embed_images(images=[image])
        text_vectors = client.embed_texts(texts=["a cat"], encoding_format="base64")
        toolkit = client.invocations(inputs=image, parameters={"candidate_labels": LABELS})
        # one comma-separated string, as the README allows: it had been sent one label per
        # character (",", "a", "c", ...) and answered 200
        joined = client.invocations(
            inputs=[image], parameters={"candidate_labels": ",".join(LABELS)}
        )
    direct = post(served, "/classify", {"images": [image], "labels": LABELS, "top_k": 2}).json()
    assert_same_answer(classified, direct)
    assert len(image_vectors["embeddings"][0]) == image_vectors["dimension"]
    assert decode_base64_embedding(text_vectors["embeddings"][0]).shape == (16,)
    assert [item["label"] for item in toolkit] == sorted(
        LABELS, key=lambda label: -scores_by_label(toolkit)[label]
    )
    assert_same_answer(joined, [toolkit])  # a list of images: a list per image

    async def with_async_client() -> dict:
        async with bentoml.AsyncHTTPClient(served.url) as client:
            return await client.classify(images=[image], labels=LABELS, top_k=2)

    assert_same_answer(asyncio.run(with_async_client()), direct)


def test_every_api_is_in_the_openapi_schema_with_examples(served):
    schema = httpx.get(f"{served.url}/docs.json", timeout=10).json()
    for route in ("/invocations", "/classify", "/embed_images", "/embed_texts"):
        assert route in schema["paths"], sorted(schema["paths"])
    text = str(schema)
    assert "candidate_labels" in text and "encoding_format" in text
    assert "a blurry photo of a {}." in text  # the templates example


def test_the_demo_page_is_served(served):
    page = httpx.get(f"{served.url}/ui", timeout=10)
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "Classify" in page.text
