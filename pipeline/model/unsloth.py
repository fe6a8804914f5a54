"""The unsloth backend: FastLanguageModel on a CUDA GPU. The only module that imports unsloth.

Unsloth patches transformers, TRL and PEFT when it is imported, so `import_unsloth()` must run before they
are imported: that is why the import lives inside a function here, called first on the unsloth path.
"""

from __future__ import annotations

import sys
from typing import Any

from pipeline.model.backend import Backend, Loaded
from pipeline.recipe import Recipe

# Every model.* and lora.* field, and what each backend does with it. unsloth_kwargs() is the one translation;
# tests/test_backends.py checks that this table covers every field and that both backends agree.
FIELDS = {
    "model.name_or_path": ("model_name", "from_pretrained(path)"),
    "model.backend": (None, "chooses the backend itself (resolve_backend)"),
    "model.load_in_4bit": ("load_in_4bit", "BitsAndBytesConfig(load_in_4bit=True, nf4, double quant)"),
    "model.dtype": ("dtype", "precision(): weights dtype and autocast"),
    "model.max_seq_length": (
        "max_seq_length",
        "not needed: transformers reads the model's own limit; checked >= data.max_length",
    ),
    "model.trust_remote_code": ("trust_remote_code", "trust_remote_code"),
    "model.allow_pickle_weights": (None, "enforced before either backend loads: pickle-only folders are refused"),
    "model.revision": ("revision", "revision"),
    "model.adapter": (None, "PeftModel.from_pretrained on the base; on the unsloth backend a twin adapter runs on hf"),
    "model.twin_reference": (None, "how the twin adapter's reference is held (pipeline/model/adapters.py)"),
    "lora.r": ("r", "LoraConfig(r)"),
    "lora.alpha": ("lora_alpha", "LoraConfig(lora_alpha)"),
    "lora.dropout": ("lora_dropout", "LoraConfig(lora_dropout)"),
    "lora.target_modules": ("target_modules", "LoraConfig(target_modules)"),
    "lora.bias": ("bias", "LoraConfig(bias)"),
    "lora.use_rslora": ("use_rslora", "LoraConfig(use_rslora)"),
}


def unsloth_kwargs(recipe: Recipe, path: str) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """Pure: the recipe as (FastLanguageModel.from_pretrained kwargs, get_peft_model kwargs or None for full)."""
    m, lo = recipe.model, recipe.lora
    load = {
        "model_name": path,
        "max_seq_length": m.max_seq_length,
        "dtype": None if m.dtype == "auto" else m.dtype,  # None: Unsloth picks bf16 where the GPU has it, else fp16
        "load_in_4bit": m.load_in_4bit,
        "full_finetuning": recipe.method == "full",
        "trust_remote_code": m.trust_remote_code,
        "revision": m.revision,
    }
    if recipe.method == "full":
        return load, None
    peft = {
        "r": lo.r,
        "target_modules": list(lo.target_modules),
        "lora_alpha": lo.alpha,
        "lora_dropout": lo.dropout,
        "bias": lo.bias,
        "use_gradient_checkpointing": "unsloth",  # Unsloth's offloaded checkpointing: its memory saving on GPU
        "random_state": recipe.train.seed,
        "use_rslora": lo.use_rslora,
    }
    return load, peft


def import_unsloth():
    """Import unsloth before transformers, trl and peft are imported: it patches them (and TRL's trainers) on import."""

    late = [name for name in ("transformers", "trl", "peft") if name in sys.modules and "unsloth" not in sys.modules]
    if late:
        print(
            f"[twin-dpo] warning: {', '.join(late)} imported before unsloth; some Unsloth patches may not apply",
            flush=True,
        )
    import unsloth

    return unsloth


def load(recipe: Recipe, backend: Backend, path: str) -> Loaded:
    unsloth = import_unsloth()
    from unsloth import FastLanguageModel

    load, peft = unsloth_kwargs(recipe, path)
    model, tokenizer = FastLanguageModel.from_pretrained(**load)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    ref_model = None
    if peft is not None:
        model = FastLanguageModel.get_peft_model(model, **peft)  # TRL copies it into a frozen `ref` adapter (B = 0)
    elif not recipe.train.precompute_ref:
        ref_model, _ = FastLanguageModel.from_pretrained(**{**load, "full_finetuning": False})
        ref_model.eval()
        for param in ref_model.parameters():
            param.requires_grad_(False)
    patch = getattr(unsloth, "PatchDPOTrainer", None)
    if patch is not None:  # a no-op since Unsloth patches TRL at import (PatchFastRL); older releases need it
        patch()
    return Loaded(model, tokenizer, None, ref_model, backend, path)
