"""Recipes in and out: a recipe module by name or path, a run's recipe.json, and JSON for recipe.json."""

from __future__ import annotations

import dataclasses
import difflib
import importlib
import importlib.util
import json
import sys
import traceback
from dataclasses import fields
from pathlib import Path
from typing import Any

from pipeline.errors import UserError
from pipeline.recipe.overrides import nearest
from pipeline.recipe.schema import SECTIONS, Recipe
from pipeline.recipe.validation import validate


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
        raise UserError(f"{path}: defines no `recipe`; assign a pipeline.recipe.Recipe to a variable named recipe")
    if not isinstance(recipe, Recipe):
        raise UserError(f"{path}: `recipe` must be a pipeline.recipe.Recipe, got {type(recipe).__name__}")
    try:
        return validate(recipe)
    except UserError as err:
        raise UserError([f"{path.name}: {p}" for p in err.problems]) from None
