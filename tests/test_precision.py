"""bf16 autocast must not swallow a small update: what a bf16 run reports after one small step is what fp32
reports (training/exact_eval.py: the held-out numbers are computed in fp32)."""

from __future__ import annotations

import pytest

from conftest import tiny_recipe
from pipeline.recipe import apply_overrides
from pipeline.training import dpo


def _one_step(tiny_llama, small_data, tmp_path, dtype: str):
    recipe = apply_overrides(
        tiny_recipe(tiny_llama, small_data, learning_rate=1e-5), [f"model.dtype={dtype}", "train.eval_every=0"]
    )
    return dpo.train(recipe, tmp_path / dtype, max_steps=1)[0]


def test_bf16_policy_log_probs_move_after_one_small_step(tiny_llama, small_data, tmp_path):
    """One optimizer step at lr 1e-5: Adam moves every adapter weight by about 1e-5, far below bf16's resolution
    of the layer outputs (1/256). Under bf16 evaluation that change rounded away or into noise; now the bf16 run's
    held-out policy log-probs move by what an fp32 run's move (Adam's first step is lr * sign(gradient), so the two
    runs' adapters are nearly the same), and an untouched policy scores exactly 0."""
    bf16 = _one_step(tiny_llama, small_data, tmp_path, "bfloat16")
    fp32 = _one_step(tiny_llama, small_data, tmp_path, "float32")
    assert bf16["precision"] == "weights float32, compute bf16" and bf16["held_out_precision"] == "float32"
    for run in (bf16, fp32):
        assert run["eval_before"]["reward_margin"] == 0.0 and run["eval_before"]["reward_accuracy"] == 0.0
    true_margin = fp32["eval_after"]["reward_margin"]
    assert abs(true_margin) > 1e-6  # the step did move the policy
    assert bf16["eval_after"]["reward_margin"] == pytest.approx(true_margin, rel=0.05)
    assert bf16["eval_after"]["reward_accuracy"] == pytest.approx(fp32["eval_after"]["reward_accuracy"], abs=0.13)


def test_fp32_runs_are_left_alone(tiny_llama, small_data, tmp_path):
    summary = _one_step(tiny_llama, small_data, tmp_path, "float32")
    assert summary["precision"] == "weights float32, compute float32"
    assert summary["held_out_precision"] == "float32"


@pytest.mark.parametrize("sets", [["method=full", "train.precompute_ref=false"], ["train.precompute_ref=false"]])
def test_bf16_untrained_policy_scores_exactly_zero_with_the_reference_run_live(tiny_llama, small_data, tmp_path, sets):
    """Full DPO runs its reference model at every step (TRL prepares it with accelerate's autocast wrapper), LoRA
    without the cache runs the base with the adapter off: in both, held-out evaluation is fp32 on both sides."""
    recipe = apply_overrides(
        tiny_recipe(tiny_llama, small_data, learning_rate=1e-7), ["model.dtype=bfloat16", "train.eval_every=0", *sets]
    )
    summary = dpo.train(recipe, tmp_path / "run", max_steps=1)[0]
    assert summary["held_out_precision"] == "float32"
    assert summary["eval_before"]["reward_margin"] == 0.0 and summary["eval_before"]["reward_accuracy"] == 0.0
