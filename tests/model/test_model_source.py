"""CLIP_MODEL_DIR (SageMaker's /opt/ml/model): which checkpoint is served, and what stops a start.

Unit tests of the directory rules, then real `bentoml serve` processes: one serving a checkpoint
from a model directory (answers checked against transformers on that checkpoint), one refusing
to start on a directory that holds no CLIP checkpoint. The empty directory SageMaker's local mode
mounts is the suite's shared server's own setting (conftest.py), checked here too.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import bentoml
import httpx
import numpy as np
import pytest
import torch

from clip_runner.model.model_source import (
    MODEL_DIR_TAG_PREFIX,
    SAGEMAKER_MODEL_DIR,
    ModelDirError,
    StoredModelError,
    check_served_model,
    checkpoint_problem,
    find_checkpoint,
    image_processor_problem,
    load_served_clip,
    served_checkpoint,
)
from clip_runner.model.shutdown_order import STOPPED_STATUS
from clip_runner.model.store import LoadedClip, build_random_clip, load_checkpoint
from tests.helpers import (
    REPO_ROOT,
    SEED_CLASSES,
    ServedBento,
    as_base64,
    bentoml_serve,
    free_port,
    photo_like,
    stop_process_group,
)
from tests.model.test_store import drop_weights
from tests.reference import assert_matches_reference, reference_probabilities

MODEL_DIR_SEED = 7  # not the store model's seed: its answers differ from the baked-in model's
NOBODY_UID = 65534  # the user "nobody": who checks the checkpoint when the tests run as root


def save_checkpoint(path: Path, seed: int = MODEL_DIR_SEED) -> Path:
    """What a user puts in model.tar.gz: save_pretrained of a CLIPModel and its CLIPProcessor."""
    model, processor = build_random_clip(tiny=True, seed=seed)
    model.save_pretrained(path)
    processor.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def checkpoint_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_checkpoint(tmp_path_factory.mktemp("opt-ml-model"))


def broken_copy(checkpoint_dir: Path, tmp_path: Path, *without: str) -> Path:
    target = tmp_path / "model"
    shutil.copytree(checkpoint_dir, target)
    for name in without:
        (target / name).unlink(missing_ok=True)
    return target


# ---- the directory rules ----


def test_sagemakers_absent_or_an_empty_or_blank_one_keeps_the_baked_in_model(tmp_path):
    if not Path(SAGEMAKER_MODEL_DIR).exists():  # absent here, as on an endpoint without data
        assert find_checkpoint(SAGEMAKER_MODEL_DIR) is None
    with pytest.raises(ModelDirError, match=r"CLIP_MODEL_DIR .*/absent does not exist"):
        find_checkpoint(str(tmp_path / "absent"))  # a typo had served the baked-in model
    assert find_checkpoint(str(tmp_path)) is None
    (tmp_path / "lost+found").mkdir()  # an empty volume's folder holds no file either
    assert find_checkpoint(str(tmp_path)) is None
    assert find_checkpoint("") is None


def test_a_checkpoint_is_found_at_the_top_or_in_a_lone_folder(checkpoint_dir, tmp_path):
    assert find_checkpoint(str(checkpoint_dir)) == checkpoint_dir
    shutil.copytree(checkpoint_dir, tmp_path / "my-clip")  # tar czf model.tar.gz my-clip/
    assert find_checkpoint(str(tmp_path)) == tmp_path / "my-clip"


@pytest.mark.parametrize(
    ("without", "says"),
    [
        ("config.json", "there is no config.json"),
        ("model.safetensors", "there are no weights"),
        ("tokenizer.json vocab.json merges.txt", "there is no tokenizer"),
        ("processor_config.json preprocessor_config.json", "no image processor config"),
    ],
)
def test_an_incomplete_checkpoint_stops_the_start_saying_what_is_missing(
    checkpoint_dir, tmp_path, without, says
):
    broken = broken_copy(checkpoint_dir, tmp_path, *without.split())
    with pytest.raises(ModelDirError) as raised:
        find_checkpoint(str(broken))
    message = str(raised.value)
    assert says in message and str(broken) in message
    assert "save_pretrained" in message and "empty" in message  # and what to do instead


def test_other_contents_are_refused_with_what_the_directory_holds(checkpoint_dir, tmp_path):
    (tmp_path / "weights.pt").write_bytes(b"\0" * 16)
    with pytest.raises(ModelDirError, match=r"no config\.json.*It holds: weights\.pt"):
        find_checkpoint(str(tmp_path))
    (tmp_path / "weights.pt").unlink()
    (tmp_path / "model.tar.gz").write_bytes(b"\x1f\x8b")
    with pytest.raises(ModelDirError, match="archive model.tar.gz instead of its contents"):
        find_checkpoint(str(tmp_path))
    bert = broken_copy(checkpoint_dir, tmp_path / "bert", "merges.txt")
    config = json.loads((bert / "config.json").read_text())
    (bert / "config.json").write_text(json.dumps({**config, "model_type": "bert"}))
    with pytest.raises(ModelDirError, match="model_type 'bert', not 'clip'"):
        find_checkpoint(str(bert))
    a_file = tmp_path / "file"
    a_file.write_text("x")
    with pytest.raises(ModelDirError, match="is not a directory"):
        find_checkpoint(str(a_file))


def test_unloadable_weights_stop_the_start(checkpoint_dir, tmp_path, tiny_stored_model):
    """Weights that are not safetensors (or cut short) are refused by the supervisor's check,
    reading the header only; weights that load but lack some of the model's, by the runner."""
    broken = tmp_path / "model"
    shutil.copytree(checkpoint_dir, broken)
    (broken / "model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ModelDirError, match="model.safetensors is not a complete safetensors"):
        find_checkpoint(str(broken))
    cut = drop_weights(checkpoint_dir, tmp_path / "cut", "logit_scale")
    with pytest.raises(ModelDirError, match=r"does not load: CheckpointError.*\(logit_scale\)"):
        load_served_clip(tiny_stored_model, str(cut))


def test_cut_short_weights_stop_the_start(checkpoint_dir, tmp_path):
    """An interrupted copy or download: every file there, model.safetensors cut short."""
    cut = broken_copy(checkpoint_dir, tmp_path)
    size = (cut / "model.safetensors").stat().st_size
    with (cut / "model.safetensors").open("r+b") as weights:
        weights.truncate(size // 2)
    with pytest.raises(ModelDirError, match=f"cut short: {size // 2:,} of the {size:,} bytes"):
        find_checkpoint(str(cut))


def test_weights_the_server_may_not_read_are_named_as_such(checkpoint_dir):
    """save_pretrained writes the weights readable by their owner only (mode 0600); a server
    running as another user (the image's uid 1034) had been told its weights were "not a complete
    safetensors file". Checked in a process of another user (as root) or with the file's read bit
    off (as anyone else), in a directory that user may enter (pytest's tmp_path is private)."""
    as_root = os.getuid() == 0
    with tempfile.TemporaryDirectory() as scratch:
        os.chmod(scratch, 0o755)
        copy = Path(scratch) / "model"
        shutil.copytree(checkpoint_dir, copy)
        copy.chmod(0o755)
        (copy / "model.safetensors").chmod(0o600 if as_root else 0o000)
        # forked, so that the child has this venv's modules without exec'ing its interpreter
        # (which lies under /root, out of nobody's reach)
        with multiprocessing.get_context("fork").Pool(
            1, initializer=os.setuid if as_root else None, initargs=(NOBODY_UID,) if as_root else ()
        ) as child:
            problem = child.apply(checkpoint_problem, (copy,))
    uid = os.getuid() or NOBODY_UID
    assert problem == (
        "model.safetensors cannot be read: Permission denied "
        f"(the server runs as uid {uid}: make the checkpoint readable by it)"
    )


def test_a_sharded_checkpoint_is_checked_shard_by_shard(tmp_path):
    """Large checkpoints come in shards listed by model.safetensors.index.json: a whole one is
    served, one with a shard cut short or missing is refused."""
    model, processor = build_random_clip(tiny=True, seed=MODEL_DIR_SEED)
    model.save_pretrained(tmp_path, max_shard_size="200KB")
    processor.save_pretrained(tmp_path)
    assert find_checkpoint(str(tmp_path)) == tmp_path
    last = sorted(tmp_path.glob("model-*.safetensors"))[-1]
    with last.open("r+b") as shard:
        shard.truncate(last.stat().st_size - 10)
    with pytest.raises(ModelDirError, match=f"{last.name} is cut short"):
        find_checkpoint(str(tmp_path))
    last.unlink()
    with pytest.raises(ModelDirError, match=f"shard {last.name} .* is missing"):
        find_checkpoint(str(tmp_path))


def with_image_size(checkpoint_dir: Path, target: Path, image_size: int) -> Path:
    """A copy whose model takes `image_size` pixels, its processor still cropping to 224 (a
    fine-tune's config beside its base model's processor)."""
    shutil.copytree(checkpoint_dir, target)
    config = json.loads((target / "config.json").read_text())
    config["vision_config"]["image_size"] = image_size
    (target / "config.json").write_text(json.dumps(config))
    return target


def test_a_processor_cropping_to_another_size_than_the_model_takes_stops_the_start(
    checkpoint_dir, tmp_path
):
    """It imported and started, then the runner failed on every image, at each restart:
    "Input image size (224*224) doesn't match model (64*64)"."""
    mismatched = with_image_size(checkpoint_dir, tmp_path / "model", 64)
    with pytest.raises(ModelDirError, match=r"crops images to 224x224 pixels.*takes 64x64"):
        find_checkpoint(str(mismatched))


def test_an_older_layouts_image_processor_is_read_too(checkpoint_dir, tmp_path):
    """transformers 4 wrote preprocessor_config.json with an int crop_size (so do the published
    OpenAI checkpoints); its crop is checked as well."""
    older = tmp_path / "model"
    shutil.copytree(checkpoint_dir, older)
    nested = json.loads((older / "processor_config.json").read_text())["image_processor"]
    (older / "processor_config.json").unlink()
    flat = {**nested, "crop_size": 224}
    (older / "preprocessor_config.json").write_text(json.dumps(flat))
    assert checkpoint_problem(older) is None
    (older / "preprocessor_config.json").write_text(json.dumps({**flat, "crop_size": 336}))
    assert "crops images to 336x336 pixels" in checkpoint_problem(older)


def not_clip_store_model(name: str = "not-clip"):
    """A real store entry that is no CLIP checkpoint: another model's config and weights."""
    with bentoml.models.create(name) as stored:
        path = Path(stored.path)
        (path / "config.json").write_text(json.dumps({"model_type": "bert"}))
        (path / "model.safetensors").write_bytes(b"\0" * 16)
    return stored


def test_a_store_model_that_is_not_a_clip_checkpoint_stops_the_start(tiny_stored_model):
    """Its runner failed to load it at every restart, forever; the supervisor now refuses it."""
    stored = not_clip_store_model()
    try:
        with pytest.raises(StoredModelError, match=f"CLIP_MODEL_TAG {stored.tag} .*'bert'"):
            check_served_model(str(stored.tag), "")
    finally:
        bentoml.models.delete(stored.tag)
    check_served_model(str(tiny_stored_model.tag), "")  # a CLIP checkpoint starts
    check_served_model("clip:not-in-the-store", "")  # left to the runner, which names it


def test_the_model_directory_is_served_when_it_holds_a_checkpoint_else_the_store(
    checkpoint_dir, tmp_path, tiny_stored_model
):
    from_dir = load_served_clip(tiny_stored_model, str(checkpoint_dir))
    assert from_dir.tag == MODEL_DIR_TAG_PREFIX + str(checkpoint_dir)
    expected, _ = build_random_clip(tiny=True, seed=MODEL_DIR_SEED)
    for served, saved in zip(from_dir.model.parameters(), expected.parameters(), strict=True):
        assert torch.equal(served, saved)
    baked = load_served_clip(tiny_stored_model, str(tmp_path))  # empty: the store's model
    assert baked.tag == str(tiny_stored_model.tag)


def test_the_served_checkpoint_is_known_before_it_loads(
    checkpoint_dir, tmp_path, tiny_stored_model
):
    """What sizes the API workers: the model directory's checkpoint, else the store's; None
    when neither is there yet or the directory will be refused."""
    tag = str(tiny_stored_model.tag)
    assert served_checkpoint(tag, str(checkpoint_dir)) == checkpoint_dir
    stored_path = Path(bentoml.models.get(tag).path)  # where the store keeps it now
    assert served_checkpoint(tag, str(tmp_path)) == stored_path
    assert served_checkpoint("clip:not-in-the-store", str(tmp_path)) is None
    broken = broken_copy(checkpoint_dir, tmp_path / "broken", "config.json")
    assert served_checkpoint(tag, str(broken)) is None


# ---- real servers ----


def seed_request(served: ServedBento) -> tuple[list, list[str]]:
    images = [photo_like(320, 240, seed) for seed in (1, 2)]
    body = {"images": [as_base64(image) for image in images], "classes": SEED_CLASSES}
    answer = httpx.post(f"{served.url}/invocations", json=body, timeout=60)
    assert answer.status_code == 200, answer.text
    return answer.json(), images


def test_the_shared_server_with_an_empty_model_dir_serves_the_baked_in_model(
    served, tiny_stored_model
):
    answer = httpx.post(f"{served.url}/embed_texts", json={"texts": ["a cat"]}, timeout=30)
    assert answer.json()["model"] == str(tiny_stored_model.tag)
    log = served.log()
    assert "is empty: serving the baked-in model" in log
    assert "serving the CLIP checkpoint in" not in log


def test_a_server_serves_the_checkpoint_in_its_model_dir(
    checkpoint_dir, bentoml_home, tiny_stored_model, tiny_clip, tmp_path
):
    with bentoml_serve(
        bentoml_home,
        tmp_path / "serve.log",
        CLIP_MODEL_TAG=str(tiny_stored_model.tag),
        CLIP_MODEL_DIR=str(checkpoint_dir),
    ) as server:
        texts = httpx.post(f"{server.url}/embed_texts", json={"texts": ["a cat"]}, timeout=30)
        assert texts.json()["model"] == MODEL_DIR_TAG_PREFIX + str(checkpoint_dir)
        answer, images = seed_request(server)
        log = server.log()
    model, processor = build_random_clip(tiny=True, seed=MODEL_DIR_SEED)
    from_dir = LoadedClip("dir", model, processor, random_weights=True)
    names = [name for name, _ in SEED_CLASSES]
    prompts = [f"a photo of a {name}" for name in names]
    expected = reference_probabilities(from_dir, images, prompts)
    assert_matches_reference(answer, expected, names)
    baked = reference_probabilities(tiny_clip, images, prompts)
    assert not np.allclose(expected, baked, atol=1e-3)  # so the answers prove which model ran
    assert f"serving the CLIP checkpoint in {checkpoint_dir}" in log
    assert f"instead of the baked-in model {tiny_stored_model.tag}" in log


def serve_until_it_stops(
    bentoml_home: Path, tmp_path: Path, model_tag: str, model_dir: str
) -> tuple[int, str]:
    """The exit status and output of `bentoml serve` of the suite's store with this model and
    `CLIP_MODEL_DIR`, run until it stops by itself: a start that should stop but is restarted
    forever fails the test at 120 s (its workers killed: each has a process group of its own)."""
    home = tmp_path / "home"
    home.mkdir()
    (home / "models").symlink_to(bentoml_home / "models", target_is_directory=True)
    env = {
        **os.environ,
        "BENTOML_HOME": str(home),
        "CLIP_PORT": str(free_port()),
        "CLIP_MODEL_TAG": model_tag,
        "CLIP_MODEL_DIR": model_dir,
    }
    log_path = tmp_path / "serve.log"
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            [str(Path(sys.executable).with_name("bentoml")), "serve", "service:ClipService"],
            cwd=REPO_ROOT,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        returncode = process.wait(timeout=120)
    finally:
        stop_process_group(process)
    return returncode, log_path.read_text(errors="replace")


def test_a_model_dir_without_a_checkpoint_stops_bentoml_serve(
    bentoml_home, tiny_stored_model, tmp_path
):
    model_dir = tmp_path / "opt-ml-model"
    model_dir.mkdir()
    (model_dir / "classifier.pkl").write_bytes(b"\x80\x04")
    returncode, output = serve_until_it_stops(
        bentoml_home, tmp_path, str(tiny_stored_model.tag), str(model_dir)
    )
    assert returncode != 0
    assert f"CLIP_MODEL_DIR {model_dir} holds no CLIP checkpoint" in output, output[-3000:]
    assert "It holds: classifier.pkl" in output


def test_a_store_model_that_is_not_a_clip_checkpoint_stops_bentoml_serve(bentoml_home, tmp_path):
    stored = not_clip_store_model("not-clip-serve")
    try:
        returncode, output = serve_until_it_stops(bentoml_home, tmp_path, str(stored.tag), "")
    finally:
        bentoml.models.delete(stored.tag)
    assert returncode != 0
    assert f"CLIP_MODEL_TAG {stored.tag} is not a CLIP checkpoint" in output, output[-3000:]
    assert "model_type 'bert'" in output and "Traceback" not in output


def test_weights_the_runner_cannot_load_stop_the_server_not_restart_it_forever(
    bentoml_home, tiny_stored_model, checkpoint_dir, tmp_path
):
    """Complete files the supervisor's check passes, lacking a weight: the runner's load fails.
    Its supervisor had restarted it forever, `/ping` saying 503 "still loading", until a
    SageMaker endpoint's start-up timeout (up to an hour) ran out."""
    cut = drop_weights(checkpoint_dir, tmp_path / "cut", "logit_scale")
    status, output = serve_until_it_stops(
        bentoml_home, tmp_path, str(tiny_stored_model.tag), str(cut)
    )
    assert f"the CLIP checkpoint in {cut} does not load" in output, output[-3000:]
    assert status == STOPPED_STATUS  # a failure: it had exited 0, as by `docker stop`
    assert "(logit_scale)" in output
    # once: this start's, not one per restart
    assert output.count("stopping the server: every restart would fail the same way") == 1


CLIPS_PROCESSOR = {  # OpenAI's and LAION's settings
    "do_resize": True,
    "size": {"shortest_edge": 224},
    "resample": 3,
    "do_center_crop": True,
    "crop_size": {"height": 224, "width": 224},
    "do_rescale": True,
    "do_normalize": True,
    "image_mean": [0.48145466, 0.4578275, 0.40821073],
}


@pytest.mark.parametrize(
    ("change", "says"),
    [
        # the runner had failed at every start (TypeError on int(None))
        ({"size": {"height": 224, "width": 224}}, "not by their shortest edge"),
        # served, with answers transformers would not give (1.9e-4 to 6.7e-2 apart at scale 10)
        ({"resample": 2}, "resamples with Pillow's filter 2"),
        ({"do_resize": False}, "does not resize images"),
        ({"do_rescale": False}, "do_rescale false"),
        ({"do_normalize": False}, "do_normalize false"),
        # no crop: the resized image is the model's input, which must be its size
        ({"do_center_crop": False, "size": {"shortest_edge": 256}}, "crops images to 256x256"),
        ({"crop_size": {"height": 336, "width": 336}}, "crops images to 336x336"),
        # a center crop of no size: the runner had failed at every start (size_value(None))
        ({"crop_size": None}, "center-crops to None: no size"),
        # transformers caps the longest edge too: a 600x300 image became 256x128
        ({"size": {"shortest_edge": 224, "longest_edge": 256}}, "not by their shortest edge"),
    ],
)
def test_an_image_processor_the_server_would_not_follow_is_named(change, says):
    assert says in image_processor_problem({**CLIPS_PROCESSOR, **change}, 224)


@pytest.mark.parametrize(
    "change",
    [
        {},
        {"size": 224, "crop_size": 224},  # transformers 4's layout (the published checkpoints)
        {"do_center_crop": False},  # the resized image, cropped square as the model takes it
        {"image_mean": 0.5, "image_std": 0.5},  # one number for every channel
    ],
)
def test_clips_own_image_processors_are_served(change):
    assert image_processor_problem({**CLIPS_PROCESSOR, **change}, 224) is None


def test_settings_a_config_leaves_out_are_clips_defaults(checkpoint_dir, tmp_path):
    """A minimal processor config (transformers fills in CLIP's defaults) had been refused by the
    file check ("resizes images to None") where the model loads and serves."""
    minimal = tmp_path / "model"
    shutil.copytree(checkpoint_dir, minimal)
    (minimal / "processor_config.json").unlink()
    config = {"image_processor_type": "CLIPImageProcessor"}
    (minimal / "preprocessor_config.json").write_text(json.dumps(config))
    assert checkpoint_problem(minimal) is None
    model, processor = load_checkpoint(minimal)  # and transformers' own reading agrees
    assert image_processor_problem(processor.image_processor.to_dict(), 224) is None
