"""The speed levers change no number: completion-only head, cached reference, length-grouped batches."""

from __future__ import annotations

import copy

import pytest
import torch

from conftest import move_lora_b, pairs_batch, tiny_dpo_trainer, tiny_recipe
from pipeline.training import fast_head as fast
from pipeline.training import reference


def _trainer(tiny_llama, small_data, tmp_path, **overrides):
    return tiny_dpo_trainer(tiny_recipe(tiny_llama, small_data, **overrides), tmp_path)


@pytest.mark.parametrize(("chunk", "keep"), [(7, 0), (7, 1 << 30), (256, 1 << 30)])
def test_completion_only_head_gives_trls_loss_and_gradients(tiny_llama, small_data, tmp_path, monkeypatch, chunk, keep):
    monkeypatch.setattr(fast, "CHUNK", chunk)  # 7: many slices
    monkeypatch.setattr(fast, "KEEP_BYTES", keep)  # 0: each slice recomputed in the backward pass; else kept
    trainer = _trainer(tiny_llama, small_data, tmp_path, precompute_ref=False)
    model = trainer.model
    move_lora_b(model)
    batch = pairs_batch(trainer, range(4))
    results = []
    for use_ours in (False, True):
        if use_ours:
            assert fast.install_on_trainer(trainer)
        model.zero_grad()
        loss = trainer.compute_loss(model, batch)
        loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
        results.append((loss.detach(), grads, copy.deepcopy(dict(trainer._metrics["train"]))))
        trainer._metrics["train"].clear()
    (loss_trl, grads_trl, metrics_trl), (loss_ours, grads_ours, metrics_ours) = results
    torch.testing.assert_close(loss_ours, loss_trl, atol=1e-5, rtol=1e-5)
    assert grads_ours.keys() == grads_trl.keys() and len(grads_ours) > 0
    for name in grads_trl:
        torch.testing.assert_close(grads_ours[name], grads_trl[name], atol=1e-5, rtol=1e-4, msg=name)
    for key in ("logps/chosen", "logps/rejected", "rewards/margins", "entropy", "logits/chosen", "mean_token_accuracy"):
        assert metrics_ours[key] == pytest.approx(metrics_trl[key], abs=1e-4), key


@pytest.mark.parametrize("keep", [0, 1 << 30])
@pytest.mark.parametrize(("vocab_block", "exp_rows"), [(8192, 64), (16, 2)])
def test_completion_log_probs_and_statistics_equal_a_full_log_softmax(monkeypatch, keep, vocab_block, exp_rows):
    """Every output and every gradient (hidden, weight, bias) of the sliced head against torch's log_softmax,
    for the kept and the recomputed softmax, with the whole vocabulary and slice in one block and in several
    (16 of 50 words: a short last block; 2 of 5 rows). The reference is float64; the head works in float32 after
    the matmul (its logits, log-normaliser and statistics), hence 1e-6 absolute and 1e-5 relative."""
    monkeypatch.setattr(fast, "CHUNK", 5)
    monkeypatch.setattr(fast, "KEEP_BYTES", keep)
    monkeypatch.setattr(fast, "VOCAB_BLOCK", vocab_block)
    monkeypatch.setattr(fast, "EXP_ROWS", exp_rows)
    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(13, 8, dtype=torch.float64, generator=gen, requires_grad=True)
    weight = torch.randn(50, 8, dtype=torch.float64, generator=gen, requires_grad=True)
    bias = torch.randn(50, dtype=torch.float64, generator=gen, requires_grad=True)
    targets = torch.randint(0, 50, (13,), generator=gen)
    upstream = torch.randn(13, dtype=torch.float64, generator=gen)
    names = ("log_probs", "entropy", "log_sum_sq_probs", "mean_logits", "is_top1")

    log_probs, entropy, sum_sq, mean, top1 = fast.completion_log_probs(hidden, weight, bias, targets, names)
    ours = torch.autograd.grad((log_probs * upstream).sum(), (hidden, weight, bias))
    logits = hidden @ weight.T + bias
    log_p = logits.log_softmax(-1)
    expected = log_p.gather(-1, targets[:, None]).squeeze(-1)
    theirs = torch.autograd.grad((expected * upstream).sum(), (hidden, weight, bias))
    for got, want in [
        (log_probs, expected),
        (entropy, -(log_p.exp() * log_p).sum(-1)),
        (sum_sq, (2 * log_p).exp().sum(-1).log()),
        (mean, logits.mean(-1)),
    ]:
        torch.testing.assert_close(got.double(), want.detach(), atol=1e-6, rtol=1e-5)
    assert torch.equal(top1, logits.argmax(-1) == targets)
    for got, want in zip(ours, theirs, strict=True):
        torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)


def test_cached_reference_equals_a_fresh_computation(tiny_llama, small_data, tmp_path):
    cache = tmp_path / "refcache"
    first = _trainer(tiny_llama, small_data, tmp_path / "a")
    info = reference.attach(first, cache)
    assert not info["reference_reused"] and info["reference_forward_passes"] == 2
    second = _trainer(tiny_llama, small_data, tmp_path / "b")
    info2 = reference.attach(second, cache)
    assert info2["reference_reused"] and info2["reference_forward_passes"] == 0
    fresh = _trainer(tiny_llama, small_data, tmp_path / "c")
    reference.attach(fresh, None)  # no cache: computed now
    for name in ("train_dataset", "eval_dataset"):
        for column in ("ref_chosen_logps", "ref_rejected_logps"):
            assert getattr(second, name)[column] == getattr(fresh, name)[column], (name, column)
    # and they are the reference's: the base with the adapter off, as TRL computes them at every step
    batch = pairs_batch(fresh, range(4))
    c, r = fresh.compute_ref_log_probs(fresh.model, batch)
    torch.testing.assert_close(c, torch.tensor(fresh.train_dataset["ref_chosen_logps"][:4]), atol=1e-4, rtol=1e-5)


def test_cache_key_changes_with_weights_data_and_length(tiny_llama, small_data, tmp_path):
    trainer = _trainer(tiny_llama, small_data, tmp_path)
    key = reference.cache_key(trainer, [trainer.train_dataset], 512)
    assert reference.cache_key(trainer, [trainer.train_dataset], 256) != key
    assert reference.cache_key(trainer, [trainer.train_dataset.select(range(4))], 512) != key
    with torch.no_grad():
        next(p for n, p in trainer.model.named_parameters() if "lora_" not in n).add_(1e-3)
    assert reference.cache_key(trainer, [trainer.train_dataset], 512) != key
    with torch.no_grad():
        next(p for n, p in trainer.model.named_parameters() if "lora_A" in n).add_(1.0)  # policy weights don't count
    changed_base = reference.cache_key(trainer, [trainer.train_dataset], 512)
    with torch.no_grad():
        next(p for n, p in trainer.model.named_parameters() if "lora_A" in n).add_(1.0)
    assert reference.cache_key(trainer, [trainer.train_dataset], 512) == changed_base


def test_grouped_batches_give_the_same_per_pair_log_probs_as_padded_ones(tiny_llama, small_data, tmp_path):
    """A pair's log-probs do not depend on which pairs share its batch (right padding, causal attention)."""
    trainer = _trainer(tiny_llama, small_data, tmp_path, precompute_ref=False)
    fast.install_on_trainer(trainer)
    ds = trainer.train_dataset
    cols = ("prompt_ids", "chosen_ids", "rejected_ids")
    rows = [{c: ds[i][c] for c in cols} for i in range(len(ds))]
    lengths = [len(r["prompt_ids"]) + max(len(r["chosen_ids"]), len(r["rejected_ids"])) for r in rows]
    by_length = sorted(range(len(rows)), key=lambda i: lengths[i])
    mixed = by_length[::2] + by_length[1::2]  # long and short pairs together: lots of padding

    def logps(order, batch=4):
        out = {}
        for start in range(0, len(order), batch):
            idx = order[start : start + batch]
            c, r = trainer.compute_ref_log_probs(
                trainer.model, trainer._prepare_inputs(trainer.data_collator([rows[i] for i in idx]))
            )
            out.update({i: (float(a), float(b)) for i, a, b in zip(idx, c, r, strict=True)})
        return out

    grouped, padded, alone = logps(by_length), logps(mixed), logps(list(range(len(rows))), batch=1)
    for i in range(len(rows)):
        # equal up to fp32 summation order: relative 1e-6 on sums of several hundred log-probs
        assert grouped[i] == pytest.approx(alone[i], rel=1e-6) and padded[i] == pytest.approx(alone[i], rel=1e-6)


def test_one_pair_per_reference_forward_changes_the_key_not_the_numbers(tiny_llama, small_data, tmp_path, monkeypatch):
    """The bench's reference-batching lever (TWIN_DPO_REFERENCE_PAIRS): other batches, so another cache entry,
    and per pair the same log-probs up to float32 summation order."""
    from pipeline.errors import UserError

    grouped = _trainer(tiny_llama, small_data, tmp_path / "a")
    info = reference.attach(grouped, tmp_path / "cache")
    monkeypatch.setenv("TWIN_DPO_REFERENCE_PAIRS", "1")
    alone = _trainer(tiny_llama, small_data, tmp_path / "b")
    info_alone = reference.attach(alone, tmp_path / "cache")
    assert not info_alone["reference_reused"]  # a different key: not read from the grouped run's entry
    assert not info["reference_reused"] and reference.train_batching(alone) == (1, False)
    assert reference.train_batching(grouped) == (1, False)  # read now, under the variable
    monkeypatch.delenv("TWIN_DPO_REFERENCE_PAIRS")
    assert reference.train_batching(grouped) == (2, False)  # the steps' own 2-pair batches
    for column in ("ref_chosen_logps", "ref_rejected_logps"):
        torch.testing.assert_close(
            torch.tensor(alone.train_dataset[column]), torch.tensor(grouped.train_dataset[column]), rtol=1e-6, atol=0
        )
    monkeypatch.setenv("TWIN_DPO_REFERENCE_PAIRS", "two")
    with pytest.raises(UserError, match="TWIN_DPO_REFERENCE_PAIRS='two'"):
        reference.train_batching(alone)
