"""The model store: generated tokenizer, random models, save and load round trip."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import bentoml
import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import CLIPImageProcessorPil

from clip_runner.model.model_source import stored_model_problem
from clip_runner.model.store import (
    CheckpointError,
    HubUnavailableError,
    build_random_clip,
    build_tiny_tokenizer,
    load_checkpoint,
    load_from_dir,
    load_from_hub,
    load_processor,
    save_clip,
)


def drop_weights(checkpoint: Path, target: Path, *names: str) -> Path:
    """A copy of `checkpoint` whose model.safetensors lacks the named tensors (a cut-down or
    hand-converted save: every file is there, and transformers loads it without an error)."""
    shutil.copytree(checkpoint, target)
    weights = load_file(target / "model.safetensors")
    kept = {name: tensor for name, tensor in weights.items() if name not in names}
    save_file(kept, target / "model.safetensors", metadata={"format": "pt"})
    return target


def store_entries(bentoml_home: Path) -> set[str]:
    folder = bentoml_home / "models" / "clip"
    return (
        {entry.name for entry in folder.iterdir() if entry.is_dir()} if folder.is_dir() else set()
    )


def test_tokenizer_special_ids_match_the_text_config():
    model, processor = build_random_clip(tiny=True)
    tokenizer, text_config = processor.tokenizer, model.config.text_config
    assert tokenizer.eos_token_id == text_config.eos_token_id
    assert tokenizer.bos_token_id == text_config.bos_token_id
    assert tokenizer.pad_token_id == text_config.pad_token_id
    assert len(tokenizer) == text_config.vocab_size
    ids = tokenizer("a photo of a person")["input_ids"]
    assert ids[0] == tokenizer.bos_token_id and ids[-1] == tokenizer.eos_token_id


def test_tokenizer_merges_listed_words_and_still_spells_unknown_ones():
    tokenizer = build_tiny_tokenizer()
    assert len(tokenizer("photo")["input_ids"]) - 2 < len("photo")
    assert len(tokenizer("zebra")["input_ids"]) - 2 == len("zebra")
    assert tokenizer("Zebra!")["input_ids"] != tokenizer("zebra")["input_ids"]


def test_different_prompts_get_different_text_embeddings():
    """Guards the eos-pooling pitfall: a wrong eos id makes every prompt embed alike."""
    model, processor = build_random_clip(tiny=True)
    tokens = processor.tokenizer(
        ["a photo of a cat", "a photo of a woman riding a horse"], padding=True, return_tensors="pt"
    )
    with torch.inference_mode():
        features = model.get_text_features(**tokens).pooler_output
    features = features / features.norm(dim=-1, keepdim=True)
    assert float(features[0] @ features[1]) < 0.999


def test_random_models_are_deterministic_and_vit_b32_has_its_shapes():
    first, _ = build_random_clip(tiny=True)
    second, _ = build_random_clip(tiny=True)
    for a, b in zip(first.parameters(), second.parameters(), strict=True):
        assert torch.equal(a, b)
    big, _ = build_random_clip(tiny=False)
    vision = big.config.vision_config
    assert (vision.hidden_size, vision.num_hidden_layers, vision.patch_size) == (768, 12, 32)
    assert big.config.projection_dim == 512 and big.config.text_config.hidden_size == 512


def test_saved_model_has_labels_metadata_and_loads_back(tiny_stored_model, tiny_clip):
    stored = bentoml.models.get(tiny_stored_model.tag)
    assert stored.info.labels == {"source": "random:tiny", "random_weights": "true"}
    metadata = stored.info.metadata
    assert metadata["embedding_dim"] == 16 and metadata["image_size"] == 224
    assert metadata["random_weights"] is True
    assert metadata["logit_scale"] == pytest.approx(
        float(tiny_clip.model.logit_scale.detach().exp())
    )
    assert tiny_clip.random_weights and tiny_clip.tag == str(stored.tag)
    assert stored_model_problem(str(stored.tag)) is None
    with pytest.raises(bentoml.exceptions.NotFound):
        stored_model_problem("clip:doesnotexist")


def test_local_directory_import_round_trips(tmp_path):
    model, processor = build_random_clip(tiny=True, seed=5)
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    loaded, loaded_processor = load_from_dir(tmp_path)
    assert torch.equal(loaded.logit_scale, model.logit_scale)
    assert (
        loaded_processor.tokenizer("a cat")["input_ids"]
        == processor.tokenizer("a cat")["input_ids"]
    )
    with pytest.raises(FileNotFoundError, match="no config.json"):
        load_from_dir(tmp_path / "empty")


def test_unreachable_hub_fails_fast_with_advice(monkeypatch):
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    with pytest.raises(HubUnavailableError) as raised:
        load_from_hub("openai/clip-vit-base-patch32")
    assert "--tiny" in str(raised.value) and "--from-dir" in str(raised.value)


def test_processor_comes_back_with_pillows_resize_even_beside_torchvision(
    tiny_stored_model, monkeypatch, tmp_path
):
    """transformers 5 picks its torchvision image processor (other pixels) whenever torchvision
    is installed, as on every GPU host: the stored processor must still load as Pillow's."""
    from transformers.models.auto import image_processing_auto

    resolve = image_processing_auto._resolve_backend
    chosen = []

    def recording_resolve(*args):
        chosen.append(resolve(*args))
        return chosen[-1]

    monkeypatch.setattr(image_processing_auto, "is_torchvision_available", lambda: True)
    monkeypatch.setattr(image_processing_auto, "_resolve_backend", recording_resolve)
    processor = load_processor(tiny_stored_model.path)
    assert "torchvision" not in chosen  # transformers' own choice was never asked for
    assert isinstance(processor.image_processor, CLIPImageProcessorPil)
    # and nothing about the image backend reaches the tokenizer's saved config
    processor.save_pretrained(tmp_path)
    assert '"pil"' not in (tmp_path / "tokenizer_config.json").read_text()


@pytest.mark.parametrize("layout", ["safetensors", "pytorch_model.bin", "fp16"])
def test_every_saved_layout_loads_with_nothing_missing(tmp_path, layout):
    """The refusal of missing weights below must not refuse a whole checkpoint in any layout
    transformers writes (buffers such as position_ids are not weights it lists as missing)."""
    model, processor = build_random_clip(tiny=True, seed=5)
    if layout == "fp16":
        model = model.half()
    model.save_pretrained(tmp_path, safe_serialization=layout != "pytorch_model.bin")
    processor.save_pretrained(tmp_path)
    loaded, _ = load_checkpoint(tmp_path)
    assert torch.equal(loaded.logit_scale, model.logit_scale.float())


def test_a_checkpoint_missing_weights_is_refused_not_filled_with_random_values(tmp_path):
    """transformers loads it with a warning, `logit_scale` left uninitialised (served as 0, 1 or
    inf): every probability would be noise while the import and the service said all was well."""
    model, processor = build_random_clip(tiny=True, seed=5)
    model.save_pretrained(tmp_path / "whole")
    processor.save_pretrained(tmp_path / "whole")
    cut = drop_weights(tmp_path / "whole", tmp_path / "cut", "logit_scale")
    for load in (load_from_dir, load_checkpoint):  # importing it, and serving it
        with pytest.raises(
            CheckpointError, match=r"lacks 1 of a CLIPModel's weights \(logit_scale"
        ):
            load(cut)


def test_a_tokenizer_with_tokens_the_model_cannot_embed_is_refused(tmp_path):
    """Tokens added to the tokenizer, the model's embedding table left as it was: such a token's
    id failed its whole batch on CPU (IndexError, a 503) and, on a GPU, would break the runner
    process (a device-side assert) at every prompt using it."""
    model, processor = build_random_clip(tiny=True, seed=5)
    processor.tokenizer.add_tokens(["zzqx"])
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    vocab_size = model.config.text_config.vocab_size
    for load in (load_from_dir, load_checkpoint):  # importing it, and serving it
        with pytest.raises(
            CheckpointError, match=f"{vocab_size + 1} tokens.*embeddings for {vocab_size}"
        ):
            load(tmp_path)
    embeddings = model.text_model.embeddings
    grown = torch.nn.Embedding(vocab_size + 1, embeddings.token_embedding.embedding_dim)
    embeddings.token_embedding = grown
    model.config.text_config.vocab_size = vocab_size + 1
    model.save_pretrained(tmp_path)
    loaded, _ = load_checkpoint(tmp_path)  # its embedding table grown to match: served
    assert loaded.config.text_config.vocab_size == vocab_size + 1


def test_a_cut_short_store_entry_is_not_a_stored_model(tiny_stored_model, bentoml_home):
    """What an import interrupted while BentoML copies the files in leaves: every file there,
    the weights cut short. `--if-missing` took it for the model, and kept it for good."""
    entry = bentoml_home / "models" / "clip" / "cutshort0000000a"
    shutil.copytree(tiny_stored_model.path, entry)
    try:
        (entry / "model.yaml").write_text(
            (entry / "model.yaml").read_text().replace(tiny_stored_model.tag.version, entry.name)
        )
        assert stored_model_problem(f"clip:{entry.name}") is None  # a whole copy is a model
        with (entry / "model.safetensors").open("r+b") as weights:
            weights.truncate(100_000)
        assert stored_model_problem(f"clip:{entry.name}") is not None
    finally:
        shutil.rmtree(entry)


def test_an_interrupted_save_leaves_no_entry_in_the_store(bentoml_home, monkeypatch):
    """BentoML removes a failed save's entry on an Exception only: Ctrl-C while it copied the
    files in left a half-written one (here the weights copy is interrupted midway)."""
    model, processor = build_random_clip(tiny=True)
    copy = shutil.copyfile

    def interrupted_copy(source, target, *args, **kwargs):
        if os.fspath(source).endswith("model.safetensors"):
            Path(target).write_bytes(Path(source).read_bytes()[:1000])
            raise KeyboardInterrupt
        return copy(source, target, *args, **kwargs)

    before = store_entries(bentoml_home)
    monkeypatch.setattr(shutil, "copyfile", interrupted_copy)
    with pytest.raises(KeyboardInterrupt):
        save_clip(model, processor, source="random:tiny", random_weights=True)
    assert store_entries(bentoml_home) == before
