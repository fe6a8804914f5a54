"""Frozen weights held in bf16 for training (training/held_weights.py) change no number a run produces."""

from __future__ import annotations

import errno
import sys
import tempfile
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import lean_trainer, pairs_batch, tiny_dpo_trainer, tiny_recipe
from pipeline.model import runtime
from pipeline.recipe import apply_overrides
from pipeline.training import dpo, held_weights, lean_linear


def _frozen(model) -> list[torch.nn.Linear]:
    lm_head = model.get_base_model().get_output_embeddings()
    return [
        m for m in model.modules() if type(m) is torch.nn.Linear and not m.weight.requires_grad and m is not lm_head
    ]


def _step(trainer, batch):
    trainer.model.zero_grad()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = trainer.compute_loss(trainer.model, batch)
    loss.backward()
    trainer._metrics["train"].clear()
    return loss.detach(), {n: p.grad.clone() for n, p in trainer.model.named_parameters() if p.requires_grad}


def _float32_logits(model, batch) -> torch.Tensor:
    with torch.no_grad(), torch.autocast("cpu", enabled=False):
        return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits


def test_held_weights_give_the_same_loss_gradients_and_float32_passes(tiny_llama, small_data, tmp_path):
    trainer, batch = lean_trainer(tiny_llama, small_data, tmp_path)
    model = trainer.model
    frozen = _frozen(model)
    before = {id(m): m.weight.detach().clone() for m in frozen}
    loss, grads = _step(trainer, batch)
    logits = _float32_logits(model, batch)

    held = held_weights.hold(lean_linear.linears(model), "bf16", tmp_path)
    assert held is not None and len(held.params) == len(frozen)
    assert all(m.weight.dtype == torch.bfloat16 for m in frozen)
    assert held.spill is not None  # random float32 weights: bf16 holds none of them exactly
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".twin-dpo-float32-")]  # unlinked at once
    held_loss, held_grads = _step(trainer, batch)
    # the matmuls read the very bf16 tensors autocast's casts made: bit for bit
    assert torch.equal(held_loss, loss)
    assert held_grads.keys() == grads.keys() and grads
    for name, g in held_grads.items():
        assert torch.equal(g, grads[name]), name
    # a float32 pass reads each layer's float32 values back from the file
    assert torch.equal(_float32_logits(model, batch), logits)

    held.restore()
    assert held.spill.closed
    for m in frozen:
        assert m.weight.dtype == torch.float32 and torch.equal(m.weight, before[id(m)])
        assert not hasattr(m.weight, held_weights.SLOT)
    assert torch.equal(_step(trainer, batch)[0], loss)


def test_weights_bf16_holds_exactly_need_no_file(tiny_llama, small_data, tmp_path):
    trainer = tiny_dpo_trainer(tiny_recipe(tiny_llama, small_data, precompute_ref=False), tmp_path)
    model = trainer.model
    lean_linear.install(model)
    with torch.no_grad():  # as a bf16 checkpoint loads
        for m in _frozen(model):
            m.weight.copy_(m.weight.to(torch.bfloat16))
    batch = pairs_batch(trainer, range(2))
    logits = _float32_logits(model, batch)
    held = held_weights.hold(lean_linear.linears(model), "bf16", tmp_path)
    assert held.spill is None and all(o is None for o in held.offsets)
    assert torch.equal(_float32_logits(model, batch), logits)
    held.restore()


def test_no_room_for_the_float32_copy_leaves_the_weights_as_they_were(
    tiny_llama, small_data, tmp_path, monkeypatch, capsys
):
    trainer = tiny_dpo_trainer(tiny_recipe(tiny_llama, small_data, precompute_ref=False), tmp_path)
    model = trainer.model
    lean_linear.install(model)

    class Full:
        def __init__(self, *args, **kwargs):
            self.closed, self.name = False, "full"

        def tell(self):
            return 0

        def write(self, _data):
            raise OSError(errno.ENOSPC, "No space left on device")

        def close(self):
            self.closed = True

    monkeypatch.setattr(tempfile, "TemporaryFile", Full)
    assert held_weights.hold(lean_linear.linears(model), "bf16", tmp_path) is None
    assert all(m.weight.dtype == torch.float32 for m in _frozen(model))
    out = capsys.readouterr().out
    assert "frozen weights stay float32" in out and "No space left on device" in out and str(tmp_path) in out


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="madvise page release: Linux only")
def test_released_pages_leave_the_resident_set():
    def rss() -> int:
        return int(next(line for line in open("/proc/self/status") if line.startswith("VmRSS")).split()[1])

    t = torch.ones(64 << 20, dtype=torch.float32)  # 256 MB, touched
    start = rss()
    runtime.release_pages(t)
    assert start - rss() > 200 << 10  # KiB: at least 200 MB of it gone
    del t


def test_a_bf16_run_with_held_weights_ends_where_one_without_them_does(tiny_llama, small_data, tmp_path, monkeypatch):
    """The whole run: reference log-probs, held-out figures before and after, the trained adapter: bit for bit."""
    recipe = apply_overrides(tiny_recipe(tiny_llama, small_data), ["model.dtype=bfloat16"])
    runs = {}
    for name, flag in (("float32", "0"), ("held", "1")):
        monkeypatch.setenv("TWIN_DPO_FROZEN_BF16", flag)
        monkeypatch.setenv("TWIN_DPO_CACHE", str(tmp_path / f"cache-{name}"))  # each computes its own reference
        summary, folder = dpo.train(recipe, tmp_path / name, max_steps=2)
        runs[name] = (summary, folder)
    (plain, plain_dir), (held, held_dir) = runs["float32"], runs["held"]
    assert plain["frozen_weights"] is None and "held in bfloat16" in held["frozen_weights"]
    for key in ("eval_before", "eval_after", "final_train_loss"):
        assert held[key] == plain[key], key
    # the cache key hashes the float32 weights either way: one cache serves both, a bf16 collision cannot
    assert Path(plain["reference_cache"]).name == Path(held["reference_cache"]).name
    a, b = load_file(plain["reference_cache"]), load_file(held["reference_cache"])  # NaN: pairs not yet computed
    assert a.keys() == b.keys() and all(a[k].dtype == b[k].dtype for k in a)
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0, equal_nan=True, msg=k)
    a = load_file(plain_dir / "adapter" / "adapter_model.safetensors")
    b = load_file(held_dir / "adapter" / "adapter_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert not [p for p in held_dir.iterdir() if p.name.startswith(".twin-dpo-float32-")]
