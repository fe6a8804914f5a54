"""Recipe keys (`train.beta`, `method`, ...) and `--set key=value` overrides; unknown keys get the nearest ones."""

from __future__ import annotations

import difflib
import types
import typing
from dataclasses import fields, replace
from typing import Any

from pipeline.errors import UserError
from pipeline.recipe.schema import SECTIONS, Recipe


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
