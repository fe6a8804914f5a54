"""Padding-free DPO (training/packing.py) computes what TRL's padded rows compute: log-probs, loss, gradients.

Packing changes only which float32 sums run (other matrix shapes, masked keys instead of padded ones), so the
tolerances are float32 rounding on a 2-layer model: per-token log-probs to 1e-5 absolute, the summed sequence
log-probs (sums near -600) to 1e-6 relative (a few float32 steps), each gradient tensor to 1e-4 in norm relative.
Measured here: 2.4e-6, one float32 step (6.1e-5 of 573), 2e-5. A real packing bug (a token seeing the other
answer, a position id off by one, a state laid out in the wrong row) moves log-probs by 1e-2 or more.
"""

from __future__ import annotations

import pytest
import torch

from conftest import move_lora_b, pairs_batch, tiny_dpo_trainer, tiny_recipe
from pipeline.training import fast_head, packing

_ROWS = packing._rows


def _run(trainer, batch, layout):
    """(per-sequence log-probs, loss, gradients) with the completion-only head in `layout`."""
    policy = trainer.model.get_base_model()
    fast_head.install_completion_head(policy, ("log_probs", "entropy", "mean_logits", "is_top1"), layout)
    trainer.model.zero_grad()
    loss = trainer.compute_loss(trainer.model, batch)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in trainer.model.named_parameters() if p.requires_grad}
    with torch.no_grad():
        c, r = trainer.compute_ref_log_probs(trainer.model, batch)
        labels = batch["input_ids"].masked_fill(batch["completion_mask"] == 0, -100)
        kwargs = {k: batch[k] for k in ("input_ids", "attention_mask")}
        per_token = policy(**kwargs, labels=labels, fused_lm_head=True).log_probs
    trainer._metrics["train"].clear()
    ran = policy.__dict__.pop("_twin_dpo_packed_tokens", None)
    assert (ran is None) == (layout is None), "the packed path must run when asked and only then"
    if layout is not None:  # fewer tokens than TRL's padded rows: padding dropped, and the prompt once if shared
        assert ran < batch["attention_mask"].sum() + (0 if layout else 1)
    return torch.cat([c, r]), per_token, loss.detach(), grads


@pytest.mark.parametrize("attention", ["masked", "rows"])
@pytest.mark.parametrize("family", ["tiny_llama", "tiny_qwen2"])
def test_packed_pairs_give_the_padded_log_probs_loss_and_gradients(
    family, attention, small_data, tmp_path, request, monkeypatch
):
    """`attention`: SDPA under the packed block-diagonal mask, or per gathered row (packing.ROWS_FROM)."""
    gathered = []
    monkeypatch.setattr(packing, "ROWS_FROM", 0 if attention == "rows" else 10**9)
    monkeypatch.setattr(packing, "_rows", lambda x, index: gathered.append(x.shape) or _ROWS(x, index))
    model_dir = request.getfixturevalue(family)
    trainer = tiny_dpo_trainer(tiny_recipe(model_dir, small_data, precompute_ref=False), tmp_path)
    move_lora_b(trainer.model)
    batch = pairs_batch(trainer, range(4))
    padded = _run(trainer, batch, None)
    assert (batch["attention_mask"] == 0).any(), "the batch must hold padding for the comparison to mean anything"
    for layout in (False, True):
        seq, per_token, loss, grads = _run(trainer, batch, layout)
        torch.testing.assert_close(seq, padded[0], atol=0, rtol=1e-6, msg=f"sequence log-probs, shared={layout}")
        mask = batch["completion_mask"][:, 1:].bool()
        torch.testing.assert_close(per_token[mask], padded[1][mask], atol=1e-5, rtol=0)
        # the loss reads differences of four sums near -600, each equal above to 1e-6 relative (6e-4 absolute):
        # measured within 1e-6 on fp32-only EPYCs, 9.2e-6 for Qwen2 on an AVX512-BF16 EPYC (Dec 3, the same on the
        # commits before: its float32 kernels round the packed and padded shapes differently)
        torch.testing.assert_close(loss, padded[2], atol=3e-5, rtol=1e-5)
        assert grads.keys() == padded[3].keys() and grads
        for name, g in grads.items():
            ref = padded[3][name]
            assert (g - ref).norm() <= 1e-4 * ref.norm(), (name, float((g - ref).norm() / ref.norm()))
    assert bool(gathered) == (attention == "rows"), "the per-row attention must run when asked and only then"


def test_the_packed_layout_shares_the_prompt_and_never_crosses_answers():
    """Two pairs, prompt lengths 2 and 1: the row, the position ids and who sees whom."""
    #          prompt  answer        (0 = padding, right-padded to 5)
    ids = torch.tensor([[5, 6, 7, 8, 0], [9, 3, 4, 0, 0], [5, 6, 1, 0, 0], [9, 2, 2, 2, 2]])
    attn = (ids != 0).long()
    labels = ids.clone()
    labels[[0, 2], :2] = -100
    labels[[1, 3], :1] = -100
    labels[attn == 0] = -100
    p = packing.plan(ids, attn, labels, True, "sdpa", torch.float32)
    assert p.input_ids.tolist() == [[5, 6, 7, 8, 1, 0, 0], [9, 3, 4, 2, 2, 2, 2]]
    assert p.position_ids.tolist() == [[0, 1, 2, 3, 2, 0, 0], [0, 1, 2, 1, 2, 3, 4]]
    assert p.tokens == 5 + 7
    seen = p.attention_mask[0, 0]  # pair 0: prompt 0-1, chosen 2-3, rejected 4, padding 5-6
    assert seen[4].tolist() == [True, True, False, False, True, False, False]  # rejected: the prompt and itself
    assert seen[3].tolist() == [True, True, True, True, False, False, False]  # chosen: never the rejected answer
    assert seen[5].tolist() == [False] * 5 + [True, False]  # padding: only itself (no empty softmax row)
    hidden = torch.arange(2 * 7, dtype=torch.float32).reshape(2, 7, 1)
    rows = packing.unpack(hidden, p)[..., 0]
    assert rows[0, :4].tolist() == [0, 1, 2, 3]
    assert rows[2, :3].tolist() == [0, 1, 4]  # rejected row of pair 0: the shared prompt, then its answer
    assert rows[3].tolist() == [7, 10, 11, 12, 13]
    unshared = packing.plan(ids, attn, labels, False, "sdpa", torch.float32)
    assert unshared.input_ids[0].tolist() == [5, 6, 7, 8, 5, 6, 1, 0]  # pair 1 is 3 + 5 = 8 long
    assert unshared.position_ids[0].tolist() == [0, 1, 2, 3, 0, 1, 2, 0]
    assert unshared.attention_mask[0, 0, 4].tolist() == [False] * 4 + [True] + [False] * 3


def test_rows_that_do_not_share_their_prompt_run_unpacked():
    ids = torch.tensor([[5, 6, 7], [4, 6, 1]])  # keep_end truncation can leave two different prompt tails
    labels = torch.tensor([[-100, -100, 7], [-100, -100, 1]])
    assert packing.plan(ids, torch.ones_like(ids), labels, True, "sdpa", torch.float32) is None
    assert packing.plan(ids, torch.ones_like(ids), labels, False, "sdpa", torch.float32) is not None
    assert packing.plan(ids, torch.ones_like(ids), labels, True, "flash_attention_2", torch.float32) is None
    left_padded = torch.tensor([[0, 1, 1], [1, 1, 1]])
    assert packing.plan(ids, left_padded, labels, False, "sdpa", torch.float32) is None


def test_sequences_longer_than_a_sliding_window_run_unpacked():
    """A custom mask replaces the model's own, sliding window included: pack only what fits in the window."""
    from transformers import Gemma3TextConfig, LlamaConfig, MistralConfig

    assert packing.attention_window(LlamaConfig()) is None
    assert packing.attention_window(MistralConfig(sliding_window=8)) == 8
    assert packing.attention_window(Gemma3TextConfig(sliding_window=64)) == 64
    ids = torch.tensor([[5, 6, 7, 8, 9], [5, 6, 1, 2, 0]])
    labels = torch.tensor([[-100, -100, 7, 8, 9], [-100, -100, 1, 2, -100]])
    attn = (torch.arange(5) < torch.tensor([[5], [4]])).long()
    assert packing.plan(ids, attn, labels, True, "sdpa", torch.float32, window=4) is None
    assert packing.plan(ids, attn, labels, True, "sdpa", torch.float32, window=5) is not None


def test_the_work_counter_counts_the_packed_rows_and_the_projected_positions(tiny_llama, small_data, tmp_path):
    """training/work.py (the bench's MFU) counts what really ran: packed positions, answer positions of the head."""
    from pipeline.training import work

    trainer = tiny_dpo_trainer(tiny_recipe(tiny_llama, small_data, precompute_ref=False), tmp_path)
    policy = trainer.model.get_base_model()
    fast_head.install_completion_head(policy, ("log_probs", "entropy", "mean_logits", "is_top1"), True)
    counts = work.total(work.install_on_trainer(trainer))
    assert counts["train"]["body_tokens"] == 0
    batch = pairs_batch(trainer, range(4))
    labels = batch["input_ids"].masked_fill(batch["completion_mask"] == 0, -100)
    packed = packing.plan(batch["input_ids"], batch["attention_mask"], labels, True, "sdpa", torch.float32)
    trainer.model.train()
    trainer.compute_loss(trainer.model, batch)  # policy with gradient, then TRL's reference forward without
    counts = work.total(work.install_on_trainer(trainer))
    answers = int((labels[:, 1:] != -100).sum())
    assert counts["train"] == {"body_tokens": packed.input_ids.numel(), "head_rows": answers, "forwards": 1}
    assert counts["reference"] == {"body_tokens": packed.input_ids.numel(), "head_rows": answers, "forwards": 1}
    assert packed.input_ids.numel() < batch["input_ids"].numel()
    trainer.model.eval()
    with torch.no_grad():
        trainer.compute_loss(trainer.model, batch)  # held-out evaluation: not training work
    assert work.total(work.install_on_trainer(trainer)) == counts
