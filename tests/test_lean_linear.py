"""Lean linears (training/lean_linear.py) compute autocast's numbers and keep fewer bytes for the backward pass."""

from __future__ import annotations

import torch

from conftest import autocast_step, lean_trainer, move_lora_b, pairs_batch, tiny_dpo_trainer, tiny_recipe
from pipeline.training import fast_head, lean_linear


def test_lean_linears_give_autocasts_loss_and_gradients_and_keep_less(tiny_llama, small_data, tmp_path):
    trainer = tiny_dpo_trainer(tiny_recipe(tiny_llama, small_data, precompute_ref=False), tmp_path)
    model = trainer.model
    move_lora_b(model)
    assert fast_head.install_on_trainer(trainer, True)
    batch = pairs_batch(trainer, range(4))
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    loss, grads, kept = autocast_step(trainer, batch, params)

    replaced = lean_linear.install(model)
    frozen = [m for m in model.modules() if type(m) is torch.nn.Linear and not m.weight.requires_grad]
    lm_head = model.get_base_model().get_output_embeddings()
    frozen = [m for m in frozen if m is not lm_head]
    assert replaced == len(frozen) * 3  # each frozen projection with its LoRA A and B
    assert lean_linear.install(model) == replaced  # once only
    lean_loss, lean_grads, lean_kept = autocast_step(trainer, batch, params)

    assert torch.equal(lean_loss, loss)  # the same bf16 products: bit for bit
    assert lean_grads.keys() == grads.keys() and grads
    for name, g in lean_grads.items():
        assert torch.equal(g, grads[name]), name
    # autocast keeps a bf16 copy of every frozen weight; lean linears keep none (and share the input casts)
    weight_copies = sum(m.weight.numel() * 2 for m in frozen)
    assert lean_kept <= kept - weight_copies, (kept, lean_kept, weight_copies)

    # PEFT's upcast of a bf16 input for LoRA A (o and down projections) would have the adapter keep a bf16 cast of
    # it; switched off, LoRA A keeps the very tensor (a frozen base layer keeps no input: its weight needs no
    # gradient). The o projection's input is the attention's output, which the attention keeps anyway: one
    # hidden-sized copy per token and layer less
    lora_layers = [m for m in model.modules() if hasattr(m, "lora_A") and hasattr(m, "base_layer")]
    assert all(m.cast_input_dtype_enabled is False for m in lora_layers)
    for m in lora_layers:
        m.cast_input_dtype_enabled = True
    upcast_loss, _, upcast_kept = autocast_step(trainer, batch, params)
    assert torch.equal(upcast_loss, loss)
    config = model.get_base_model().config
    tokens = int(batch["attention_mask"].sum())  # packed: a little fewer (the prompt once)
    copies = config.num_hidden_layers * config.hidden_size * 2 * tokens  # o inputs, bf16
    assert upcast_kept - lean_kept >= copies * 3 // 4, (upcast_kept, lean_kept, copies)
    for m in lora_layers:
        m.cast_input_dtype_enabled = False

    with torch.no_grad():  # outside autocast a lean linear is the plain one
        x = torch.randn(3, frozen[0].in_features)
        torch.testing.assert_close(frozen[0](x), torch.nn.functional.linear(x, frozen[0].weight, frozen[0].bias))


def test_lean_mlps_give_the_same_loss_and_gradients_and_keep_two_tensors_less(tiny_llama, small_data, tmp_path):
    trainer, batch = lean_trainer(tiny_llama, small_data, tmp_path)
    model = trainer.model
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    loss, grads, kept = autocast_step(trainer, batch, params)
    rng = torch.get_rng_state()

    mlps = [m for m in model.modules() if type(m).__name__ == "LlamaMLP"]
    assert lean_linear.install_mlps(model) == len(mlps) > 0
    assert torch.equal(torch.get_rng_state(), rng)  # the probe drew from its own generator
    assert lean_linear.install_mlps(model) == len(mlps)  # once only
    lean_loss, lean_grads, lean_kept = autocast_step(trainer, batch, params)

    assert torch.equal(lean_loss, loss)
    assert lean_grads.keys() == grads.keys()
    for name, g in lean_grads.items():  # the backward calls the kernels autograd calls: bit for bit
        assert torch.equal(g, grads[name]), name
    tokens = int(batch["attention_mask"].sum())  # packed rows hold at most these many positions
    per_mlp = mlps[0].up_proj.out_features * 2  # one bf16 intermediate-sized tensor per token
    # two of them less: silu's output and the product (the down projection's input), both recomputed; the packed
    # rows hold the prompt once, a little fewer positions than TRL's rows count
    assert kept - lean_kept >= 2 * len(mlps) * per_mlp * tokens * 3 // 4, (kept, lean_kept)

    # with PEFT's upcast before LoRA A the down projection's adapter reads a float32 copy, not the tagged
    # product, and keeps its own bf16 cast of it: why install switches that upcast off
    lora_downs = [m.down_proj for m in mlps]
    for m in lora_downs:
        m.cast_input_dtype_enabled = True
    upcast_loss, upcast_grads, upcast_kept = autocast_step(trainer, batch, params)
    for m in lora_downs:
        m.cast_input_dtype_enabled = False
    assert torch.equal(upcast_loss, loss)
    assert upcast_kept - lean_kept >= len(mlps) * per_mlp * tokens * 3 // 4, (upcast_kept, lean_kept)


def test_an_mlp_that_computes_something_else_keeps_its_own_forward(tiny_llama, small_data, tmp_path):
    trainer = tiny_dpo_trainer(tiny_recipe(tiny_llama, small_data, precompute_ref=False), tmp_path)
    model = trainer.model
    mlps = [m for m in model.modules() if type(m).__name__ == "LlamaMLP"]
    own = mlps[0].forward
    mlps[0].forward = lambda x: mlps[0].down_proj(torch.nn.functional.silu(mlps[0].gate_proj(x)) + mlps[0].up_proj(x))
    replaced = mlps[0].forward
    assert lean_linear.install_mlps(model) == len(mlps) - 1
    assert mlps[0].forward is replaced and not hasattr(mlps[0], "_twin_dpo_mlp_forward")
    assert all(hasattr(m, "_twin_dpo_mlp_forward") and m.forward is not own for m in mlps[1:])
