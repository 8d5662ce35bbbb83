"""Put CLIP checkpoints into the BentoML model store and read them back.

A stored model is the `save_pretrained` output of a transformers `CLIPModel` plus its
`CLIPProcessor` (tokenizer + image processor), tagged `clip:<version>`, with labels saying where
it came from and whether its weights are random (tests and benchmarks use random weights, since
this project's own machines cannot reach the Hugging Face hub).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import httpx
import torch
import transformers
from transformers import (
    AutoTokenizer,
    CLIPConfig,
    CLIPImageProcessorPil,
    CLIPModel,
    CLIPProcessor,
    CLIPTokenizer,
)

if TYPE_CHECKING:
    import bentoml

logger = logging.getLogger(__name__)

MODEL_NAME = "clip"
OPENAI_MEAN = [0.48145466, 0.4578275, 0.40821073]
OPENAI_STD = [0.26862954, 0.26130258, 0.27577711]
TINY_SEED = 0

# Words the generated tokenizer gets merges for; anything else falls back to characters.
TINY_VOCAB_WORDS = (
    "a photo of an the with and in on person people man woman child bag black white red green "
    "blue yellow shirt riding horse dog cat car bus bird tree house street food apple banana "
    "pizza flower sky water beach mountain computer phone book chair table cup bottle boat "
    "plane train bicycle picture drawing small large"
).split()


OFFLINE_ADVICE = (
    "Without internet, import a local checkpoint with `--from-dir DIR` (save_pretrained layout) "
    "or a small random-weight test model with `--tiny` (make serve IMPORT_ARGS=--tiny)."
)


class HubUnavailableError(RuntimeError):
    """The Hugging Face hub could not be reached (offline, firewalled, or unknown model id)."""


class CheckpointError(ValueError):
    """A checkpoint that is not a whole CLIPModel. transformers loads one anyway, with random
    (or uninitialised) values for what it lacks, and answers would silently be noise."""


@dataclass(frozen=True)
class LoadedClip:
    """A CLIP model read back from the store, with the facts the service needs about it."""

    tag: str
    model: CLIPModel
    processor: CLIPProcessor
    random_weights: bool


def _bytes_to_unicode() -> dict[int, str]:
    """CLIP's (and GPT-2's) reversible byte -> printable-character map used by its BPE."""
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    codes = printable[:]
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            codes.append(256 + extra)
            extra += 1
    return {byte: chr(code) for byte, code in zip(printable, codes, strict=True)}


def build_tiny_tokenizer(words: tuple[str, ...] | list[str] = TINY_VOCAB_WORDS) -> CLIPTokenizer:
    """A real byte-level BPE `CLIPTokenizer` over a small generated vocabulary.

    Every byte is a token (so any text tokenizes), and each listed word gets merges that build
    it up from its letters, so common prompts become shorter, distinct token sequences.
    """
    alphabet = list(_bytes_to_unicode().values())
    vocab_tokens: list[str] = alphabet + [ch + "</w>" for ch in alphabet]
    merges: list[tuple[str, str]] = []
    seen_merges: set[tuple[str, str]] = set()
    for word in words:
        symbols = list(word[:-1]) + [word[-1] + "</w>"]
        merged = symbols[0]
        for symbol in symbols[1:]:
            merge = (merged, symbol)
            merged += symbol
            if merge not in seen_merges:
                seen_merges.add(merge)
                merges.append(merge)
                vocab_tokens.append(merged)
    vocab_tokens += ["<|startoftext|>", "<|endoftext|>"]
    vocab = {token: index for index, token in enumerate(dict.fromkeys(vocab_tokens))}
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=77)


def build_image_processor(image_size: int = 224) -> CLIPImageProcessorPil:
    """OpenAI CLIP's preprocessing: bicubic resize of the shortest side, center crop, normalise."""
    return CLIPImageProcessorPil(
        do_resize=True,
        size={"shortest_edge": image_size},
        resample=3,  # PIL bicubic
        do_center_crop=True,
        crop_size={"height": image_size, "width": image_size},
        do_rescale=True,
        rescale_factor=1 / 255,
        do_normalize=True,
        image_mean=OPENAI_MEAN,
        image_std=OPENAI_STD,
        do_convert_rgb=True,
    )


@dataclass(frozen=True)
class Architecture:
    """A CLIP's shapes: enough to build it with random weights (speed and memory do not depend
    on weight values, so these stand in for the published checkpoints here)."""

    vision: tuple[int, int, int]  # width, layers, heads
    patch_size: int
    image_size: int
    text: tuple[int, int, int]
    projection_dim: int
    hidden_act: str = "quick_gelu"  # OpenAI's; LAION's OpenCLIP models use "gelu"
    # CLIP's BPE vocabulary: the published checkpoints' token embeddings (25-50 M parameters).
    # The generated tokenizer uses only its first few hundred ids; None: just those (tiny).
    vocab_size: int | None = 49408


ARCHITECTURES = {
    "tiny": Architecture((32, 2, 2), 32, 224, (32, 2, 2), 16, vocab_size=None),
    "vit-b32": Architecture((768, 12, 12), 32, 224, (512, 12, 8), 512),
    "vit-b16": Architecture((768, 12, 12), 16, 224, (512, 12, 8), 512),
    "vit-l14": Architecture((1024, 24, 16), 14, 224, (768, 12, 12), 768),
    "vit-l14-336": Architecture((1024, 24, 16), 14, 336, (768, 12, 12), 768),
    "laion-vit-h14": Architecture((1280, 32, 16), 14, 224, (1024, 24, 16), 1024, "gelu"),
}


def _tower(shape: tuple[int, int, int], hidden_act: str) -> dict[str, int | str]:
    """A transformer tower's shape, with CLIP's 4x MLP expansion."""
    width, layers, heads = shape
    return dict(
        hidden_size=width,
        intermediate_size=4 * width,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        hidden_act=hidden_act,
    )


def build_random_architecture(name: str, seed: int = TINY_SEED) -> tuple[CLIPModel, CLIPProcessor]:
    """A CLIP of `ARCHITECTURES[name]`'s shapes with random weights and a generated tokenizer.

    The text config's bos/eos/pad ids are taken from the tokenizer: CLIP pools text at the eos
    token, so a mismatch would silently pool the wrong position.
    """
    architecture = ARCHITECTURES[name]
    tokenizer = build_tiny_tokenizer()
    special_ids = {
        "vocab_size": architecture.vocab_size or len(tokenizer),
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
        "max_position_embeddings": 77,
    }
    config = CLIPConfig(
        text_config={**_tower(architecture.text, architecture.hidden_act), **special_ids},
        vision_config={
            **_tower(architecture.vision, architecture.hidden_act),
            "image_size": architecture.image_size,
            "patch_size": architecture.patch_size,
        },
        projection_dim=architecture.projection_dim,
    )
    torch.manual_seed(seed)
    model = CLIPModel(config).eval()
    image_processor = build_image_processor(architecture.image_size)
    return model, CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer)


def build_random_clip(tiny: bool, seed: int = TINY_SEED) -> tuple[CLIPModel, CLIPProcessor]:
    """The tiny test model (a few hundred thousand parameters), or ViT-B/32's shapes."""
    return build_random_architecture("tiny" if tiny else "vit-b32", seed)


def check_hub_reachable(model_id: str, timeout_s: float = 5.0) -> None:
    """Fail fast, with advice, when the hub cannot be reached (instead of minutes of retries).

    Skipped under HF_HUB_OFFLINE, where transformers reads the local Hugging Face cache.
    """
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on"):
        return
    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co").rstrip("/")
    try:
        response = httpx.head(f"{endpoint}/api/models/{model_id}", timeout=timeout_s)
    except httpx.HTTPError as exc:
        raise HubUnavailableError(
            f"cannot reach the Hugging Face hub at {endpoint} ({_first_line(exc)}). "
            + OFFLINE_ADVICE
        ) from exc
    if response.status_code == 404:
        raise HubUnavailableError(f"model {model_id!r} does not exist on {endpoint}")


def load_processor(source: str | Path) -> CLIPProcessor:
    """The checkpoint's `CLIPProcessor`, with the Pillow image processor whatever is installed.

    Why: transformers 5 picks its torchvision image processor whenever torchvision is
    installed (as on every GPU host, for nvJPEG), even for a checkpoint saved with the Pillow
    one, and its resize gives other pixels (632 of 150,528 differed on a 640x480 noise image;
    README, Fidelity). The original container's pixels, and so this service's and its fidelity
    reference's, are Pillow's. Built from its parts: `from_pretrained(backend="pil")` would
    hand `backend` to the tokenizer too, which would then save it in its config.
    """
    return CLIPProcessor(
        image_processor=CLIPImageProcessorPil.from_pretrained(source),
        tokenizer=AutoTokenizer.from_pretrained(source),
    )


def load_clip_model(source: str | Path, **options: object) -> CLIPModel:
    """`CLIPModel.from_pretrained`, refusing a checkpoint that is not a whole CLIPModel.

    Used wherever a checkpoint is read (imports from a directory or the hub, and serving), since
    transformers only warns on another model type, or on weights it did not find, and fills
    those in with random or uninitialised values (a BERT saved as a CLIP; a CLIP missing
    `logit_scale`, served with 0, 1 or inf). Weights the model has no place for are ignored.
    """
    from clip_runner.model.model_source import model_type_problem

    config, _ = CLIPConfig.get_config_dict(source)
    problem = model_type_problem(config)
    if problem is not None:
        raise CheckpointError(f"{source} is not a CLIP checkpoint: {problem}")
    model, info = CLIPModel.from_pretrained(source, output_loading_info=True, **options)
    missing = sorted(info["missing_keys"])
    if missing:
        shown = ", ".join(missing[:5]) + (", ..." if len(missing) > 5 else "")
        raise CheckpointError(
            f"{source} lacks {len(missing)} of a CLIPModel's weights ({shown}): not a whole "
            "CLIP checkpoint (a text or vision tower alone, another model, or a cut-down save?)"
        )
    return model.eval()


def load_pieces(source: str | Path, **options: object) -> tuple[CLIPModel, CLIPProcessor]:
    """A checkpoint's model (`load_clip_model` with `options`) and processor, refusing an
    image processor this server would not follow (model_source.image_processor_problem), a
    tokenizer without a pad token, and a tokenizer that names tokens the text model has no
    embedding for (tokens added to it, the
    embedding table left as it was). Such a token's id had reached the forward pass: on CPU an
    IndexError that failed every prompt in its batch, as a 503 to retry; on a GPU a device-side
    assert, which breaks the CUDA context and so the runner process, at every such prompt.
    """
    from clip_runner.model.model_source import image_processor_problem

    model = load_clip_model(source, **options)
    processor = load_processor(source)
    image_size = model.config.vision_config.image_size
    if problem := image_processor_problem(processor.image_processor.to_dict(), image_size):
        raise CheckpointError(f"{source}: {problem}")
    if processor.tokenizer.pad_token_id is None:  # transformers cannot batch its prompts either
        raise CheckpointError(
            f"{source}: its tokenizer has no pad token, so prompts of different lengths cannot "
            "be encoded together (set tokenizer_config.json's pad_token, as CLIP's have it)"
        )
    tokens, embeddings = len(processor.tokenizer), model.config.text_config.vocab_size
    if tokens > embeddings:
        raise CheckpointError(
            f"{source}: its tokenizer has {tokens} tokens, its text model embeddings for "
            f"{embeddings}: tokens were added to the tokenizer without growing the text model's "
            "token embeddings (and text_config.vocab_size), so prompts using them cannot be "
            "encoded"
        )
    return model, processor


def load_from_hub(model_id: str) -> tuple[CLIPModel, CLIPProcessor]:
    """Download a checkpoint from the Hugging Face hub (transformers shows a progress bar)."""
    check_hub_reachable(model_id)
    try:
        return load_pieces(model_id)
    except OSError as exc:
        raise HubUnavailableError(
            f"could not download {model_id!r} from the Hugging Face hub ({_first_line(exc)}). "
            f"{OFFLINE_ADVICE}"
        ) from exc


def load_from_dir(path: Path) -> tuple[CLIPModel, CLIPProcessor]:
    """Read a checkpoint in `save_pretrained` layout (model + processor files) from disk."""
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{path} has no config.json: not a save_pretrained directory")
    return load_pieces(path)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def save_clip(
    model: CLIPModel, processor: CLIPProcessor, source: str, random_weights: bool
) -> bentoml.Model:
    """Save model + processor into the BentoML store as `clip:<new version>`."""
    config = model.config
    labels = {"source": source, "random_weights": str(random_weights).lower()}
    metadata = {
        "source": source,
        "random_weights": random_weights,
        "embedding_dim": int(config.projection_dim),
        "image_size": int(config.vision_config.image_size),
        "logit_scale": float(model.logit_scale.exp().item()),
        "parameters": int(sum(p.numel() for p in model.parameters())),
        "transformers_version": transformers.__version__,
    }
    import bentoml  # only here and below: the random-model builders work without BentoML

    tag = None
    try:
        with bentoml.models.create(MODEL_NAME, labels=labels, metadata=metadata) as stored:
            tag = stored.tag
            model.save_pretrained(stored.path)
            processor.save_pretrained(stored.path)
    except BaseException:
        _remove_partial_entry(tag)
        raise
    logger.info("saved %s (%s)", stored.tag, source)
    return stored


def _remove_partial_entry(tag: object) -> None:
    """Deletes what an interrupted save left in the store. BentoML removes it on an Exception
    only: after Ctrl-C or a SIGTERM (KeyboardInterrupt, SystemExit) while it copies the files
    in, a half-written entry stayed, cut-short weights and all."""
    if tag is None:
        return
    import bentoml

    try:
        bentoml.models.delete(tag)
    except Exception:  # not there (BentoML removed it on an Exception), or half gone already
        logger.debug("no partial store entry %s to remove", tag, exc_info=True)


def load_checkpoint(path: Path) -> tuple[CLIPModel, CLIPProcessor]:
    """A checkpoint in `save_pretrained` layout, as the runner serves it (CPU, fp32, sdpa)."""
    return load_pieces(path, attn_implementation="sdpa")


def load_clip(stored: bentoml.Model) -> LoadedClip:
    """Read a stored model back into memory (CPU, fp32; the runner moves it to its device)."""
    model, processor = load_checkpoint(Path(stored.path))
    random_weights = str(stored.info.labels.get("random_weights", "false")) == "true"
    return LoadedClip(
        tag=str(stored.tag), model=model, processor=processor, random_weights=random_weights
    )
