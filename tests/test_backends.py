"""The backend seam: one recipe -> Unsloth kwargs translation, checked against the hf backend, on CPU."""

from __future__ import annotations

import pytest

from pipeline import recipe as config
from pipeline.errors import UserError
from pipeline.model import backend, hf, unsloth

# FastLanguageModel's keyword arguments we use (Unsloth 2026.10.7: models/loader.py, models/llama.py)
FROM_PRETRAINED = {
    "model_name",
    "max_seq_length",
    "dtype",
    "load_in_4bit",
    "full_finetuning",
    "trust_remote_code",
    "revision",
}
GET_PEFT_MODEL = {
    "r",
    "target_modules",
    "lora_alpha",
    "lora_dropout",
    "bias",
    "use_gradient_checkpointing",
    "random_state",
    "use_rslora",
}


def test_every_model_and_lora_field_is_mapped_or_has_a_reason():
    fields = [k for k in config.all_keys() if k.startswith(("model.", "lora."))]
    assert sorted(fields) == sorted(unsloth.FIELDS)
    for key, (unsloth_arg, hf_use) in unsloth.FIELDS.items():
        assert hf_use, key
        assert unsloth_arg is None or unsloth_arg in FROM_PRETRAINED | GET_PEFT_MODEL, key


@pytest.mark.parametrize("name", config.available_recipes())
def test_unsloth_kwargs_and_hf_read_the_same_fields_the_same_way(name):
    recipe = config.load_recipe(name)
    load, peft = unsloth.unsloth_kwargs(recipe, "/models/twin")
    assert set(load) <= FROM_PRETRAINED and load["model_name"] == "/models/twin"
    assert load["load_in_4bit"] is recipe.model.load_in_4bit and load["max_seq_length"] == recipe.model.max_seq_length
    assert load["full_finetuning"] is (recipe.method == "full")
    if recipe.method == "full":
        assert peft is None
        return
    assert set(peft) <= GET_PEFT_MODEL and peft["use_gradient_checkpointing"] == "unsloth"
    lora = hf.peft_config(recipe)  # what the hf backend builds from the same recipe
    assert (peft["r"], peft["lora_alpha"], peft["lora_dropout"], peft["bias"], peft["use_rslora"]) == (
        lora.r,
        lora.lora_alpha,
        lora.lora_dropout,
        lora.bias,
        lora.use_rslora,
    )
    assert sorted(peft["target_modules"]) == sorted(lora.target_modules)
    assert peft["random_state"] == recipe.train.seed
    for key, (arg, _) in unsloth.FIELDS.items():
        if arg in load or arg in peft:
            value = config.get_value(recipe, key)
            got = load.get(arg, peft.get(arg))
            if key == "model.name_or_path":
                expected = "/models/twin"
            elif key == "model.dtype":
                expected = None if value == "auto" else value
            elif key == "lora.target_modules":
                expected = list(value)
            else:
                expected = value
            assert got == expected, key


def test_auto_chooses_and_explains(monkeypatch):
    recipe = config.load_recipe("dpo_lora")
    monkeypatch.setattr(backend, "cuda_available", lambda: False)
    assert backend.resolve_backend(recipe).name == "hf"
    assert "no CUDA GPU" in backend.resolve_backend(recipe).reason
    monkeypatch.setattr(backend, "cuda_available", lambda: True)
    monkeypatch.setattr(backend.importlib.util, "find_spec", lambda name: object() if name == "unsloth" else None)
    monkeypatch.setattr(backend, "unsloth_conflicts", lambda: [])
    assert backend.resolve_backend(recipe) == backend.Backend(
        "unsloth", "auto: CUDA GPU found and unsloth is installed", "cuda"
    )
    monkeypatch.setattr(
        backend, "unsloth_conflicts", lambda: ["unsloth 2026.10.7 needs transformers<=5.17.0, installed 5.23.0"]
    )
    chosen = backend.resolve_backend(recipe)
    assert chosen.name == "hf" and "needs transformers<=5.17.0" in chosen.reason
    forced = config.apply_overrides(recipe, ["model.backend=unsloth"])
    with pytest.raises(
        UserError, match=r"model.backend=unsloth: unsloth 2026.10.7 needs transformers<=5.17.0, installed 5.23.0"
    ):
        backend.resolve_backend(forced)


def test_unsloth_not_installed_is_one_line(monkeypatch):
    monkeypatch.setattr(backend, "cuda_available", lambda: True)
    monkeypatch.setattr(backend.importlib.util, "find_spec", lambda _name: None)
    with pytest.raises(UserError, match="unsloth is not installed; run `make setup GPU=1`"):
        backend.resolve_backend(config.apply_overrides(config.load_recipe("dpo_lora"), ["model.backend=unsloth"]))
