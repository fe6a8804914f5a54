"""train.compile: inductor compiles the decoder block once for all layers and changes no number beyond rounding."""

from __future__ import annotations

import pytest
import torch

from conftest import move_lora_b, pairs_batch, tiny_dpo_trainer, tiny_recipe
from pipeline.errors import UserError
from pipeline.training import compiled, reference
from pipeline.training import fast_head as fast


def test_compile_without_a_cpp_compiler_is_refused_before_loading(tiny_llama, small_data, monkeypatch):
    recipe = tiny_recipe(tiny_llama, small_data, compile=True)
    monkeypatch.setenv("PATH", "/nonexistent")
    monkeypatch.delenv("CXX", raising=False)
    with pytest.raises(UserError, match=r"train.compile=true: .*no C\+\+ compiler.*train.compile=false"):
        compiled.check(recipe, "cpu")
    compiled.check(tiny_recipe(tiny_llama, small_data), "cpu")  # off: nothing to check
    compiled.check(recipe, "cuda")  # on a GPU inductor writes Triton kernels, not C++


@pytest.mark.slow  # inductor compiles the tiny block's forward and backward: about a minute on 2 cores
def test_compiled_blocks_give_the_eager_loss_gradients_and_reference(tiny_llama, small_data, tmp_path):
    trainer = tiny_dpo_trainer(tiny_recipe(tiny_llama, small_data, precompute_ref=False), tmp_path)
    model = trainer.model
    move_lora_b(model)
    assert fast.install_on_trainer(trainer, True)  # padding-free, prompt shared: the default layout
    ds = trainer.train_dataset
    batches = [pairs_batch(trainer, idx) for idx in ([0, 1], [2, 3], [4, 5])]  # three packed lengths: compiled once
    key = reference.cache_key(trainer, [ds], 512)
    results = []
    for compile_now in (False, True):
        if compile_now:
            assert "LlamaDecoderLayer" in compiled.install(model)
        out = []
        for batch in batches:
            model.zero_grad()
            loss = trainer.compute_loss(model, batch)
            loss.backward()
            grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
            with torch.no_grad():
                ref = trainer.compute_ref_log_probs(model, batch)
            out.append((loss.detach(), grads, ref))
        results.append(out)
    layers = compiled.decoder_layers(model.get_base_model())
    assert layers and all(layer._compiled_call_impl is not None for layer in layers)
    for (loss_e, grads_e, ref_e), (loss_c, grads_c, ref_c) in zip(*results, strict=True):
        # inductor fuses and reorders float32 sums: rounding-level differences only
        torch.testing.assert_close(loss_c, loss_e, atol=1e-5, rtol=1e-5)
        assert grads_c.keys() == grads_e.keys() and len(grads_c) > 0
        for name in grads_e:
            torch.testing.assert_close(grads_c[name], grads_e[name], atol=1e-5, rtol=1e-4, msg=name)
        for c, e in zip(ref_c, ref_e, strict=True):
            torch.testing.assert_close(c, e, atol=1e-4, rtol=1e-5)
    assert reference.cache_key(trainer, [ds], 512) != key  # compiled numbers get their own cache entry
