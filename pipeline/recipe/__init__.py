"""Recipes: the schema, `--set` overrides, validation, loading a recipe module, serialisation. No torch here."""

from pipeline.recipe.loading import available_recipes, dumps, from_dict, load_recipe, recipes_dir, to_dict
from pipeline.recipe.overrides import all_keys, apply_overrides, get_value, nearest
from pipeline.recipe.schema import (
    ALL_LINEAR,
    EMBEDDED_MODEL,
    EXPORT_FORMATS,
    SECTIONS,
    TWIN_MODEL,
    TWIN_PREFIX,
    DataConfig,
    ExportConfig,
    LoraSettings,
    ModelConfig,
    Recipe,
    TrainConfig,
    choices,
)
from pipeline.recipe.validation import validate


def resolve(spec: str, overrides: list[str]) -> Recipe:
    """A recipe by name or path, with `--set` overrides applied, validated."""
    return validate(apply_overrides(load_recipe(spec), overrides))


__all__ = [
    "ALL_LINEAR",
    "EMBEDDED_MODEL",
    "EXPORT_FORMATS",
    "SECTIONS",
    "TWIN_MODEL",
    "TWIN_PREFIX",
    "DataConfig",
    "ExportConfig",
    "LoraSettings",
    "ModelConfig",
    "Recipe",
    "TrainConfig",
    "all_keys",
    "apply_overrides",
    "available_recipes",
    "choices",
    "dumps",
    "from_dict",
    "get_value",
    "load_recipe",
    "nearest",
    "recipes_dir",
    "resolve",
    "to_dict",
    "validate",
]
