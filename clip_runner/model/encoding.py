"""The runner's tensor math: uint8 pixels / texts -> L2-normalised CLIP embeddings.

Kept free of BentoML so it can be checked against transformers directly. Normalisation
(mean/std) happens here, on the model's device, so the API service can ship compact uint8 arrays.
In fp32 it is folded into the patch embedding's weights (`raw_pixel_patch_embedding`).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from transformers import CLIPModel, CLIPProcessor

from clip_runner.model.cuda_graphs import ReplayedForward, batch_buckets
from clip_runner.model.device_wait import to_device, to_host
from clip_runner.model.model_facts import ModelFacts
from clip_runner.model.model_source import served_crop, served_shortest_edge

logger = logging.getLogger(__name__)

# Present wherever the NVIDIA kernel driver is loaded (inside containers too).
NVIDIA_DRIVER_VERSION = Path("/proc/driver/nvidia/version")


# CLIP_DTYPE -> the model's dtype. `auto` is the original container's: float16 on a GPU, float32
# on CPU (the contract's numbers).
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# CPU flags (as /proc/cpuinfo names them, x86 and Arm) of instructions for a half type's matrix
# products. Without them oneDNN converts to float32 and back around each product, which is slower
# than float32 itself.
NATIVE_CPU_FLAGS = {
    torch.bfloat16: frozenset({"avx512_bf16", "amx_bf16", "bf16"}),
    torch.float16: frozenset({"avx512_fp16", "amx_fp16"}),
}
CPU_INFO = Path("/proc/cpuinfo")


# The CUDA runtime's words for a GPU a build holds no code for (cudaErrorNoKernelImageForDevice).
NO_KERNEL_IMAGE = "no kernel image is available"


def cuda_kernel_failure() -> str | None:
    """None where a kernel runs on the GPU; the error's first line where torch holds no code for
    it. torch counts such a GPU (a V100 under a CUDA 13 build) as available, and only its first
    kernel fails: a runner that went on would fail at its warm-up and be restarted for good, the
    endpoint never ready. Any other error (memory, a busy or broken device) is raised, as the
    runner's start would have raised it: BentoML starts a fresh runner, where the CPU would
    have served on, far slower, with /ping at 200."""
    try:
        torch.ones(1, device="cuda").add_(1).cpu()
    except RuntimeError as exc:
        if NO_KERNEL_IMAGE not in str(exc):
            raise
        return str(exc).strip().splitlines()[0]
    return None


def gpu_description() -> str:
    """The GPU's name and compute capability, for the log; "?" where the GPU cannot say."""
    try:
        major, minor = torch.cuda.get_device_capability()
        return f"{torch.cuda.get_device_name()} (compute capability {major}.{minor})"
    except Exception:  # a broken GPU may fail even this; the warning goes out all the same
        return "?"


def cpu_flags(cpu_info: Path = CPU_INFO) -> frozenset[str]:
    """The first processor's feature flags ("flags" on x86, "Features" on Arm); none where the
    file cannot be read (not Linux)."""
    try:
        text = cpu_info.read_text(errors="replace")
    except OSError:
        return frozenset()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            return frozenset(value.split())
    return frozenset()


def pick_device(
    driver_version: Path = NVIDIA_DRIVER_VERSION, dtype_choice: str = "auto"
) -> tuple[torch.device, torch.dtype]:
    """CUDA when a GPU is visible, else the CPU; and the model's dtype there: `dtype_choice`
    (CLIP_DTYPE), by default float16 on a GPU and float32 on CPU, as the original container.

    A host with an NVIDIA driver whose GPU torch cannot use (a driver older than torch's CUDA
    build needs, or a CPU build of torch) is served on the CPU with a warning: such an endpoint
    would otherwise be slow with only "ready on cpu" in its log. So is a half type on a CPU
    without instructions for it (`NATIVE_CPU_FLAGS`).
    """
    device = _usable_device(driver_version)
    if dtype_choice == "auto":
        return device, torch.float16 if device.type == "cuda" else torch.float32
    dtype = DTYPES[dtype_choice]
    native_flags = NATIVE_CPU_FLAGS.get(dtype)
    if device.type == "cpu" and native_flags and not native_flags & cpu_flags():
        logger.warning(
            "CLIP_DTYPE=%s on a CPU without instructions for it (none of %s in its flags): "
            "its matrix products are converted to float32 and back, likely slower than "
            "CLIP_DTYPE=float32",
            dtype_choice,
            ", ".join(sorted(native_flags)),
        )
    return device, dtype


def _usable_device(driver_version: Path) -> torch.device:
    if torch.cuda.is_available():
        failure = cuda_kernel_failure()
        if failure is None:
            return torch.device("cuda")
        logger.warning(
            "the GPU %s cannot run torch %s's kernels (%s): serving on the CPU. This torch is "
            "built for %s; a CUDA 13 torch leaves out GPUs older than Turing, such as the V100 "
            "(README, 'Deploy to SageMaker')",
            gpu_description(),
            torch.__version__,
            failure,
            " ".join(torch.cuda.get_arch_list()) or "no GPU architecture",
        )
        return torch.device("cpu")
    if driver_version.exists():
        found = driver_version.read_text(errors="replace").splitlines()[:1] or ["unknown"]
        logger.warning(
            "an NVIDIA driver is loaded (%s) but torch %s (CUDA build: %s) can use no GPU: "
            "serving on the CPU. A CUDA 13 torch needs driver 580 or newer (README, 'Deploy to "
            "SageMaker')",
            found[0].strip(),
            torch.__version__,
            torch.version.cuda or "none",
        )
    return torch.device("cpu")


def _as_embedding(output: Any) -> torch.Tensor:
    """transformers 5 returns output objects from get_*_features; older versions a tensor."""
    return output if isinstance(output, torch.Tensor) else output.pooler_output


def size_value(size: Any, key: str) -> int:
    """Image-processor sizes are dicts in some transformers versions, SizeDicts in others."""
    return int(size[key] if isinstance(size, dict) else getattr(size, key))


def _unit_rows(embeddings: torch.Tensor) -> torch.Tensor:
    embeddings = embeddings.float()
    return embeddings / embeddings.norm(dim=-1, keepdim=True).clamp_min(1e-12)


def raw_pixel_patch_embedding(
    conv: nn.Conv2d, scale: torch.Tensor, offset: torch.Tensor
) -> nn.Conv2d:
    """`conv` for raw pixels: the new layer gives conv(x * scale + offset) (per channel) for x
    in 0..255, with the scale folded into its weights and the offset into a bias.

    The vision tower's first layer is linear and unpadded, so this is exact up to float
    rounding. It saves normalising every image (a pass over the batch that cost the tiny model
    more than its whole forward pass). Only for fp32: in fp16 the folded weights, about 1/70 of
    the originals, would lose precision.
    """
    if conv.padding not in ((0, 0), "valid") or conv.groups != 1:
        raise ValueError("only an unpadded, ungrouped patch embedding can take raw pixels")
    weight = conv.weight.detach()
    folded = nn.Conv2d(
        conv.in_channels,
        conv.out_channels,
        conv.kernel_size,
        conv.stride,
        bias=True,
        device=weight.device,
        dtype=weight.dtype,
    )
    with torch.no_grad():
        folded.weight.copy_(weight * scale.view(1, -1, 1, 1))
        bias = (weight * offset.view(1, -1, 1, 1)).sum(dim=(1, 2, 3))
        folded.bias.copy_(bias if conv.bias is None else bias + conv.bias.detach())
    return folded.requires_grad_(False)


def padded_batch(
    token_ids: Sequence[Sequence[int]], pad_id: int, side: str, max_tokens: int, vocab_size: int
) -> tuple[np.ndarray, np.ndarray]:
    """int64 (N, longest) input ids and attention mask of prompts' token ids, padded with
    `pad_id` on `side` ("right" or "left"): what the tokenizer's `padding=True` gives.

    An id outside the model's `vocab_size` is a ValueError here: on a GPU the embedding lookup
    would fail as a device-side assert, which breaks the CUDA context and the runner with it."""
    lengths = [len(ids) for ids in token_ids]
    longest = max(lengths)
    if longest > max_tokens:
        raise ValueError(f"a prompt of {longest} tokens; the model reads at most {max_tokens}")
    input_ids = np.full((len(token_ids), longest), pad_id, dtype=np.int64)
    attention_mask = np.zeros((len(token_ids), longest), dtype=np.int64)
    for row, (ids, length) in enumerate(zip(token_ids, lengths, strict=True)):
        columns = slice(longest - length, longest) if side == "left" else slice(0, length)
        input_ids[row, columns] = ids
        attention_mask[row, columns] = 1
    if input_ids.min() < 0 or input_ids.max() >= vocab_size:
        raise ValueError(f"a token id outside the model's vocabulary of {vocab_size}")
    return input_ids, attention_mask


class ClipEncoder:
    """Owns one CLIP model on one device; encodes batches of images and texts.

    It takes the model over: moves it to `device` and `dtype` and, in fp32, gives its vision
    tower a first layer that takes raw 0-255 pixels (pass a copy to keep the original).
    """

    def __init__(
        self,
        model: CLIPModel,
        processor: CLIPProcessor,
        device: torch.device,
        dtype: torch.dtype,
        spin_waits: bool = False,
    ) -> None:
        """`spin_waits`: wait for the GPU's answers by polling (CLIP_CUDA_WAIT=spin) rather
        than asleep (device_wait.py)."""
        self.device = device
        self.dtype = dtype
        self.spin_waits = spin_waits
        # Read before the cast: in fp16, ln(100) rounds to 4.6055 and exp() gives 100.03, so a
        # GPU would answer with another logit scale than the checkpoint's (and the CPU's).
        self.logit_scale = float(model.logit_scale.detach().float().exp().item())
        self.model = model.to(device=device, dtype=dtype).eval()
        if device.type == "cuda" and dtype == torch.float32:
            # CLIP_DTYPE=float32 on a GPU means float32: cuDNN would run the patch embedding's
            # convolution in TF32 (10-bit mantissa) by default.
            torch.backends.cudnn.allow_tf32 = False
            torch.backends.cuda.matmul.allow_tf32 = False
        self.tokenizer = processor.tokenizer
        image_processor = processor.image_processor
        mean, std = (  # one number is every channel's (transformers broadcasts it too)
            torch.tensor(values, device=device, dtype=torch.float32).reshape(-1).expand(3).clone()
            for values in (image_processor.image_mean, image_processor.image_std)
        )
        rescale = float(getattr(image_processor, "rescale_factor", 1 / 255))
        # Normalising is x * scale + offset, per channel.
        self.scale, self.offset = (rescale / std).view(1, 3, 1, 1), (-mean / std).view(1, 3, 1, 1)
        self.raw_pixels = dtype == torch.float32
        if self.raw_pixels:
            embeddings = self.model.vision_model.embeddings
            embeddings.patch_embedding = raw_pixel_patch_embedding(
                embeddings.patch_embedding, self.scale.flatten(), self.offset.flatten()
            )
        self.max_text_tokens = int(model.config.text_config.max_position_embeddings)
        self.vocab_size = int(model.config.text_config.vocab_size)
        # The resize and the center crop (without one, the resized image cropped square), read
        # as the loader's check reads them (model_source.image_processor_problem refused the
        # processors where they cannot be).
        settings = image_processor.to_dict()
        shortest, crop = served_shortest_edge(settings), served_crop(settings)
        if shortest is None or crop is None:
            raise ValueError(f"the image processor's resize cannot be read: {image_processor}")
        self.shortest_edge = shortest
        self.crop_height, self.crop_width = crop
        self.replayed: ReplayedForward | None = None

    def facts(self, tag: str, random_weights: bool) -> ModelFacts:
        return ModelFacts(
            tag=tag,
            embedding_dim=int(self.model.config.projection_dim),
            logit_scale=self.logit_scale,
            shortest_edge=self.shortest_edge,
            crop_height=self.crop_height,
            crop_width=self.crop_width,
            max_text_tokens=self.max_text_tokens,
            random_weights=random_weights,
        )

    def tokenizer_json(self) -> str:
        """The model's Rust tokenizer as JSON, for the API workers to tokenize prompts with
        (answers/token_ids.py) without loading transformers. Every CLIP tokenizer in
        transformers 5 has one; a checkpoint whose tokenizer has none is refused here."""
        backend = getattr(self.tokenizer, "backend_tokenizer", None)
        if backend is None:
            raise ValueError(
                f"the model's tokenizer ({type(self.tokenizer).__name__}) is not backed by the "
                "Rust `tokenizers` library, which the API workers tokenize prompts with: save "
                "the checkpoint with its fast tokenizer (tokenizer.json)"
            )
        return backend.to_str()

    def compile_towers(self) -> None:
        """`torch.compile` both towers, dynamic shapes: batch sizes and prompt lengths vary.

        Opt-in (`CLIP_TORCH_COMPILE=on`): on 2 CPU cores it made the bare image encoder about 7%
        faster for about 45 s more start-up (BENCHMARKS.md); compilation happens on first use,
        which the runner's warm-up pays before the service reports ready.
        """
        self.model.vision_model = torch.compile(self.model.vision_model, dynamic=True)
        self.model.text_model = torch.compile(self.model.text_model, dynamic=True)

    @torch.inference_mode()
    def replay_image_passes(self, max_batch: int) -> None:
        """Run the image tower from CUDA graphs, one per batch bucket up to `max_batch`
        (cuda_graphs.py; on CPU the same staging, run eagerly). On a GPU by default
        (`CLIP_CUDA_GRAPHS=auto`); recording raises if the model cannot be captured."""
        shape = (3, self.crop_height, self.crop_width)
        self.replayed = ReplayedForward(
            self._image_features, shape, self.device, batch_buckets(max_batch), self.spin_waits
        )

    def encode_images(self, pixels: np.ndarray) -> np.ndarray:
        """uint8 (N, H, W, 3) -> float32 (N, D), unit length."""
        batch = to_device(torch.from_numpy(np.ascontiguousarray(pixels)), self.device)
        return self.encode_pixels(batch.permute(0, 3, 1, 2))

    @torch.inference_mode()
    def encode_pixels(self, pixels: torch.Tensor) -> np.ndarray:
        """uint8 (N, 3, H, W) already on the model's device -> float32 (N, D), unit length."""
        if self.replayed is not None:
            return self.replayed(pixels)
        return to_host(self._image_features(pixels), self.spin_waits)

    def _image_features(self, pixels: torch.Tensor) -> torch.Tensor:
        """The forward pass on the device, normalisation to unit length included (so that a
        CUDA graph holds all of it)."""
        if self.raw_pixels:
            batch = pixels.to(self.dtype)
        else:
            batch = (pixels.float() * self.scale + self.offset).to(self.dtype)
        return _unit_rows(_as_embedding(self.model.get_image_features(pixel_values=batch)))

    def encode_texts(self, texts: Sequence[str]) -> np.ndarray:
        """Texts -> float32 (N, D), unit length; prompts past the token limit are truncated."""
        tokens = self.tokenizer(list(texts), truncation=True, max_length=self.max_text_tokens)
        return self.encode_token_ids(tokens["input_ids"])

    @torch.inference_mode()
    def encode_token_ids(self, token_ids: Sequence[Sequence[int]]) -> np.ndarray:
        """Prompts' token ids as this model's tokenizer gives them (special tokens included, at
        most `max_text_tokens` each) -> float32 (N, D), unit length.

        The runner takes token ids, not texts: the API workers tokenize every prompt anyway to
        check its length, and tokenizing in the runner too cost its inference thread about a
        quarter of its time on uncached prompts (tiny model; BENCHMARKS.md), a process that
        does not scale with cores as the API workers do."""
        pad_id, side = self.tokenizer.pad_token_id, self.tokenizer.padding_side
        input_ids, attention_mask = padded_batch(
            token_ids, pad_id, side, self.max_text_tokens, self.vocab_size
        )
        features = self.model.get_text_features(
            input_ids=to_device(torch.from_numpy(input_ids), self.device),
            attention_mask=to_device(torch.from_numpy(attention_mask), self.device),
        )
        return to_host(_unit_rows(_as_embedding(features)), self.spin_waits)
