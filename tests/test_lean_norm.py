"""Lean RMSNorms (training/lean_norm.py): the module's forward bit for bit, RMSNorm's gradient, fewer bytes kept."""

from __future__ import annotations

import torch

from conftest import autocast_step, lean_trainer
from pipeline.training import lean_norm


class _OnePlusNorm(torch.nn.Module):  # Gemma's RMSNorm: the weight is an offset from 1
    def __init__(self, width: int):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.randn(width))
        self.eps = 1e-6

    def forward(self, x):
        h = x.float()
        return ((1 + self.weight) * h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype)


def test_the_closed_form_backward_is_autograds_gradient():
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(3, 5, 16, generator=gen, dtype=torch.float32, requires_grad=True)
    weight = torch.randn(16, generator=gen, dtype=torch.float32, requires_grad=True)
    grad = torch.randn(3, 5, 16, generator=gen, dtype=torch.float32)
    out = lean_norm._RMSNorm.apply(x, weight, 1e-6, torch.float32)  # kept float32: the formula alone
    got = torch.autograd.grad(out, (x, weight), grad)
    expected_out = weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6))
    expected = torch.autograd.grad(expected_out, (x, weight), grad)
    torch.testing.assert_close(out, expected_out, rtol=0, atol=0)
    for g, e in zip(got, expected, strict=True):
        torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-6)


def test_lean_norms_give_the_same_loss_rmsnorms_gradient_and_keep_less(tiny_llama, small_data, tmp_path):
    trainer, batch = lean_trainer(tiny_llama, small_data, tmp_path)
    model = trainer.model
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    loss, grads, kept = autocast_step(trainer, batch, params)
    config = model.get_base_model().config
    rng = torch.get_rng_state()

    assert lean_norm.install(model) == 2 * config.num_hidden_layers  # input and post-attention norms
    assert torch.equal(torch.get_rng_state(), rng)  # the probe drew from its own generator
    assert lean_norm.install(model) == 2 * config.num_hidden_layers  # once only
    lean_loss, lean_grads, lean_kept = autocast_step(trainer, batch, params)

    assert torch.equal(lean_loss, loss)  # the forward, bit for bit
    assert lean_grads.keys() == grads.keys() and grads
    for name, g in lean_grads.items():  # the input's bf16 rounding, and no more, reaches the gradient
        assert (g - grads[name]).norm() <= 0.02 * grads[name].norm(), name
    seen = []  # the positions a norm reads: the packed rows'
    first = model.get_base_model().model.layers[0].input_layernorm
    hook = first.register_forward_pre_hook(lambda _module, args: seen.append(args[0].numel()))
    autocast_step(trainer, batch, params)
    hook.remove()
    # each norm keeps its input in bf16 instead of float32: 2 bytes less per element, and nothing else changes;
    # the first reads the (frozen) embeddings, which need no gradient, so it keeps nothing either way
    assert kept - lean_kept == (2 * config.num_hidden_layers - 1) * 2 * seen[0], (kept, lean_kept, seen)

    with torch.no_grad():  # outside autocast (evaluation, float32 runs) a norm runs its own forward
        norm = model.get_base_model().model.layers[0].input_layernorm
        x = torch.randn(2, 3, config.hidden_size)
        torch.testing.assert_close(norm(x), norm._twin_dpo_norm_forward(x), rtol=0, atol=0)


def test_a_norm_that_computes_something_else_keeps_its_own_forward(monkeypatch, tiny_llama, small_data, tmp_path):
    other = _OnePlusNorm(8)
    own = other.forward
    assert not lean_norm._switch(other) and other.forward == own

    trainer, _ = lean_trainer(tiny_llama, small_data, tmp_path)
    monkeypatch.setenv("TWIN_DPO_NORM_BF16", "0")  # the lever off: nothing switched
    assert lean_norm.install(trainer.model) == 0
    assert not any(hasattr(m, "_twin_dpo_norm_forward") for m in trainer.model.modules())
