"""On a CUDA GPU: the Unsloth backend trains the same recipes (skipped without one)."""

from __future__ import annotations

import importlib.util
from dataclasses import replace

import pytest
import torch

from conftest import tiny_recipe
from pipeline.training import dpo as train

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (torch.cuda.is_available() is False)"),
    pytest.mark.skipif(importlib.util.find_spec("unsloth") is None, reason="needs unsloth (make setup GPU=1)"),
]


@pytest.mark.parametrize("four_bit", [False, True], ids=["lora", "qlora"])
def test_unsloth_backend_trains_the_lora_recipes(tiny_llama, small_data, tmp_path, four_bit):
    recipe = tiny_recipe(tiny_llama, small_data)
    recipe = replace(recipe, model=replace(recipe.model, backend="unsloth", dtype="auto", load_in_4bit=four_bit))
    summary, run_dir = train.train(recipe, tmp_path / "run", max_steps=3)
    assert summary["backend"] == "unsloth" and summary["peak_memory_kind"] == "torch.cuda.max_memory_allocated"
    assert summary["eval_before"]["reward_margin"] == 0.0
    assert (run_dir / "adapter" / "adapter_model.safetensors").is_file()


def test_auto_picks_unsloth_on_a_gpu(tiny_llama, small_data, tmp_path):
    summary, _ = train.train(tiny_recipe(tiny_llama, small_data), tmp_path / "run", max_steps=1)
    assert summary["backend"] == "unsloth" and "CUDA GPU found" in summary["backend_reason"]
