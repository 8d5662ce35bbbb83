"""The runner's tensor math against transformers' own CLIP forward pass."""

from __future__ import annotations

import copy
import logging

import numpy as np
import pytest
import torch

from clip_runner.images.loading import ImageGeometry, resize_and_crop
from clip_runner.model import encoding
from clip_runner.model.device_wait import to_device
from clip_runner.model.encoding import (
    ClipEncoder,
    cpu_flags,
    padded_batch,
    pick_device,
    raw_pixel_patch_embedding,
)
from clip_runner.model.store import OPENAI_MEAN, OPENAI_STD
from tests.helpers import photo_like


@pytest.fixture(scope="module")
def encoder(tiny_clip) -> ClipEncoder:
    """An encoder on a copy of the model: it changes its model's first layer, and the tests
    compare it with the unchanged one."""
    model = copy.deepcopy(tiny_clip.model)
    return ClipEncoder(model, tiny_clip.processor, torch.device("cpu"), torch.float32)


def test_facts_come_from_the_checkpoint(encoder, tiny_clip):
    facts = encoder.facts(tiny_clip.tag, tiny_clip.random_weights)
    assert facts.logit_scale == pytest.approx(float(tiny_clip.model.logit_scale.detach().exp()))
    assert facts.logit_scale != pytest.approx(100.0)
    assert (facts.shortest_edge, facts.crop_height, facts.crop_width) == (224, 224, 224)
    assert facts.embedding_dim == 16 and facts.max_text_tokens == 77


def test_the_tokenizer_travels_as_json_and_tokenizes_as_the_model_does(encoder, tiny_clip):
    """What the runner sends the API workers (its `tokenizer` API): a copy that gives the same
    ids as the model's own tokenizer."""
    from tokenizers import Tokenizer

    copied = Tokenizer.from_str(encoder.tokenizer_json())
    prompts = ["a photo of a cat", "it's a dog's life, café!"]
    ids = [copied.encode(prompt).ids for prompt in prompts]
    assert ids == tiny_clip.processor.tokenizer(prompts)["input_ids"]


def test_a_tokenizer_without_a_rust_backend_is_refused_by_name(tiny_clip):
    processor = copy.copy(tiny_clip.processor)
    processor.tokenizer = object()  # no backend_tokenizer: what a Python tokenizer lacks
    model = copy.deepcopy(tiny_clip.model)
    encoder = ClipEncoder(model, processor, torch.device("cpu"), torch.float32)
    with pytest.raises(ValueError, match="not backed by the Rust `tokenizers` library"):
        encoder.tokenizer_json()


def test_an_fp16_model_answers_with_the_checkpoints_logit_scale(tiny_clip):
    """On a GPU the model runs in fp16, where its stored ln(scale) rounds (ln 100 to 4.6055,
    whose exp is 100.03): the scale the API multiplies by must stay the checkpoint's."""
    half = ClipEncoder(
        copy.deepcopy(tiny_clip.model), tiny_clip.processor, torch.device("cpu"), torch.float16
    )
    checkpoint = float(tiny_clip.model.logit_scale.detach().exp().item())
    assert half.model.logit_scale.dtype == torch.float16
    assert float(half.model.logit_scale.detach().float().exp()) != checkpoint  # it does round
    assert half.facts(tiny_clip.tag, tiny_clip.random_weights).logit_scale == checkpoint


def test_image_embeddings_match_transformers(encoder, tiny_clip):
    images = [photo_like(320, 240, seed=7), photo_like(200, 410, seed=8)]
    pixels = np.stack([resize_and_crop(image, ImageGeometry(224, 224, 224)) for image in images])
    ours = encoder.encode_images(pixels)
    inputs = tiny_clip.processor(images=images, return_tensors="pt")
    with torch.inference_mode():
        reference = tiny_clip.model.get_image_features(**inputs).pooler_output
    reference = (reference / reference.norm(dim=-1, keepdim=True)).numpy()
    assert ours.dtype == np.float32 and ours.shape == (2, 16)
    np.testing.assert_allclose(np.linalg.norm(ours, axis=1), 1.0, atol=1e-6)
    np.testing.assert_allclose(ours, reference, atol=1e-5)


def test_text_embeddings_match_transformers_and_batching_changes_nothing(encoder, tiny_clip):
    texts = ["a photo of a cat", "a photo of a woman with black shirt and a bag", "a photo of a x"]
    together = encoder.encode_texts(texts)
    alone = np.concatenate([encoder.encode_texts([text]) for text in texts])
    tokens = tiny_clip.processor(text=texts, return_tensors="pt", padding=True)
    with torch.inference_mode():
        reference = tiny_clip.model.get_text_features(**tokens).pooler_output
    reference = (reference / reference.norm(dim=-1, keepdim=True)).numpy()
    np.testing.assert_allclose(together, reference, atol=1e-5)
    np.testing.assert_allclose(alone, together, atol=1e-5)


TEXTS = ["a photo of a cat", "", "a photo of a woman with black shirt and a bag", "ünïcödé 🙂"]


@pytest.mark.parametrize("side", ["right", "left"])
def test_token_ids_are_padded_exactly_as_the_tokenizer_pads_a_batch(tiny_clip, side):
    tokenizer = copy.deepcopy(tiny_clip.processor.tokenizer)
    tokenizer.padding_side = side
    theirs = tokenizer(TEXTS, padding=True, return_tensors="np")
    ids = tokenizer(TEXTS)["input_ids"]
    vocab_size = len(tokenizer)
    input_ids, attention_mask = padded_batch(ids, tokenizer.pad_token_id, side, 77, vocab_size)
    np.testing.assert_array_equal(input_ids, theirs["input_ids"])
    np.testing.assert_array_equal(attention_mask, theirs["attention_mask"])
    assert input_ids.dtype == attention_mask.dtype == np.int64
    with pytest.raises(ValueError, match="at most 5"):
        padded_batch(ids, tokenizer.pad_token_id, side, 5, vocab_size)


def test_a_token_id_the_model_has_no_embedding_for_is_refused_before_the_device(encoder):
    """On a GPU the embedding lookup's device-side assert would break the runner's CUDA context;
    a ValueError fails only the call that carried the id."""
    vocab_size = encoder.model.config.text_config.vocab_size
    for outside in (vocab_size, -1):
        with pytest.raises(ValueError, match=f"outside the model's vocabulary of {vocab_size}"):
            encoder.encode_token_ids([[0, 1], [0, outside, 1]])
    assert encoder.encode_token_ids([[0, vocab_size - 1, 1]]).shape[0] == 1


def test_token_ids_encode_to_the_texts_embeddings(encoder, tiny_clip):
    """What the runner gets from the API workers (token ids) gives what texts would."""
    ids = tiny_clip.processor.tokenizer(TEXTS)["input_ids"]
    from_ids = encoder.encode_token_ids(ids)
    tokens = tiny_clip.processor(text=TEXTS, return_tensors="pt", padding=True)
    with torch.inference_mode():
        reference = tiny_clip.model.get_text_features(**tokens).pooler_output
    reference = (reference / reference.norm(dim=-1, keepdim=True)).numpy()
    np.testing.assert_allclose(from_ids, reference, atol=1e-5)
    np.testing.assert_array_equal(from_ids, encoder.encode_texts(TEXTS))


def test_prompts_longer_than_the_token_limit_are_truncated_not_fatal(encoder):
    long_prompt = "a photo of a " + "very " * 200 + "large cat"
    assert encoder.encode_texts([long_prompt]).shape == (1, 16)


def test_input_pixels_are_not_modified(encoder):
    pixels = np.full((1, 224, 224, 3), 128, dtype=np.uint8)
    encoder.encode_images(pixels)
    assert (pixels == 128).all()


def test_pixels_and_token_ids_go_to_the_device_without_waiting(encoder, monkeypatch):
    """Each of the encoder's copies to the device is queued (device_wait.to_device, tested
    there): a blocking one would poll on a GPU until every pass queued before it had run."""
    copied: list[tuple[int, ...]] = []

    def recorded(host: torch.Tensor, device: torch.device) -> torch.Tensor:
        copied.append(tuple(host.shape))
        return to_device(host, device)

    monkeypatch.setattr(encoding, "to_device", recorded)
    encoder.encode_images(np.zeros((2, 224, 224, 3), dtype=np.uint8))
    assert copied == [(2, 224, 224, 3)]
    token_ids = encoder.tokenizer(["a photo of a cat", "a dog"])["input_ids"]
    encoder.encode_token_ids(token_ids)
    width = max(len(ids) for ids in token_ids)
    assert copied[1:] == [(2, width), (2, width)]  # the ids and their attention mask


def test_compiled_towers_give_the_eager_embeddings(encoder, tiny_clip):
    compiled = ClipEncoder(
        copy.deepcopy(tiny_clip.model), tiny_clip.processor, torch.device("cpu"), torch.float32
    )
    compiled.compile_towers()
    assert isinstance(compiled.model.vision_model, torch._dynamo.eval_frame.OptimizedModule)
    rng = np.random.default_rng(3)
    for batch in (1, 3, 5):  # size 1 is specialised; 3 and 5 share the dynamic graph
        pixels = rng.integers(0, 256, (batch, 224, 224, 3), dtype=np.uint8)
        np.testing.assert_allclose(
            compiled.encode_images(pixels), encoder.encode_images(pixels), atol=1e-5
        )
    texts = ["a photo of a cat", "a photo of a woman with black shirt and a bag"]
    np.testing.assert_allclose(compiled.encode_texts(texts), encoder.encode_texts(texts), atol=1e-5)


def test_the_raw_pixel_patch_embedding_is_the_normalised_one(tiny_clip):
    conv = tiny_clip.model.vision_model.embeddings.patch_embedding
    mean, std = torch.tensor(OPENAI_MEAN), torch.tensor(OPENAI_STD)
    scale, offset = 1 / 255 / std, -mean / std
    folded = raw_pixel_patch_embedding(conv, scale, offset)
    pixels = torch.randint(0, 256, (2, 3, 224, 224)).float()
    with torch.inference_mode():
        expected = conv(pixels * scale.view(1, 3, 1, 1) + offset.view(1, 3, 1, 1))
        difference = (folded(pixels) - expected).abs().max()
    # float rounding of 3,072-term sums (about 3e-6 of the largest output), not another layer
    assert difference <= 1e-5 * expected.abs().max()
    assert conv.bias is None and folded.bias is not None  # the original is left as it was


def test_one_mean_and_std_for_every_channel_and_no_crop_answer_as_transformers(tiny_clip):
    """transformers takes a single number for every channel, and without a center crop gives
    the resized image itself: the runner had failed at every start on both (a view of 1
    number as 3; a 224 crop for a model of another size)."""
    from transformers import CLIPImageProcessorPil, CLIPProcessor

    image_processor = CLIPImageProcessorPil(
        image_mean=0.5,
        image_std=0.25,
        do_center_crop=False,
        size={"shortest_edge": 224},
        crop_size={"height": 100, "width": 100},  # not used, as transformers does not
    )
    processor = CLIPProcessor(
        image_processor=image_processor, tokenizer=tiny_clip.processor.tokenizer
    )
    ours = ClipEncoder(
        copy.deepcopy(tiny_clip.model), processor, torch.device("cpu"), torch.float32
    )
    assert (ours.crop_height, ours.crop_width) == (224, 224)
    images = [photo_like(300, 300, seed=9)]  # square: transformers takes no other uncropped
    pixels = np.stack([resize_and_crop(image, ImageGeometry(224, 224, 224)) for image in images])
    inputs = processor(images=images, return_tensors="pt")
    with torch.inference_mode():
        reference = tiny_clip.model.get_image_features(**inputs).pooler_output
    reference = (reference / reference.norm(dim=-1, keepdim=True)).numpy()
    np.testing.assert_allclose(ours.encode_images(pixels), reference, atol=1e-5)


def test_a_padded_patch_embedding_cannot_take_raw_pixels():
    padded = torch.nn.Conv2d(3, 8, 4, stride=4, padding=1, bias=False)
    with pytest.raises(ValueError, match="unpadded"):
        raw_pixel_patch_embedding(padded, torch.ones(3), torch.zeros(3))


def test_explicit_normalisation_gives_the_folded_embeddings(encoder, tiny_clip):
    """Other dtypes (fp16 on a GPU) normalise the pixels instead of folding: the same
    embeddings (float64 here, so the CPU can run it)."""
    wide = ClipEncoder(
        copy.deepcopy(tiny_clip.model), tiny_clip.processor, torch.device("cpu"), torch.float64
    )
    assert encoder.raw_pixels and not wide.raw_pixels
    pixels = np.random.default_rng(4).integers(0, 256, (3, 224, 224, 3), dtype=np.uint8)
    np.testing.assert_allclose(encoder.encode_images(pixels), wide.encode_images(pixels), atol=1e-5)


def test_a_driver_torch_cannot_use_is_named_and_the_cpu_serves(tmp_path, caplog):
    """No GPU that torch can use (as on this machine): the CPU in fp32. Where an NVIDIA driver
    is loaded all the same (its /proc file, here a stand-in), the log says why it goes unused."""
    assert not torch.cuda.is_available()  # the suite runs on a CPU torch
    driver = tmp_path / "version"
    with caplog.at_level(logging.WARNING, logger="clip_runner.model.encoding"):
        assert pick_device(driver) == (torch.device("cpu"), torch.float32)
        assert caplog.text == ""  # no driver: nothing to say
        driver.write_text("NVRM version: NVIDIA UNIX x86_64 Kernel Module  535.54.03\nGCC ...\n")
        assert pick_device(driver) == (torch.device("cpu"), torch.float32)
    assert "Kernel Module  535.54.03" in caplog.text and "serving on the CPU" in caplog.text


@pytest.mark.parametrize("failure", [None, "CUDA error: no kernel image is available"])
def test_a_gpu_torch_holds_no_code_for_is_named_and_the_cpu_serves(
    tmp_path, monkeypatch, caplog, failure
):
    """torch counts a GPU older than its build's architectures (a V100 under CUDA 13) as
    available; only a kernel fails there. The runner tries one (`cuda_kernel_failure`, which
    this CPU torch cannot run: stood in for) and serves on the CPU, saying why, rather than
    failing at warm-up and being restarted for good."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(encoding, "cuda_kernel_failure", lambda: failure)
    monkeypatch.setattr(encoding, "gpu_description", lambda: "Tesla V100 (compute capability 7.0)")
    with caplog.at_level(logging.WARNING, logger="clip_runner.model.encoding"):
        device, dtype = pick_device(tmp_path / "no-driver")
    if failure is None:
        assert (device, dtype) == (torch.device("cuda"), torch.float16) and caplog.text == ""
    else:
        assert (device, dtype) == (torch.device("cpu"), torch.float32)
        assert "Tesla V100 (compute capability 7.0) cannot run" in caplog.text
        assert "no kernel image is available" in caplog.text and "serving on the CPU" in caplog.text


@pytest.mark.parametrize(
    ("error", "fallback"),
    [
        ("CUDA error: no kernel image is available for execution on the device\nCUDA kernel", True),
        ("CUDA error: out of memory", False),
        ("CUDA error: CUDA-capable device(s) is/are busy or unavailable", False),
    ],
)
def test_only_a_gpu_without_kernels_is_left_for_the_cpu(monkeypatch, error, fallback):
    """The first kernel's error, stood in for (this CPU torch has no CUDA): a GPU torch holds no
    code for is named for the CPU fallback; any other error stops the start as before, and
    BentoML starts a fresh runner rather than the CPU serving on, far slower."""

    def ones(*args, **kwargs):
        raise RuntimeError(error)

    monkeypatch.setattr(encoding.torch, "ones", ones)
    if fallback:
        assert encoding.cuda_kernel_failure() == error.splitlines()[0]
    else:
        with pytest.raises(RuntimeError, match="CUDA error"):
            encoding.cuda_kernel_failure()


def test_clip_dtype_picks_the_models_dtype_and_auto_keeps_the_originals(tmp_path):
    """CLIP_DTYPE: `auto` is float32 on CPU (float16 on a GPU); any other value is that type,
    on CPU too."""
    driver = tmp_path / "no-driver"
    cpu = torch.device("cpu")
    assert pick_device(driver, "auto") == (cpu, torch.float32)
    assert pick_device(driver, "float32") == (cpu, torch.float32)
    assert pick_device(driver, "float16") == (cpu, torch.float16)
    assert pick_device(driver, "bfloat16") == (cpu, torch.bfloat16)


@pytest.mark.parametrize(
    ("flags", "warned"),
    [({"avx2", "avx512f"}, True), ({"avx512f", "avx512_bf16"}, False), ({"amx_bf16"}, False)],
)
def test_bfloat16_on_a_cpu_without_its_instructions_is_warned_about(
    tmp_path, monkeypatch, caplog, flags, warned
):
    monkeypatch.setattr(encoding, "cpu_flags", lambda: frozenset(flags))
    with caplog.at_level(logging.WARNING, logger="clip_runner.model.encoding"):
        assert pick_device(tmp_path / "no-driver", "bfloat16")[1] == torch.bfloat16
        assert pick_device(tmp_path / "no-driver", "float32")[1] == torch.float32
    assert ("CLIP_DTYPE=bfloat16 on a CPU without instructions for it" in caplog.text) == warned
    assert "float32 on a CPU" not in caplog.text  # float32 needs nothing


def test_cpu_flags_are_read_from_x86_and_arm_cpuinfo(tmp_path):
    x86 = tmp_path / "x86"
    x86.write_text("processor\t: 0\nflags\t\t: fpu avx512f avx512_bf16\n\nprocessor\t: 1\n")
    arm = tmp_path / "arm"
    arm.write_text("processor\t: 0\nFeatures\t: fp asimd bf16 i8mm\n")
    assert cpu_flags(x86) == {"fpu", "avx512f", "avx512_bf16"}
    assert cpu_flags(arm) == {"fp", "asimd", "bf16", "i8mm"}
    assert cpu_flags(tmp_path / "missing") == frozenset()
