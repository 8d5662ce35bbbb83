"""The import CLI as a user runs it: a real subprocess against a temporary model store."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from transformers import BertConfig, BertModel

from clip_runner.model.store import build_random_clip
from tests.helpers import REPO_ROOT
from tests.model.test_store import drop_weights


def run_import(tmp_path, *args: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "scripts/import_model.py", *args],
        cwd=REPO_ROOT,
        env={**os.environ, "BENTOML_HOME": str(tmp_path), **env},
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_tiny_import_then_if_missing_skips(tmp_path):
    first = run_import(tmp_path, "--tiny")
    assert first.returncode == 0, first.stderr
    assert "saved clip:" in first.stdout and "random:tiny" in first.stdout
    assert len(list((tmp_path / "models" / "clip").iterdir())) >= 1
    again = run_import(tmp_path, "--tiny", "--if-missing")
    assert again.returncode == 0 and "nothing to import" in again.stdout


def test_make_builds_check_refuses_to_pack_random_weights_unless_asked(tmp_path):
    """`make serve IMPORT_ARGS=--tiny` offline, then `make build`: the bento had packed the tiny
    model, silently, for an image that answers noise."""
    tiny = run_import(tmp_path, "--tiny").stdout.split()[1]  # `saved clip:<version> ...`
    refused = run_import(tmp_path, "--if-missing", "--for-bento")
    assert refused.returncode == 2, refused.stdout + refused.stderr
    assert "clip:latest has random weights (source random:tiny)" in refused.stderr
    assert "ALLOW_RANDOM_WEIGHTS=1" in refused.stderr and "Traceback" not in refused.stderr
    # advice that works as given: make build's own import skips while clip:latest is there
    assert "make import-model IMPORT_ARGS='--from-dir DIR'" in refused.stderr
    # Asked for: by this command's own random source, or by the setting.
    assert run_import(tmp_path, "--if-missing", "--for-bento", "--tiny").returncode == 0
    allowed = run_import(tmp_path, "--if-missing", "--for-bento", ALLOW_RANDOM_WEIGHTS="1")
    assert allowed.returncode == 0, allowed.stderr
    # The model checked is the one the bento packs: CLIP_MODEL_TAG's, else clip:latest.
    real = run_import(tmp_path, "--for-bento", "--from-dir", str(clip_checkpoint(tmp_path / "c")))
    assert real.returncode == 0, real.stderr
    named = run_import(tmp_path, "--if-missing", "--for-bento", CLIP_MODEL_TAG=f" {tiny} ")
    assert named.returncode == 2 and f"{tiny} has random weights" in named.stderr
    # a store entry BentoML cannot read: one line, not a traceback
    (tmp_path / "models" / "clip" / tiny.split(":")[1] / "model.yaml").unlink()
    unreadable = run_import(tmp_path, "--if-missing", "--for-bento", CLIP_MODEL_TAG=tiny)
    assert unreadable.returncode == 2 and "Traceback" not in unreadable.stderr
    assert unreadable.stderr.startswith(f"error: cannot read {tiny} from the model store")


def test_offline_hub_import_fails_with_a_short_message(tmp_path):
    result = run_import(
        tmp_path, "--hub-id", "openai/clip-vit-base-patch32", HF_ENDPOINT="http://127.0.0.1:9"
    )
    assert result.returncode == 2
    assert "--tiny" in result.stderr and "--from-dir" in result.stderr
    assert "Traceback" not in result.stderr


def test_missing_directory_fails_cleanly(tmp_path):
    result = run_import(tmp_path, "--from-dir", str(tmp_path / "nope"))
    assert result.returncode == 2 and "no config.json" in result.stderr


def clip_checkpoint(path: Path) -> Path:
    model, processor = build_random_clip(tiny=True, seed=5)
    model.save_pretrained(path)
    processor.save_pretrained(path)
    return path


def bert_checkpoint(path: Path) -> Path:
    """Another model beside a CLIP processor: it was stored as a default-shaped random CLIP,
    labelled random_weights false, and became clip:latest."""
    config = BertConfig(
        hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64
    )
    BertModel(config).save_pretrained(path)
    build_random_clip(tiny=True)[1].save_pretrained(path)
    return path


def model_files_only(path: Path) -> Path:
    """No tokenizer or processor files: it ended in an OSError traceback, status 1."""
    build_random_clip(tiny=True)[0].save_pretrained(path)
    return path


def with_settings(path: Path, file: str, **settings: object) -> Path:
    """A CLIP checkpoint whose `file` (processor_config.json's image processor, or
    tokenizer_config.json) has `settings` changed."""
    clip_checkpoint(path)
    config = json.loads((path / file).read_text())
    inner = config["image_processor"] if file == "processor_config.json" else config
    inner.update(settings)
    (path / file).write_text(json.dumps(config))
    return path


@pytest.mark.parametrize(
    ("make", "says"),
    [
        (
            lambda tmp: drop_weights(clip_checkpoint(tmp / "whole"), tmp / "ckpt", "logit_scale"),
            "lacks 1 of a CLIPModel's weights (logit_scale)",
        ),
        (  # imported, then the runner failed at every start
            lambda tmp: with_settings(
                tmp / "ckpt", "processor_config.json", size={"height": 64, "width": 64}
            ),
            "not by their shortest edge",
        ),
        (  # imported and served, with answers transformers would not give
            lambda tmp: with_settings(tmp / "ckpt", "processor_config.json", resample=2),
            "resamples with Pillow's filter 2",
        ),
        (
            lambda tmp: with_settings(tmp / "ckpt", "tokenizer_config.json", pad_token=None),
            "its tokenizer has no pad token",
        ),
        (lambda tmp: bert_checkpoint(tmp / "ckpt"), "model_type 'bert', not 'clip'"),
        (lambda tmp: model_files_only(tmp / "ckpt"), "there is no tokenizer"),
    ],
    ids=[
        "without-logit_scale",
        "height-width-size",
        "bilinear",
        "no-pad-token",
        "bert",
        "model-files-only",
    ],
)
def test_a_directory_that_is_not_a_whole_clip_checkpoint_is_refused(tmp_path, make, says):
    """Refused in one line, status 2, nothing stored (not a CLIP of random weights)."""
    checkpoint = make(tmp_path)
    home = tmp_path / "home"
    result = run_import(home, "--from-dir", str(checkpoint))
    assert result.returncode == 2, result.stderr[-3000:]
    assert says in result.stderr and "Traceback" not in result.stderr
    assert not (home / "models" / "clip").exists()


@pytest.mark.parametrize("cut", ["mid-line", "after line 3", "after line 12"])
def test_if_missing_replaces_a_store_entry_whose_model_yaml_was_cut_short(
    tmp_path, tiny_stored_model, cut
):
    """PyYAML's error (cut in a line), or cattrs' or a KeyError (cut after one), went through as
    a 90-line traceback: `make serve` could not get past it."""
    entry = tmp_path / "models" / "clip" / tiny_stored_model.tag.version
    shutil.copytree(tiny_stored_model.path, entry)
    model_yaml = entry / "model.yaml"
    text = model_yaml.read_bytes()
    if cut == "mid-line":
        model_yaml.write_bytes(text[:100])
    else:
        lines = int(cut.rsplit(" ", 1)[1])
        model_yaml.write_bytes(b"".join(text.splitlines(keepends=True)[:lines]))
    result = run_import(tmp_path, "--tiny", "--if-missing")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    assert "the stored clip:latest is broken" in result.stdout
    assert "its model.yaml is not whole" in result.stdout
    assert "saved clip:" in result.stdout


def test_if_missing_replaces_a_store_entry_an_interrupted_import_left(tmp_path, tiny_stored_model):
    """Every file there, the weights cut short: `--if-missing` (make serve, make build) kept it as
    the model for good, and the service then failed to load it at every start."""
    entry = tmp_path / "models" / "clip" / tiny_stored_model.tag.version
    shutil.copytree(tiny_stored_model.path, entry)
    with (entry / "model.safetensors").open("r+b") as weights:
        weights.truncate(1000)
    result = run_import(tmp_path, "--tiny", "--if-missing")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "the stored clip:latest is broken" in result.stdout
    assert "model.safetensors is not a complete safetensors file" in result.stdout
    assert "saved clip:" in result.stdout and "nothing to import" not in result.stdout
    latest = (tmp_path / "models" / "clip" / "latest").read_text().strip()
    assert latest != entry.name and (tmp_path / "models" / "clip" / latest).is_dir()
