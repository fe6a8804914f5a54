"""Recipes as frozen dataclasses, their validation, and `--set` overrides.

This module imports no torch: a typo in a recipe costs a second, not a model
load. `validate()` collects every problem before it raises.
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib
import importlib.util
import json
import math
import sys
import traceback
import types
import typing
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from pipeline.errors import UserError

EMBEDDED_MODEL = "embedded:smollm2-135m-instruct"
ALL_LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class ModelConfig:
    name_or_path: str = EMBEDDED_MODEL
    """The twin: a local folder, a Hugging Face Hub id, or `embedded:smollm2-135m-instruct` (ships with twin-dpo)."""
    backend: str = "auto"
    """`auto` (unsloth on a CUDA GPU when installed, else hf), `unsloth` or `hf`."""
    load_in_4bit: bool = False
    """Keep the frozen base in 4-bit NF4 (bitsandbytes): QLoRA. Only with method `lora`."""
    dtype: str = "auto"
    """`auto`: on GPU bf16 weights (fp16 without bf16); on CPU fp32 weights with bf16 autocast where the CPU has native
    bf16 (AVX512-BF16/AMX), else plain fp32. Or `float32`, `bfloat16`, `float16` (on CPU: the autocast dtype)."""
    max_seq_length: int = 1024
    """Longest sequence the model is prepared for, in tokens (Unsloth's `max_seq_length`); >= data.max_length."""
    trust_remote_code: bool = False
    """Run Python code shipped with a Hub model. Off: only turn on for a model you trust."""
    allow_pickle_weights: bool = False
    """Load `.bin`/`.pt` weights (pickle, can run code) when a folder has no safetensors. Off by default."""
    revision: str | None = None
    """Hub revision (branch, tag or commit) for a Hub model; None = the default branch."""
    adapter: str | None = None
    """The twin as a LoRA adapter on the base: an adapter folder, a run folder, or `runs:<recipe>` (its newest
    finished run). DPO then trains a copy of it against a frozen copy as the reference. None = the base is the twin."""
    twin_reference: str = "adapter-copy"
    """With `adapter`: `adapter-copy` (a frozen copy of the adapter on the shared base: the base is in memory once)
    or `merged-copy` (the adapter merged into a second full copy of the base: the memory it costs, for comparison)."""


@dataclass(frozen=True)
class LoraSettings:
    r: int = 32
    """LoRA rank. 32 as in the Handbook's DPO run (ch. 6)."""
    alpha: int = 32
    """LoRA alpha; the update is scaled by alpha / r (= 1 here, as in the Handbook)."""
    dropout: float = 0.0
    """Dropout on the LoRA input, 0 as in the Handbook (and what Unsloth's fast path wants)."""
    target_modules: tuple[str, ...] = ALL_LINEAR
    """Linear layers that get an adapter: all seven projections of a Llama/Qwen2 block."""
    bias: str = "none"
    """Train biases too: `none`, `all` or `lora_only`."""
    use_rslora: bool = False
    """Rank-stabilised scaling alpha / sqrt(r) instead of alpha / r."""


@dataclass(frozen=True)
class DataConfig:
    train: str = "embedded:train"
    """Preference pairs to train on: a .jsonl/.json/.csv/.parquet file, a Hub dataset id, or `embedded:train`."""
    eval: str | None = "embedded:heldout"
    """Held-out pairs (same forms); None = hold out `eval_fraction` of the train rows."""
    train_split: str = "train"
    """Split name when `train` is a Hub dataset."""
    eval_split: str = "test"
    """Split name when `eval` is a Hub dataset."""
    eval_fraction: float = 0.05
    """Share of train rows held out when `eval` is None (the Handbook holds out 5%)."""
    system_prompt: str | None = None
    """System message put before each prompt; None = whatever the chat template does by default."""
    max_length: int = 1024
    """Longest prompt + answer in tokens after the chat template (the Handbook's 1024); longer answers are cut."""


@dataclass(frozen=True)
class TrainConfig:
    learning_rate: float = 5e-5
    """Peak learning rate. Measured here: see recipes/dpo_lora.py for why LoRA on a 135M model needs more than the Handbook's 2e-6."""
    epochs: float = 1.0
    """Passes over the train pairs: one, light on purpose (style imitation fights DPO's pull toward formal text)."""
    max_steps: int = -1
    """Stop after this many optimizer steps; -1 = run all epochs."""
    batch_size: int = 2
    """Pairs per forward pass (the Handbook's per-device batch of 2)."""
    grad_accum: int = 1
    """Forward passes per optimizer step; the effective batch is batch_size * grad_accum pairs."""
    beta: float = 0.5
    """DPO beta: how strongly the policy is held to the reference (the Handbook's 0.5; TRL's default is 0.1)."""
    loss_type: str = "sigmoid"
    """TRL DPO loss: sigmoid (the DPO paper), ipo, hinge, robust, apo_zero, sigmoid_norm, ..."""
    warmup_steps: int = 10
    """Linear warm-up steps (the Handbook's 10)."""
    scheduler: str = "linear"
    """Learning-rate schedule after warm-up: linear, cosine or constant."""
    weight_decay: float = 0.01
    """AdamW weight decay (the Handbook's 0.01)."""
    optim: str = "auto"
    """Optimizer: `auto` (adamw_8bit on CUDA as in the Handbook, adamw_torch on CPU), or any transformers optim name."""
    gradient_checkpointing: bool = False
    """Recompute activations in the backward pass. Off: measured slower on CPU when memory allows."""
    group_by_length: bool = True
    """Batch pairs of similar length (random groups of 50 batches, sorted inside) so less compute goes to padding.
    The order is drawn once from the seed and repeated in every epoch."""
    fast_head: bool = True
    """Score only completion positions through the LM head (pipeline/fast.py); TRL's CPU path scores every position."""
    precompute_ref: bool = True
    """Compute the reference log-probs once, cache them on disk, and read them at every step (pipeline/reference.py)."""
    save_every: int = 25
    """Write a checkpoint every this many optimizer steps (resume, interrupts); 0 = none. 25 = four per default run."""
    keep_checkpoints: int = 2
    """Complete checkpoints kept; older ones are deleted once a newer one is marked complete."""
    logging_steps: int = 1
    """Write a metrics.jsonl line every this many optimizer steps."""
    eval_every: float = 0.5
    """Evaluate on the held-out pairs every this share of training (the Handbook: 20%; each pass costs ~20 s here); 0 = only before and after."""
    seed: int = 0
    """Seed for LoRA init, data order and dropout (the Handbook's 0)."""
    threads: int = 0
    """CPU threads for torch; 0 = one per CPU this process may run on."""


@dataclass(frozen=True)
class ExportConfig:
    formats: tuple[str, ...] = ("adapter", "merged", "gguf-f16", "gguf-q8_0", "gguf-q4_k_m")
    """What `make export` writes: adapter, merged, gguf-f16, gguf-q8_0, gguf-q4_k_m."""
    merged_dtype: str = "float16"
    """dtype of the merged safetensors: float16 or bfloat16."""
    temperature: float = 0.7
    """Ollama Modelfile default sampling temperature."""
    top_p: float = 0.9
    """Ollama Modelfile default nucleus sampling share."""
    repeat_penalty: float = 1.1
    """Ollama Modelfile default repetition penalty (1 = off)."""
    num_ctx: int = 2048
    """Ollama Modelfile context window in tokens."""


@dataclass(frozen=True)
class Recipe:
    name: str = "dpo-lora"
    """Name of the recipe, used in run folder names."""
    method: str = "lora"
    """`lora` (a trainable adapter, reference = adapter off), `full` (all weights, a separate frozen reference) or
    `sft` (LoRA supervised fine-tuning on the chosen answers: how the twin itself is made)."""
    model: ModelConfig = field(default_factory=ModelConfig)
    lora: LoraSettings = field(default_factory=LoraSettings)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    export: ExportConfig = field(default_factory=ExportConfig)


SECTIONS = {"model": ModelConfig, "lora": LoraSettings, "data": DataConfig, "train": TrainConfig, "export": ExportConfig}

CHOICES = {
    "method": ("lora", "full", "sft"),
    "model.twin_reference": ("adapter-copy", "merged-copy"),
    "model.backend": ("auto", "hf", "unsloth"),
    "model.dtype": ("auto", "float32", "bfloat16", "float16"),
    "lora.bias": ("none", "all", "lora_only"),
    "train.loss_type": (
        "sigmoid", "hinge", "ipo", "exo_pair", "nca_pair", "robust", "bco_pair", "sppo_hard",
        "aot", "aot_unpaired", "apo_zero", "apo_down", "discopop", "sft", "sigmoid_norm",
    ),
    "train.scheduler": ("linear", "cosine", "constant", "constant_with_warmup", "cosine_with_restarts", "polynomial"),
    "export.merged_dtype": ("float16", "bfloat16"),
}
EXPORT_FORMATS = ("adapter", "merged", "gguf-f16", "gguf-q8_0", "gguf-q4_k_m")


# ---------------------------------------------------------------- field table


def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def all_keys() -> dict[str, Any]:
    """Every settable key (`train.beta`, `method`, ...) with its type."""
    keys: dict[str, Any] = {}
    for f in fields(Recipe):
        if f.name in SECTIONS:
            for name, hint in _hints(SECTIONS[f.name]).items():
                keys[f"{f.name}.{name}"] = hint
        else:
            keys[f.name] = _hints(Recipe)[f.name]
    return keys


def get_value(recipe: Recipe, key: str) -> Any:
    obj: Any = recipe
    for part in key.split("."):
        obj = getattr(obj, part)
    return obj


def nearest(word: str, options: list[str], n: int = 3) -> list[str]:
    """The closest options: those within 0.1 of the best similarity (so a clear typo gets one answer)."""
    scored = sorted(((difflib.SequenceMatcher(None, word, o).ratio(), o) for o in options), reverse=True)
    if not scored or scored[0][0] < 0.6:
        return []
    return [o for score, o in scored[:n] if score >= scored[0][0] - 0.1]


# ---------------------------------------------------------------- overrides


def _parse(raw: str, hint: Any, key: str) -> Any:
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if raw.strip().lower() in ("none", "null", ""):
            if type(None) in args:
                return None
        inner = [a for a in args if a is not type(None)]
        return _parse(raw, inner[0], key)
    if origin is tuple:
        return tuple(item.strip() for item in raw.split(",") if item.strip())
    if hint is bool:
        low = raw.strip().lower()
        if low in ("true", "1", "yes", "on"):
            return True
        if low in ("false", "0", "no", "off"):
            return False
        raise UserError(f"--set {key}={raw}: expected true or false")
    if hint is int:
        try:
            return int(raw)
        except ValueError:
            raise UserError(f"--set {key}={raw}: expected a whole number") from None
    if hint is float:
        try:
            return float(raw)
        except ValueError:
            raise UserError(f"--set {key}={raw}: expected a number, such as 5e-6") from None
    return raw


def apply_overrides(recipe: Recipe, assignments: list[str]) -> Recipe:
    """Apply `--set section.field=value` strings; unknown keys fail with the nearest valid ones."""
    keys = all_keys()
    problems = []
    for assignment in assignments:
        if "=" not in assignment:
            problems.append(f"--set {assignment}: expected key=value, such as --set train.beta=0.1")
            continue
        key, raw = assignment.split("=", 1)
        key = key.strip()
        if key not in keys:
            hint = nearest(key, list(keys))
            section = [k for k in keys if k.split(".")[0] == key.split(".")[0]] or list(keys)
            suggestion = f"; did you mean {' or '.join(hint)}?" if hint else f"; valid keys: {', '.join(section)}"
            problems.append(f"--set {key}: unknown recipe key{suggestion}")
            continue
        try:
            value = _parse(raw, keys[key], key)
        except UserError as err:
            problems.extend(err.problems)
            continue
        if "." in key:
            section, name = key.split(".", 1)
            recipe = replace(recipe, **{section: replace(getattr(recipe, section), **{name: value})})
        else:
            recipe = replace(recipe, **{key: value})
    if problems:
        raise UserError(problems)
    return recipe


# ---------------------------------------------------------------- validation


def _type_ok(value: Any, hint: Any) -> bool:
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return any(_type_ok(value, a) for a in typing.get_args(hint))
    if hint is type(None):
        return value is None
    if origin is tuple:
        return isinstance(value, tuple) and all(isinstance(v, str) for v in value)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, hint)


def _type_name(hint: Any) -> str:
    names = {bool: "true or false", int: "a whole number", float: "a number", str: "a string"}
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return " or ".join("None" if a is type(None) else _type_name(a) for a in typing.get_args(hint))
    if origin is tuple:
        return "a tuple of strings"
    return names.get(hint, str(hint))


def validate(recipe: Recipe) -> Recipe:
    """Check every field; raise one UserError listing all problems. Returns the recipe."""
    if not isinstance(recipe, Recipe):
        raise UserError(f"recipe must be a pipeline.config.Recipe, got {type(recipe).__name__}")
    problems: list[str] = []
    for key, hint in all_keys().items():
        value = get_value(recipe, key)
        if not _type_ok(value, hint):
            problems.append(f"{key}: must be {_type_name(hint)}, got {value!r}")
    if problems:  # range checks below assume the types are right
        raise UserError(problems)

    def need(ok: bool, key: str, rule: str) -> None:
        if not ok:
            problems.append(f"{key}: {rule}, got {get_value(recipe, key)!r}")

    for key, options in CHOICES.items():
        need(get_value(recipe, key) in options, key, f"must be one of {', '.join(options)}")
    m, lo, d, t, e = recipe.model, recipe.lora, recipe.data, recipe.train, recipe.export
    need(bool(recipe.name.strip()) and "/" not in recipe.name, "name", "must be a non-empty name without '/'")
    need(bool(m.name_or_path.strip()), "model.name_or_path", "must name a model folder, Hub id or embedded model")
    need(m.max_seq_length >= 16, "model.max_seq_length", "must be >= 16")
    if m.adapter is not None and recipe.method != "lora":
        problems.append(f"model.adapter: a twin adapter is trained further with method 'lora', not {recipe.method!r}")
    if m.load_in_4bit and recipe.method == "full":
        problems.append("model.load_in_4bit: a 4-bit base can only be trained with method 'lora' (QLoRA); set method=lora or load_in_4bit=false")
    need(lo.r >= 1, "lora.r", "must be >= 1")
    need(lo.alpha > 0, "lora.alpha", "must be > 0")
    need(0.0 <= lo.dropout < 1.0, "lora.dropout", "must be in [0, 1)")
    need(len(lo.target_modules) > 0, "lora.target_modules", "must name at least one layer")
    need("lm_head" not in lo.target_modules, "lora.target_modules", "must not include lm_head (TRL computes log-probs from lm_head.weight directly)")
    need(bool(d.train.strip()), "data.train", "must name a dataset")
    need(0.0 < d.eval_fraction < 1.0, "data.eval_fraction", "must be between 0 and 1")
    need(d.max_length >= 8, "data.max_length", "must be >= 8 tokens")
    need(d.max_length <= m.max_seq_length, "data.max_length", f"must be <= model.max_seq_length ({m.max_seq_length})")
    need(math.isfinite(t.learning_rate) and 0.0 < t.learning_rate < 1.0, "train.learning_rate", "must be > 0 and < 1")
    need(math.isfinite(t.beta) and t.beta > 0.0, "train.beta", "must be > 0")
    need(t.epochs > 0, "train.epochs", "must be > 0")
    need(t.max_steps == -1 or t.max_steps >= 1, "train.max_steps", "must be -1 (all epochs) or >= 1")
    need(t.batch_size >= 1, "train.batch_size", "must be >= 1")
    need(t.grad_accum >= 1, "train.grad_accum", "must be >= 1")
    need(t.warmup_steps >= 0, "train.warmup_steps", "must be >= 0")
    need(t.weight_decay >= 0.0, "train.weight_decay", "must be >= 0")
    need(t.logging_steps >= 1, "train.logging_steps", "must be >= 1")
    need(t.save_every >= 0, "train.save_every", "must be >= 0")
    need(t.keep_checkpoints >= 1, "train.keep_checkpoints", "must be >= 1")
    need(0.0 <= t.eval_every <= 1.0, "train.eval_every", "must be between 0 and 1 (a share of training)")
    need(t.seed >= 0, "train.seed", "must be >= 0")
    need(t.threads >= 0, "train.threads", "must be >= 0")
    bad = [f for f in e.formats if f not in EXPORT_FORMATS]
    need(not bad and len(e.formats) > 0, "export.formats", f"must be a non-empty subset of {', '.join(EXPORT_FORMATS)}")
    need(e.temperature >= 0, "export.temperature", "must be >= 0")
    need(0 < e.top_p <= 1, "export.top_p", "must be in (0, 1]")
    need(e.repeat_penalty > 0, "export.repeat_penalty", "must be > 0")
    need(e.num_ctx >= 16, "export.num_ctx", "must be >= 16")
    if problems:
        raise UserError(problems)
    return recipe


# ---------------------------------------------------------------- serialisation


def to_dict(recipe: Recipe) -> dict[str, Any]:
    return dataclasses.asdict(recipe)


def from_dict(data: dict[str, Any], source: str = "recipe.json") -> Recipe:
    """Rebuild a Recipe from `to_dict` output (a run's recipe.json)."""
    problems = []
    kwargs: dict[str, Any] = {}
    for f in fields(Recipe):
        if f.name not in data:
            continue
        if f.name in SECTIONS:
            cls = SECTIONS[f.name]
            valid = {x.name for x in fields(cls)}
            section = {}
            for k, v in data[f.name].items():
                if k not in valid:
                    problems.append(f"{source}: {f.name}.{k}: unknown field")
                    continue
                section[k] = tuple(v) if isinstance(v, list) else v
            kwargs[f.name] = cls(**section)
        else:
            kwargs[f.name] = data[f.name]
    if problems:
        raise UserError(problems)
    return validate(Recipe(**kwargs))


def dumps(recipe: Recipe) -> str:
    return json.dumps(to_dict(recipe), indent=2) + "\n"


# ---------------------------------------------------------------- loading recipe modules


def recipes_dir() -> Path:
    import recipes  # the package next to pipeline/

    return Path(recipes.__file__).parent


def available_recipes() -> list[str]:
    return sorted(p.stem for p in recipes_dir().glob("*.py") if not p.stem.startswith("_"))


def _recipe_error(path: Path, err: BaseException) -> UserError:
    """Turn an exception raised while importing a recipe module into one line naming file and line."""
    line = None
    if isinstance(err, SyntaxError):
        line = err.lineno
    else:
        for frame in traceback.extract_tb(err.__traceback__):
            if Path(frame.filename).resolve() == path.resolve():
                line = frame.lineno
    where = f"{path}:{line}" if line else str(path)
    message = str(err)
    if isinstance(err, TypeError) and "unexpected keyword argument" in message:
        # e.g. "TrainConfig.__init__() got an unexpected keyword argument 'learnig_rate'"
        cls_name = message.split(".")[0].split("(")[0].strip()
        bad = message.rsplit("'", 2)[-2] if message.count("'") >= 2 else ""
        cls = {c.__name__: c for c in [Recipe, *SECTIONS.values()]}.get(cls_name)
        if cls is not None and bad:
            valid = [f.name for f in fields(cls)]
            hint = difflib.get_close_matches(bad, valid, n=3)
            suggestion = f"did you mean {' or '.join(hint)}?" if hint else f"valid fields: {', '.join(valid)}"
            return UserError(f"{where}: {cls_name} has no field '{bad}'; {suggestion}")
    return UserError(f"{where}: {type(err).__name__}: {message}")


def load_recipe(spec: str) -> Recipe:
    """Load `recipe` from a recipe name (`dpo_lora`, `dpo-lora`) or a path to a .py file; validated."""
    looks_like_path = spec.endswith(".py") or "/" in spec or "\\" in spec
    if looks_like_path:
        path = Path(spec).expanduser()
        if not path.is_file():
            raise UserError(f"recipe file {spec} does not exist; available recipes: {', '.join(available_recipes())}")
    else:
        path = recipes_dir() / f"{spec.replace('-', '_')}.py"
        if not path.is_file():
            hint = nearest(spec.replace("-", "_"), available_recipes())
            more = f"; did you mean {' or '.join(hint)}?" if hint else ""
            raise UserError(f"unknown recipe '{spec}'{more} (available: {', '.join(available_recipes())})")
    path = path.resolve()
    try:
        if path.parent == recipes_dir().resolve():
            module = importlib.import_module(f"recipes.{path.stem}")
        else:
            name = f"_twin_recipe_{abs(hash(str(path)))}"
            module_spec = importlib.util.spec_from_file_location(name, path)
            module = importlib.util.module_from_spec(module_spec)
            sys.modules[name] = module
            module_spec.loader.exec_module(module)
    except UserError:
        raise
    except Exception as err:  # a user's recipe file: report file and line, not a traceback
        raise _recipe_error(path, err) from None
    recipe = getattr(module, "recipe", None)
    if recipe is None:
        raise UserError(f"{path}: defines no `recipe`; assign a pipeline.config.Recipe to a variable named recipe")
    if not isinstance(recipe, Recipe):
        raise UserError(f"{path}: `recipe` must be a pipeline.config.Recipe, got {type(recipe).__name__}")
    try:
        return validate(recipe)
    except UserError as err:
        raise UserError([f"{path.name}: {p}" for p in err.problems]) from None
