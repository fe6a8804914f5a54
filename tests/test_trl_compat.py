"""The TRL internals twin-dpo touches (pipeline/training/trl_compat.py), checked on a real DPOTrainer: a TRL
upgrade that renames or removes one fails here, by name, instead of in a user's run."""

from __future__ import annotations

import dataclasses
import inspect

import pytest
import torch

from conftest import tiny_dpo_trainer, tiny_recipe
from pipeline.training import trl_compat


@pytest.fixture(scope="module")
def trainer(tiny_llama, small_data, tmp_path_factory):
    return tiny_dpo_trainer(tiny_recipe(tiny_llama, small_data), tmp_path_factory.mktemp("compat"))


def test_prepare_inputs_moves_a_collated_batch(trainer):
    ds = trainer.train_dataset
    rows = [{c: ds[i][c] for c in ("prompt_ids", "chosen_ids", "rejected_ids")} for i in range(2)]
    batch = trl_compat.prepare_inputs(trainer, trainer.data_collator(rows))
    assert isinstance(batch["input_ids"], torch.Tensor) and batch["input_ids"].shape[0] == 4  # chosen + rejected


def test_the_precompute_switch_is_what_the_loss_reads(trainer):
    source = inspect.getsource(type(trainer))
    assert "self.precompute_ref_logps" in source and 'inputs["ref_chosen_logps"]' in source
    assert hasattr(trainer, "precompute_ref_logps") and hasattr(trainer.args, "precompute_ref_log_probs")


def test_weighting_and_ld_alpha_attributes_exist(trainer):
    assert trl_compat.uses_weighting(trainer) is False
    assert trl_compat.ld_alpha(trainer) is None


def test_token_counter_counts_training_tokens(trainer):
    assert trl_compat.tokens_trained(trainer) == 0
    trainer.train()
    assert trl_compat.tokens_trained(trainer) > 0


def test_sft_trainer_counts_tokens_the_same_way():
    from trl import SFTTrainer

    assert "self._total_train_tokens" in inspect.getsource(SFTTrainer)


def test_fused_lm_head_output_has_the_fields_our_head_fills():
    output = trl_compat.fused_output_class()
    assert output is not None
    names = {f.name for f in dataclasses.fields(output)}
    assert {
        "loss",
        "log_probs",
        "entropy",
        "log_sum_sq_probs",
        "mean_logits",
        "is_top1",
        "label_mask",
        "aux_loss",
    } <= names
