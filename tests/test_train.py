"""Whole DPO runs on tiny models: what moved, what did not, and what the run folder holds."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import tiny_recipe
from pipeline.data import load_pairs, templated
from pipeline.training import dpo as train


def _reference_logps(model_dir: Path, adapter_dir: Path | None, data: Path) -> torch.Tensor:
    """Summed log-probs of each chosen answer under base (+ adapter, or with it switched off)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    if adapter_dir is not None:
        model = PeftModel.from_pretrained(model, adapter_dir)
    model.eval()
    rows = templated(tok, load_pairs(str(data), "train", "data"), None)
    out = []
    with torch.no_grad():
        for row in rows:
            prompt = tok(row["prompt"])["input_ids"]
            full = tok(row["prompt"] + row["chosen"] + tok.eos_token)["input_ids"]
            logits = model(torch.tensor([full])).logits[0, :-1].float()
            logp = torch.log_softmax(logits, -1).gather(-1, torch.tensor(full[1:])[:, None])[:, 0]
            out.append(logp[len(prompt) - 1 :].sum())
    return torch.stack(out)


def test_lora_dpo_moves_only_the_adapter_and_keeps_the_reference(tiny_llama, small_data, tmp_path):
    recipe = tiny_recipe(tiny_llama, small_data)
    base_before = load_file(str(tiny_llama / "model.safetensors"))
    ref_before = _reference_logps(tiny_llama, None, small_data["heldout"])

    summary, run_dir = train.train(recipe, tmp_path / "run", max_steps=4)

    adapter = load_file(str(run_dir / "adapter" / "adapter_model.safetensors"))
    lora_b = [v for k, v in adapter.items() if "lora_B" in k]
    assert lora_b and all(t.abs().max() > 0 for t in lora_b), "LoRA B starts at zero; every one must have moved"
    base_after = load_file(str(tiny_llama / "model.safetensors"))
    assert all(torch.equal(base_before[k], base_after[k]) for k in base_before)
    # the reference is the base with the adapter off: its log-probs did not change
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32), run_dir / "adapter"
    )
    for name, param in model.get_base_model().named_parameters():
        if "lora_" not in name:
            key = name.replace("base_layer.", "")
            if key in base_before:
                assert torch.equal(param.detach(), base_before[key]), name
    ref_after = _reference_logps(tiny_llama, None, small_data["heldout"])
    assert torch.equal(ref_before, ref_after)
    policy = _reference_logps(tiny_llama, run_dir / "adapter", small_data["heldout"])
    assert not torch.allclose(policy, ref_after), "the trained policy must score answers differently"

    assert summary["eval_before"]["reward_accuracy"] == 0.0  # policy == reference: every reward is exactly 0
    assert summary["eval_before"]["reward_margin"] == 0.0
    assert summary["eval_after"]["loss"] < summary["eval_before"]["loss"]
    for key in (
        "wall_seconds",
        "pairs_per_second",
        "tokens_per_second",
        "peak_memory_bytes",
        "trainable_parameters",
        "total_parameters",
        "backend",
        "device",
        "versions",
        "eval_before",
        "eval_after",
    ):
        assert key in summary, key
    assert summary["backend"] == "hf" and summary["steps"] == 4
    # train time counts the one-off reference pass over the train pairs (README, compare and bench read it that
    # way); its held-out share is evaluation time, as the held-out reference forward is in plain TRL
    held = summary["reference_eval_seconds"]
    assert 0 < held < summary["reference_seconds"] and summary["eval_seconds"] >= held
    assert summary["train_seconds"] >= summary["reference_seconds"] - held > 0
    # the reference work counted is the pass over exactly the pairs trained, in the steps' own batches: the
    # held-out pairs' pass is not training work (bench MFU divides this work by train_seconds)
    assert summary["work"]["reference"] == summary["work"]["train"]
    assert set(summary["versions"]) >= {"torch", "transformers", "trl", "peft", "bitsandbytes"}
    assert json.loads((run_dir / "summary.json").read_text()) == json.loads(json.dumps(summary, default=str))
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics if "loss" in m] == [1, 2, 3, 4]
    assert {"rewards/accuracies", "rewards/margins", "logps/chosen"} <= set([m for m in metrics if "loss" in m][-1])
    assert json.loads((run_dir / "recipe.json").read_text())["train"]["learning_rate"] == 1e-3


def test_qlora_dpo_trains_adapter_on_4bit_base(tiny_llama, small_data, tmp_path):
    recipe = tiny_recipe(tiny_llama, small_data)
    recipe = replace(recipe, model=replace(recipe.model, load_in_4bit=True))
    summary, run_dir = train.train(recipe, tmp_path / "run", max_steps=3)
    adapter = load_file(str(run_dir / "adapter" / "adapter_model.safetensors"))
    assert all(v.abs().max() > 0 for k, v in adapter.items() if "lora_B" in k)
    assert summary["load_in_4bit"] is True
    assert summary["eval_before"]["reward_margin"] == 0.0
    assert summary["eval_after"]["loss"] < summary["eval_before"]["loss"]


def test_4bit_gradients_survive_an_evaluation_pass(tiny_llama):
    """bitsandbytes repacks 4-bit weights for a CPU kernel without backward on the first no-grad eval forward;
    pipeline.model.hf.keep_4bit_trainable stops that, so gradients after an evaluation equal those before."""
    from peft import get_peft_model

    from conftest import move_lora_b, tiny_recipe
    from pipeline.model import hf
    from pipeline.model.backend import Backend

    recipe = tiny_recipe(tiny_llama, {"train": "x", "heldout": "y"})
    recipe = replace(recipe, model=replace(recipe.model, load_in_4bit=True))
    backend = Backend("hf", "test", "cpu")
    ids = torch.arange(3, 40).unsqueeze(0)

    def lora_grads(evaluate_first: bool):
        torch.manual_seed(0)
        base = hf.load_base(recipe, str(tiny_llama), backend)
        peft_model = get_peft_model(base, hf.peft_config(recipe, base))
        move_lora_b(peft_model)  # non-zero B so gradients reach lora_A of early layers
        if evaluate_first:
            peft_model.eval()
            with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
                peft_model(ids)
        peft_model.train()
        peft_model(ids, labels=ids).loss.backward()
        return {n: p.grad.clone() for n, p in peft_model.named_parameters() if p.requires_grad}

    before, after = lora_grads(False), lora_grads(True)
    assert before.keys() == after.keys()
    for name in before:
        torch.testing.assert_close(after[name], before[name], msg=name)


@pytest.mark.parametrize("precompute", [False, True])
def test_full_dpo_trains_every_weight_against_a_frozen_copy(tiny_llama, small_data, tmp_path, precompute):
    recipe = tiny_recipe(tiny_llama, small_data, learning_rate=1e-4, precompute_ref=precompute)
    recipe = replace(recipe, name="dpo-full", method="full")
    base = load_file(str(tiny_llama / "model.safetensors"))
    summary, run_dir = train.train(recipe, tmp_path / "run", max_steps=3)
    trained = load_file(str(run_dir / "model" / "model.safetensors"))
    moved = [k for k in base if not torch.equal(base[k], trained[k])]
    assert len(moved) >= len(base) - 1, "full DPO trains (nearly) every tensor"
    assert load_file(str(tiny_llama / "model.safetensors")).keys() == base.keys()
    assert not (run_dir / "adapter").exists()
    assert summary["trainable_parameters"] == summary["total_parameters"]
    assert "separate frozen copy" in summary["reference"]


def test_eval_split_carved_from_train_when_none_given(tiny_llama, small_data):
    recipe = tiny_recipe(tiny_llama, small_data)
    recipe = replace(recipe, data=replace(recipe.data, eval=None, eval_fraction=0.25))
    prep = train.prepare(recipe)
    assert len(prep.train_rows) == 12 and len(prep.eval_rows) == 4
    assert not {(r["prompt"], r["chosen"]) for r in prep.train_rows} & {
        (r["prompt"], r["chosen"]) for r in prep.eval_rows
    }
