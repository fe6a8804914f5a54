"""Lean linears (training/lean_linear.py) compute autocast's numbers and keep fewer bytes for the backward pass."""

from __future__ import annotations

import torch

from conftest import move_lora_b, pairs_batch, tiny_dpo_trainer, tiny_recipe
from pipeline.training import fast_head, lean_linear


def _step(trainer, batch, params: set[int]):
    """(loss, gradients, bytes kept for backward outside the parameters) of one DPO step under bf16 autocast."""
    kept: dict[int, int] = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            kept[storage.data_ptr()] = storage.nbytes()
        return t

    trainer.model.zero_grad()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), torch.autocast("cpu", dtype=torch.bfloat16):
        loss = trainer.compute_loss(trainer.model, batch)
    loss.backward()
    trainer._metrics["train"].clear()
    grads = {n: p.grad.clone() for n, p in trainer.model.named_parameters() if p.requires_grad}
    return loss.detach(), grads, sum(kept.values())


def test_lean_linears_give_autocasts_loss_and_gradients_and_keep_less(tiny_llama, small_data, tmp_path):
    trainer = tiny_dpo_trainer(tiny_recipe(tiny_llama, small_data, precompute_ref=False), tmp_path)
    model = trainer.model
    move_lora_b(model)
    assert fast_head.install_on_trainer(trainer, True)
    batch = pairs_batch(trainer, range(4))
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    loss, grads, kept = _step(trainer, batch, params)

    replaced = lean_linear.install(model)
    frozen = [m for m in model.modules() if type(m) is torch.nn.Linear and not m.weight.requires_grad]
    lm_head = model.get_base_model().get_output_embeddings()
    frozen = [m for m in frozen if m is not lm_head]
    assert replaced == len(frozen) * 3  # each frozen projection with its LoRA A and B
    assert lean_linear.install(model) == replaced  # once only
    lean_loss, lean_grads, lean_kept = _step(trainer, batch, params)

    torch.testing.assert_close(lean_loss, loss, atol=0, rtol=1e-6)
    assert lean_grads.keys() == grads.keys() and grads
    for name, g in lean_grads.items():  # the same bf16 products: measured bit for bit here; bf16 rounding is 4e-3
        assert (g - grads[name]).norm() <= 1e-3 * grads[name].norm(), name
    # autocast keeps a bf16 copy of every frozen weight; lean linears keep none (and share the input casts)
    weight_copies = sum(m.weight.numel() * 2 for m in frozen)
    assert lean_kept <= kept - weight_copies, (kept, lean_kept, weight_copies)

    with torch.no_grad():  # outside autocast a lean linear is the plain one
        x = torch.randn(3, frozen[0].in_features)
        torch.testing.assert_close(frozen[0](x), torch.nn.functional.linear(x, frozen[0].weight, frozen[0].bias))
