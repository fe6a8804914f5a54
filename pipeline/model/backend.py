"""Which backend runs a recipe (unsloth or hf, and why) and what `model.dtype` means on this device."""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from importlib import metadata
from typing import Any

from packaging.requirements import Requirement

from pipeline.errors import UserError
from pipeline.recipe import Recipe


@dataclass(frozen=True)
class Backend:
    name: str  # "hf" or "unsloth"
    reason: str
    device: str  # "cpu" or "cuda"


def cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def resolve_backend(recipe: Recipe) -> Backend:
    """Pick the backend and say why; `unsloth` where it cannot run is the user's error."""
    wanted = recipe.model.backend
    has_cuda = cuda_available()
    has_unsloth = importlib.util.find_spec("unsloth") is not None
    device = "cuda" if has_cuda else "cpu"
    if wanted == "hf":
        return Backend("hf", "model.backend=hf", device)
    if wanted == "unsloth":
        if not has_cuda:
            raise UserError(
                "model.backend=unsloth needs a CUDA GPU and none was found (torch.cuda.is_available() is False); use "
                "model.backend=auto or hf"
            )
        if not has_unsloth:
            raise UserError(
                "model.backend=unsloth: unsloth is not installed; run `make setup GPU=1` or use model.backend=auto"
            )
        conflicts = unsloth_conflicts()
        if conflicts:
            raise UserError(
                f"model.backend=unsloth: {'; '.join(conflicts)}; run `make setup GPU=1` (constraints/gpu.txt)"
            )
        if recipe.model.adapter or recipe.method == "sft":
            raise UserError(
                "model.backend=unsloth: twin adapters and SFT run on the hf backend for now; use model.backend=auto"
            )
        return Backend("unsloth", "model.backend=unsloth", device)
    if has_cuda and has_unsloth:
        conflicts = unsloth_conflicts()
        if conflicts:
            return Backend("hf", f"auto: unsloth is installed but {conflicts[0]}", device)
        if recipe.model.adapter or recipe.method == "sft":
            return Backend("hf", "auto: twin adapters and SFT run on the hf backend", device)
        return Backend("unsloth", "auto: CUDA GPU found and unsloth is installed", device)
    if has_cuda:
        return Backend("hf", "auto: CUDA GPU found but unsloth is not installed (make setup GPU=1)", device)
    return Backend("hf", "auto: no CUDA GPU, so transformers + PEFT on CPU", device)


def cpu_has_bf16() -> bool:
    """Native bf16 matmul on this CPU (AVX512-BF16 or AMX): several times fp32's speed (README, Two commands)."""
    import torch

    try:
        return bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):  # pragma: no cover - older torch
        return False


@dataclass(frozen=True)
class Precision:
    weights: str  # dtype the weights are stored in: float32, bfloat16, float16
    autocast: str | None  # mixed-precision compute: bf16, fp16 or None (plain fp32)

    def describe(self) -> str:
        return f"weights {self.weights}, compute {self.autocast or 'float32'}"


def precision(recipe: Recipe, device: str) -> Precision:
    """What `model.dtype` means on this device.

    GPU: weights in bf16 (fp16 where the card has no bf16), as Unsloth and the Handbook do.
    CPU: fp32 weights (the optimizer needs them), with bf16 autocast where the CPU computes bf16 natively;
    elsewhere plain fp32, since emulated bf16 is slower than fp32.
    """
    import torch

    wanted = recipe.model.dtype
    if device == "cuda":
        if wanted == "auto":
            wanted = "bfloat16" if torch.cuda.is_bf16_supported() else "float16"
        return Precision(wanted, {"bfloat16": "bf16", "float16": "fp16"}.get(wanted))
    if wanted == "auto":
        return Precision("float32", "bf16" if cpu_has_bf16() else None)
    if wanted == "float16":
        return Precision("float32", "fp16")
    return Precision("float32", "bf16" if wanted == "bfloat16" else None)


def unsloth_conflicts() -> list[str]:
    """Installed packages that unsloth's own requirements exclude (e.g. a transformers newer than it supports)."""
    problems = []
    for line in metadata.requires("unsloth") or []:
        req = Requirement(line)
        if req.marker is not None and not req.marker.evaluate({"extra": ""}):
            continue
        if req.name.lower() not in (
            "torch",
            "transformers",
            "trl",
            "peft",
            "datasets",
            "bitsandbytes",
            "accelerate",
            "unsloth_zoo",
            "unsloth-zoo",
        ):
            continue
        try:
            have = metadata.version(req.name)
        except metadata.PackageNotFoundError:
            problems.append(f"{req.name} is not installed")
            continue
        if req.specifier and not req.specifier.contains(have, prereleases=True):
            problems.append(f"unsloth {metadata.version('unsloth')} needs {req.name}{req.specifier}, installed {have}")
    return problems


@dataclass
class Loaded:
    model: Any  # the policy: a plain model (LoRA is added by TRL from `peft_config`) or a full model
    tokenizer: Any
    peft_config: Any  # peft.LoraConfig for method lora, else None
    ref_model: Any  # a separate frozen reference for method full, else None
    backend: Backend
    path: str
