"""`validate(recipe)`: every field checked, every problem collected, one UserError listing them all."""

from __future__ import annotations

import math
import os
import types
import typing
from typing import Any

from pipeline.errors import UserError
from pipeline.recipe.overrides import all_keys, get_value
from pipeline.recipe.schema import Recipe, choices, subsets


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
        raise UserError(f"recipe must be a pipeline.recipe.Recipe, got {type(recipe).__name__}")
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

    for key, options in choices().items():
        need(get_value(recipe, key) in options, key, f"must be one of {', '.join(options)}")
    for key, options in subsets().items():
        bad = [v for v in get_value(recipe, key) if v not in options]
        need(not bad and len(get_value(recipe, key)) > 0, key, f"must be a non-empty subset of {', '.join(options)}")
    m, lo, d, t, e = recipe.model, recipe.lora, recipe.data, recipe.train, recipe.export
    need(bool(recipe.name.strip()) and "/" not in recipe.name, "name", "must be a non-empty name without '/'")
    need(bool(m.name_or_path.strip()), "model.name_or_path", "must name a model folder, Hub id or embedded model")
    need(m.max_seq_length >= 16, "model.max_seq_length", "must be >= 16")
    if m.adapter is not None and recipe.method != "lora":
        problems.append(f"model.adapter: a twin adapter is trained further with method 'lora', not {recipe.method!r}")
    if m.load_in_4bit and recipe.method == "full":
        problems.append(
            "model.load_in_4bit: a 4-bit base can only be trained with method 'lora' (QLoRA); set method=lora or "
            "load_in_4bit=false"
        )
    need(lo.r >= 1, "lora.r", "must be >= 1")
    need(lo.alpha > 0, "lora.alpha", "must be > 0")
    need(0.0 <= lo.dropout < 1.0, "lora.dropout", "must be in [0, 1)")
    need(len(lo.target_modules) > 0, "lora.target_modules", "must name at least one layer")
    need(
        "lm_head" not in lo.target_modules,
        "lora.target_modules",
        "must not include lm_head (TRL computes log-probs from lm_head.weight directly)",
    )
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
    need(e.temperature >= 0, "export.temperature", "must be >= 0")
    need(0 < e.top_p <= 1, "export.top_p", "must be in (0, 1]")
    need(e.repeat_penalty > 0, "export.repeat_penalty", "must be > 0")
    need(e.num_ctx >= 16, "export.num_ctx", "must be >= 16")
    problems += lever_problems(os.environ)
    if problems:
        raise UserError(problems)
    return recipe


# The lever switches the bench's table sets (README, "Faster than plain TRL") are environment variables, checked
# with the recipe: a typo fails before a weight loads, not with a traceback mid-run or the lever silently on.
LEVERS = {
    "TWIN_DPO_MMAP_THRESHOLD_MB": ("a whole number of MB (0: glibc's default)", str.isdigit),
    "TWIN_DPO_REFERENCE_PAIRS": ("a whole number of pairs >= 1", lambda v: v.isdigit() and int(v) >= 1),
    "TWIN_DPO_FROZEN_BF16": ("0 (off) or 1 (on)", lambda v: v in ("0", "1")),
    "TWIN_DPO_NORM_BF16": ("0 (off) or 1 (on)", lambda v: v in ("0", "1")),
}


def lever_problems(env: typing.Mapping[str, str]) -> list[str]:
    problems = []
    for name, (rule, ok) in LEVERS.items():
        value = env.get(name, "").strip()
        if value and not ok(value):
            problems.append(f"{name} (environment): must be {rule}, got {value!r}; fix it or unset it")
    return problems
