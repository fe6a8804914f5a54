"""LoRA targets resolved per family: fused projections (Phi-3) get adapters too, and a named target that
matches no layer is an error naming it."""

from __future__ import annotations

import json

import pytest
from safetensors.torch import load_file

from conftest import build_tokenizer, cli_sets


@pytest.fixture(scope="module")
def tiny_phi3(tmp_path_factory):
    import torch
    from transformers import Phi3Config, Phi3ForCausalLM

    folder = tmp_path_factory.mktemp("tiny-phi3")
    tokenizer = build_tokenizer()
    torch.manual_seed(0)
    config = Phi3Config(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=512,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    Phi3ForCausalLM(config).save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    return folder


def test_fused_projections_get_adapters(tiny_phi3, small_data, tmp_path, capsys):
    from pipeline import cli

    run_dir = tmp_path / "run"
    argv = [
        "train",
        "dpo_lora",
        "--max-steps",
        "1",
        "--no-eval",
        "--run-dir",
        str(run_dir),
        *cli_sets(tiny_phi3, small_data),
        "--set",
        "model.dtype=float32",
    ]
    assert cli.main(argv) == 0
    assert "LoRA adapters on every qkv_proj, o_proj, gate_up_proj, down_proj layer" in capsys.readouterr().out
    adapter = load_file(str(run_dir / "adapter" / "adapter_model.safetensors"))
    for layer in ("qkv_proj", "o_proj", "gate_up_proj", "down_proj"):
        assert any(f".{layer}.lora_A" in k for k in adapter), layer
    summary = json.loads((run_dir / "summary.json").read_text())
    # r 32 on 4 layers x 2 blocks: (64 + 192) + (64 + 64) + (64 + 256) + (128 + 64) in + out features, x 32 x 2
    assert summary["trainable_parameters"] == 32 * 2 * ((64 + 192) + (64 + 64) + (64 + 256) + (128 + 64))


def test_a_target_that_matches_nothing_is_named(tiny_phi3, small_data, capsys):
    from pipeline import cli

    argv = [
        "train",
        "dpo_lora",
        "--max-steps",
        "1",
        *cli_sets(tiny_phi3, small_data),
        "--set",
        "lora.target_modules=q_proj,c_attn",
    ]
    assert cli.main(argv) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert "lora.target_modules: c_attn match no layer of this model" in line and "qkv_proj" in line
