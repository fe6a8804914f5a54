"""The embedded twin (`model.name_or_path=twin:<sft recipe>`): built once by LoRA SFT + merge, cached, reused,
rebuilt when its recipe changes; and the default DPO recipes train on it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import tiny_recipe
from pipeline.recipe import EMBEDDED_MODEL, TWIN_MODEL
from pipeline.training import dpo, twin

SFT_RECIPE = """
from dataclasses import replace
from recipes.sft_twin import recipe as base

recipe = replace(
    base,
    name="tiny-sft",
    model=replace(base.model, name_or_path={model!r}, dtype="float32"),
    data=replace(base.data, train={train!r}, eval={eval!r}, max_length=512),
    train=replace(base.train, learning_rate={lr}, warmup_steps=0, eval_every=0.0, max_steps=3),
)
"""


def _write_recipe(folder: Path, tiny_llama, small_data, lr: float) -> Path:
    path = folder / f"tiny_sft_{str(lr).replace('.', '_').replace('-', '_')}.py"
    path.write_text(
        SFT_RECIPE.format(model=str(tiny_llama), train=str(small_data["train"]), eval=str(small_data["heldout"]), lr=lr)
    )
    return path


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(Path(folder).glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def test_twin_is_built_once_then_reused(tiny_llama, small_data, tmp_path, monkeypatch, capsys):
    from pipeline.training import sft as sft_module

    calls = []
    real = sft_module.sft
    monkeypatch.setattr(sft_module, "sft", lambda *a, **k: calls.append(1) or real(*a, **k))
    spec = f"{twin.PREFIX}{_write_recipe(tmp_path, tiny_llama, small_data, 3e-3)}"
    folder = Path(twin.model_dir(spec))
    assert calls == [1]
    out = capsys.readouterr().out
    assert "building the twin once" in out and "twin ready" in out
    info = json.loads((folder / twin.INFO).read_text())
    assert info["sft_recipe"] == "tiny-sft" and info["sft_steps"] == 3
    assert info["sft_held_out_loss"][1] < info["sft_held_out_loss"][0]  # SFT learned the author's answers
    # a normal model folder: config, safetensors (no pickle), tokenizer; nothing half-written beside it
    assert (folder / "config.json").is_file() and (folder / "tokenizer_config.json").is_file()
    assert not list(folder.glob("*.bin")) and not list(folder.parent.glob(".*tmp*"))
    # merged: the weights differ from the base's where SFT put adapters, and are the same elsewhere
    base, merged = _weights(tiny_llama), _weights(folder)
    assert set(base) == set(merged)
    moved = [k for k in base if not torch.equal(base[k], merged[k])]
    assert moved and all("proj" in k for k in moved)

    assert Path(twin.model_dir(spec)) == folder  # reused: no second SFT
    assert calls == [1]
    assert "building" not in capsys.readouterr().out


def test_a_changed_sft_recipe_builds_another_twin(tiny_llama, small_data, tmp_path):
    first = Path(twin.model_dir(f"{twin.PREFIX}{_write_recipe(tmp_path, tiny_llama, small_data, 3e-3)}"))
    second = Path(twin.model_dir(f"{twin.PREFIX}{_write_recipe(tmp_path, tiny_llama, small_data, 1e-3)}"))
    assert first != second and first.is_dir() and second.is_dir()
    a, b = _weights(first), _weights(second)
    assert any(not torch.equal(a[k], b[k]) for k in a)


def test_dpo_trains_on_the_twin_with_the_twin_as_reference(tiny_llama, small_data, tmp_path):
    spec = f"{twin.PREFIX}{_write_recipe(tmp_path, tiny_llama, small_data, 3e-3)}"
    recipe = tiny_recipe(tiny_llama, small_data)
    from dataclasses import replace

    recipe = replace(recipe, model=replace(recipe.model, name_or_path=spec))
    summary, run_dir = dpo.train(recipe, tmp_path / "run", max_steps=1)
    folder = str(twin.model_dir(spec))
    assert summary["model_path"] == folder
    # recipe.json names the folder the run trained on (as runs:<recipe> adapters are pinned)
    assert json.loads((run_dir / "recipe.json").read_text())["model"]["name_or_path"] == folder
    assert summary["model"].startswith(f"{spec}, the twin: ") and "LoRA SFT (tiny-sft)" in summary["model"]
    assert summary["reference"].startswith("the same model with the adapter switched off")
    assert summary["eval_before"]["reward_margin"] == 0.0  # the twin is its own reference before training
    adapter_config = json.loads((run_dir / "adapter" / "adapter_config.json").read_text())
    assert adapter_config["base_model_name_or_path"] == folder


def test_shipped_recipes_name_the_twin():
    from recipes.dpo_full import recipe as full
    from recipes.dpo_lora import recipe as lora
    from recipes.dpo_lora_twin import recipe as lora_twin
    from recipes.dpo_qlora import recipe as qlora
    from recipes.sft_twin import recipe as sft

    assert lora.model.name_or_path == qlora.model.name_or_path == full.model.name_or_path == TWIN_MODEL
    assert sft.model.name_or_path == EMBEDDED_MODEL  # the twin is made from the instruct model
    assert lora_twin.model.name_or_path == EMBEDDED_MODEL and lora_twin.model.adapter == "runs:sft-twin"


@pytest.mark.parametrize(
    "spec, message",
    [
        ("twin:dpo_lora", "is a 'lora' recipe; name an SFT recipe"),
        ("twin:no_such_recipe", "unknown recipe 'no_such_recipe'"),
    ],
)
def test_a_twin_spec_that_names_no_sft_recipe_is_one_line(spec, message, capsys):
    from pipeline import cli

    assert cli.main(["train", "dpo_lora", "--set", f"model.name_or_path={spec}"]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
