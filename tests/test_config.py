"""Recipes: every shipped one loads and validates; overrides and mistakes give clear answers."""

from __future__ import annotations

from dataclasses import replace

import pytest

from pipeline import recipe as config
from pipeline.errors import UserError
from pipeline.recipe import Recipe


@pytest.mark.parametrize("name", config.available_recipes())
def test_every_shipped_recipe_loads_validates_and_round_trips(name):
    recipe = config.load_recipe(name)
    assert isinstance(recipe, Recipe)
    assert config.from_dict(config.to_dict(recipe)) == recipe


def test_recipe_variants_are_compositions():
    lora, qlora, full = (config.load_recipe(n) for n in ("dpo_lora", "dpo_qlora", "dpo_full"))
    assert qlora == replace(lora, name="dpo-qlora", model=replace(lora.model, load_in_4bit=True))
    assert full.method == "full" and not full.model.load_in_4bit
    assert lora.lora.target_modules == config.ALL_LINEAR
    assert lora.train.beta == 0.5 and lora.train.epochs == 1.0  # the Handbook's beta, one epoch


def test_dash_name_and_path_load_the_same_recipe():
    by_name = config.load_recipe("dpo-qlora")
    by_path = config.load_recipe(str(config.recipes_dir() / "dpo_qlora.py"))
    assert by_name == by_path


def test_overrides_parse_by_field_type():
    recipe = config.apply_overrides(
        config.load_recipe("dpo_lora"),
        [
            "train.learning_rate=5e-6",
            "train.batch_size=4",
            "model.load_in_4bit=true",
            "lora.target_modules=q_proj,v_proj",
            "data.eval=none",
            "method=full",
        ],
    )
    assert recipe.train.learning_rate == 5e-6 and recipe.train.batch_size == 4
    assert recipe.model.load_in_4bit is True and recipe.lora.target_modules == ("q_proj", "v_proj")
    assert recipe.data.eval is None and recipe.method == "full"


def test_unknown_override_key_suggests_the_nearest():
    with pytest.raises(UserError) as err:
        config.apply_overrides(config.load_recipe("dpo_lora"), ["train.bta=0.1"])
    assert err.value.problems == ["--set train.bta: unknown recipe key; did you mean train.beta?"]


def test_override_with_wrong_type_names_key_and_expectation():
    with pytest.raises(UserError, match=r"--set train.beta=abc: expected a number"):
        config.apply_overrides(config.load_recipe("dpo_lora"), ["train.beta=abc"])


def test_validate_collects_every_problem():
    recipe = config.load_recipe("dpo_lora")
    bad = replace(recipe, train=replace(recipe.train, beta=-0.1, learning_rate=0.0), lora=replace(recipe.lora, r=0))
    with pytest.raises(UserError) as err:
        config.validate(bad)
    assert err.value.problems == [
        "lora.r: must be >= 1, got 0",
        "train.learning_rate: must be > 0 and < 1, got 0.0",
        "train.beta: must be > 0, got -0.1",
    ]


def test_lever_switches_in_the_environment_are_checked_with_the_recipe(monkeypatch):
    recipe = config.load_recipe("dpo_lora")
    monkeypatch.setenv("TWIN_DPO_NORM_BF16", "false")  # before this check: read as "not 0", the lever silently on
    monkeypatch.setenv("TWIN_DPO_MMAP_THRESHOLD_MB", "8MB")  # before: int() raised mid-run, a traceback
    monkeypatch.setenv("TWIN_DPO_REFERENCE_PAIRS", "0")
    monkeypatch.setenv("TWIN_DPO_FROZEN_BF16", " 0 ")
    with pytest.raises(UserError) as err:
        config.validate(recipe)
    assert err.value.problems == [
        "TWIN_DPO_MMAP_THRESHOLD_MB (environment): must be a whole number of MB (0: glibc's default), got '8MB'; "
        "fix it or unset it",
        "TWIN_DPO_REFERENCE_PAIRS (environment): must be a whole number of pairs >= 1, got '0'; fix it or unset it",
        "TWIN_DPO_NORM_BF16 (environment): must be 0 (off) or 1 (on), got 'false'; fix it or unset it",
    ]
    for name in ("TWIN_DPO_NORM_BF16", "TWIN_DPO_MMAP_THRESHOLD_MB", "TWIN_DPO_REFERENCE_PAIRS"):
        monkeypatch.delenv(name)
    assert config.validate(recipe) is recipe


def test_wrong_types_are_reported_before_ranges():
    recipe = config.load_recipe("dpo_lora")
    with pytest.raises(UserError, match=r"train.beta: must be a number, got '0.5'"):
        config.validate(replace(recipe, train=replace(recipe.train, beta="0.5")))


def test_full_training_of_a_4bit_base_is_refused():
    recipe = config.load_recipe("dpo_qlora")
    with pytest.raises(UserError, match="model.load_in_4bit: a 4-bit base can only be trained with method 'lora'"):
        config.validate(replace(recipe, method="full"))


def test_misspelled_field_in_a_recipe_file_names_file_line_and_fix(tmp_path):
    path = tmp_path / "mine.py"
    path.write_text(
        "from pipeline.recipe import Recipe, TrainConfig\n\nrecipe = Recipe(train=TrainConfig(learnig_rate=1e-6))\n"
    )
    with pytest.raises(UserError) as err:
        config.load_recipe(str(path))
    assert err.value.problems == [f"{path}:3: TrainConfig has no field 'learnig_rate'; did you mean learning_rate?"]


def test_recipe_file_without_recipe_and_unknown_names(tmp_path):
    path = tmp_path / "empty.py"
    path.write_text("x = 1\n")
    with pytest.raises(UserError, match="defines no `recipe`"):
        config.load_recipe(str(path))
    with pytest.raises(UserError, match="unknown recipe 'dpo_lorra'; did you mean dpo_lora"):
        config.load_recipe("dpo_lorra")
    with pytest.raises(UserError, match="recipe file nothere.py does not exist"):
        config.load_recipe("nothere.py")
