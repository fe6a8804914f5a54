"""The hf backend: transformers + PEFT (+ bitsandbytes for a 4-bit base), on CPU or GPU.

Safe by default: safetensors only unless the recipe allows pickle weights; remote code only when the recipe
turns it on. `load()` is the one entry point for both backends: it hands the unsloth backend to
pipeline/model/unsloth.py, the only module that imports unsloth.
"""

from __future__ import annotations

import os
from typing import Any

from pipeline.errors import UserError
from pipeline.model import adapters, unsloth
from pipeline.model.backend import Backend, Loaded, precision
from pipeline.model.paths import resolve_model_path
from pipeline.recipe import Recipe


def _from_pretrained_errors(err: Exception, path: str) -> UserError | None:
    text = str(err)
    if "trust_remote_code" in text:
        return UserError(
            f"model.name_or_path: {path} needs its own Python code to load; set model.trust_remote_code=true only if "
            "you trust it"
        )
    if isinstance(err, OSError) and (
        "not a valid model identifier" in text or "offline" in text.lower() or "connect" in text.lower()
    ):
        return UserError(
            f"model.name_or_path: cannot load '{path}': {text.splitlines()[0]}; check the name, your network, or give "
            "a local folder"
        )
    if isinstance(err, OSError) and "safetensors" in text.lower():
        return UserError(
            f"model.name_or_path: {path} has no safetensors weights; set model.allow_pickle_weights=true only if you "
            "trust the source"
        )
    return None


def load_tokenizer(recipe: Recipe, path: str):
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(
            path, trust_remote_code=recipe.model.trust_remote_code, revision=recipe.model.revision
        )
    except (OSError, ValueError) as err:
        mapped = _from_pretrained_errors(err, path)
        if mapped:
            raise mapped from None
        raise
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_base(recipe: Recipe, path: str, backend: Backend):
    """The frozen base as a transformers model, fp32/bf16/fp16 or 4-bit NF4, on the backend's device."""
    import torch
    from transformers import AutoModelForCausalLM

    prec = precision(recipe, backend.device)
    dtype = getattr(torch, prec.weights)
    compute = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(prec.autocast, torch.float32)
    kwargs: dict[str, Any] = {
        "dtype": dtype,
        "trust_remote_code": recipe.model.trust_remote_code,
        "revision": recipe.model.revision,
        "use_safetensors": None if recipe.model.allow_pickle_weights else True,
    }
    if recipe.model.load_in_4bit:
        from transformers import BitsAndBytesConfig

        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=compute
        )
    if backend.device == "cuda":  # under several processes each loads onto its own GPU (torchrun's LOCAL_RANK)
        kwargs["device_map"] = {"": int(os.environ.get("LOCAL_RANK", "0"))}
    try:
        model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    except (OSError, ValueError) as err:
        mapped = _from_pretrained_errors(err, path)
        if mapped:
            raise mapped from None
        raise
    model.config.use_cache = False
    if recipe.model.load_in_4bit:
        from peft import prepare_model_for_kbit_training

        keep_4bit_trainable(model)

        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=recipe.train.gradient_checkpointing)
    return model


def keep_4bit_trainable(model) -> int:
    """Stop bitsandbytes (0.50) from repacking 4-bit weights for its CPU inference kernel.

    On CPUs with AVX512-BF16, the first no-grad forward in eval mode (our reference pass, an evaluation)
    permanently repacks each Linear4bit for `gemv_4bit`, which has no backward: gradients through the frozen
    base then silently vanish and QLoRA trains on wrong gradients (tests/test_train.py shows it). Returns the
    number of layers switched back to the differentiable path.
    """
    try:
        import bitsandbytes as bnb
    except ImportError:
        return 0
    layers = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    for layer in layers:
        layer.support_avx512bf16_for_cpu = False
    return len(layers)


# Families that fuse projections (Phi-3: q/k/v in qkv_proj, gate/up in gate_up_proj): the fused layer stands in
# for the recipe's names, so LoRA lands on every projection the recipe names, not silently on the rest only.
FUSED = {
    "q_proj": "qkv_proj",
    "k_proj": "qkv_proj",
    "v_proj": "qkv_proj",
    "gate_proj": "gate_up_proj",
    "up_proj": "gate_up_proj",
}


def lora_targets(targets: tuple[str, ...], model) -> list[str]:
    """The recipe's `lora.target_modules` as this model names its layers; a name that matches nothing is an error.

    Mixture-of-experts models (Qwen3-MoE, OLMoE, ...) hold their experts' MLP weights as fused 3-D parameters,
    not linear layers: the MLP names land there, get no adapter, and the run says so."""
    import torch

    names = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    experts = {name.rsplit(".", 1)[-1] for name, _ in model.named_parameters() if ".experts." in name}
    resolved, missing, in_experts = [], [], []
    for target in targets:
        if target in names:
            resolved.append(target)
        elif FUSED.get(target) in names:
            resolved.append(FUSED[target])
        elif target in experts or FUSED.get(target) in experts:
            in_experts.append(target)
        else:
            missing.append(target)
    if missing or not resolved:
        linear = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)})
        raise UserError(
            f"lora.target_modules: {', '.join(missing or in_experts)} match no layer of this model; its linear "
            f"layers are {', '.join(linear)}; name some of those"
        )
    if in_experts:
        print(
            f"[twin-dpo] {', '.join(in_experts)}: this model's experts hold them as fused parameters, not linear "
            "layers, so they get no adapter (the attention layers and any shared MLP do)",
            flush=True,
        )
    return list(dict.fromkeys(resolved))


def peft_config(recipe: Recipe, model=None):
    """The recipe's LoRA block as a peft.LoraConfig; with `model`, its targets as that model names its layers."""
    from peft import LoraConfig

    lo = recipe.lora
    targets = list(lo.target_modules)
    if model is not None:
        targets = lora_targets(lo.target_modules, model)
        print(f"[twin-dpo] LoRA adapters on every {', '.join(targets)} layer", flush=True)
    return LoraConfig(
        r=lo.r,
        lora_alpha=lo.alpha,
        lora_dropout=lo.dropout,
        target_modules=targets,
        bias=lo.bias,
        use_rslora=lo.use_rslora,
        task_type="CAUSAL_LM",
    )


def load(recipe: Recipe, backend: Backend, tokenizer=None) -> Loaded:
    """Load everything training needs for `recipe` on `backend`."""
    path = resolve_model_path(recipe.model.name_or_path, recipe.model.allow_pickle_weights)
    if backend.name == "unsloth":
        return unsloth.load(recipe, backend, path)
    tokenizer = tokenizer or load_tokenizer(recipe, path)
    model = load_base(recipe, path, backend)
    ref_model = None
    config = None
    if recipe.model.adapter:
        adapter_dir = adapters.resolve(recipe.model.adapter)
        if recipe.model.twin_reference == "merged-copy":
            ref_model = adapters.merged_copy(lambda: load_base(recipe, path, backend), adapter_dir)
        model = adapters.load_policy(model, adapter_dir)  # TRL copies it into a frozen `ref` adapter
    elif recipe.method in ("lora", "sft"):
        config = peft_config(recipe, model)
    else:
        # full DPO needs a second, frozen copy as the reference (the memory LoRA saves); with
        # train.precompute_ref it is dropped once its log-probs are computed
        ref_model = load_base(recipe, path, backend)
        ref_model.eval()
        for param in ref_model.parameters():
            param.requires_grad_(False)
    return Loaded(model, tokenizer, config, ref_model, backend, path)
