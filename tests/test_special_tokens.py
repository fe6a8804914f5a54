"""Exactly one BOS and one EOS per training sequence, for each family's chat format.

Double BOS (a chat template that writes it, encoded by a tokenizer that adds it again) and double EOS (an answer
that ends in it, plus the trainer appending it) are known bugs in peers (trl issue 4481, axolotl PR 3560). The
token ids TRL trains on are counted here, for DPO and for what generation and the export proofs encode.
"""

from __future__ import annotations

import pytest

from chat_templates import FAMILY_TOKENIZERS
from conftest import build_model, build_tokenizer, tiny_dpo_trainer, tiny_recipe
from pipeline.data import Pair, render_prompt


@pytest.fixture(params=sorted(FAMILY_TOKENIZERS))
def family_model(request, tmp_path):
    tok = build_tokenizer(family=request.param)
    model = build_model("llama", len(tok), ids=(tok.bos_token_id, tok.eos_token_id, tok.pad_token_id))
    folder = tmp_path / "model"
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return request.param, folder, tok


def _bos_is_a_marker(spec) -> bool:
    """ChatML tokenizers name <|im_start|>, which opens every turn, as BOS: it is no sequence start there."""
    return spec.bos == "<|im_start|>"


def test_one_bos_and_one_eos_per_dpo_sequence(family_model, small_data, tmp_path):
    family, folder, tok = family_model
    spec = FAMILY_TOKENIZERS[family]
    trainer = tiny_dpo_trainer(tiny_recipe(folder, small_data), tmp_path / "out")
    starts_with_bos = spec.adds_bos or "bos_token" in spec.template
    for row in trainer.train_dataset:
        prompt = row["prompt_ids"]
        if not _bos_is_a_marker(spec):
            assert prompt.count(tok.bos_token_id) == int(starts_with_bos), (family, prompt[:4])
            assert not starts_with_bos or prompt[0] == tok.bos_token_id
        for side in ("chosen_ids", "rejected_ids"):
            answer = row[side]
            assert answer[-1] == tok.eos_token_id and answer.count(tok.eos_token_id) == 1, (family, side)
            assert _bos_is_a_marker(spec) or tok.bos_token_id not in answer


def test_generation_prompts_carry_one_bos(family_model):
    family, _, tok = family_model
    spec = FAMILY_TOKENIZERS[family]
    ids = tok(render_prompt(tok, Pair((("user", "Hello"),), "", "", "q"), "Be brief."))["input_ids"]
    if not _bos_is_a_marker(spec):
        starts_with_bos = spec.adds_bos or "bos_token" in spec.template
        assert ids.count(tok.bos_token_id) == int(starts_with_bos) and (
            not starts_with_bos or ids[0] == tok.bos_token_id
        )
