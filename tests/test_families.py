"""Families other than Llama / Qwen2: LoRA targets resolved per family (Phi-3's fused projections get adapters),
a named target that matches no layer is an error naming it, and a GGUF export the converter cannot write stops
before merging while adapter / merged export works."""

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


@pytest.fixture(scope="module")
def phi3_run(tiny_phi3, small_data, tmp_path_factory):
    """One DPO step on the tiny Phi-3 model, and what the run printed."""
    import contextlib
    import io

    from pipeline import cli

    run_dir = tmp_path_factory.mktemp("phi3") / "run"
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
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert cli.main(argv) == 0
    return run_dir, out.getvalue()


def test_fused_projections_get_adapters(phi3_run):
    run_dir, printed = phi3_run
    assert "LoRA adapters on every qkv_proj, o_proj, gate_up_proj, down_proj layer" in printed
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


def test_gguf_export_of_an_unknown_architecture_stops_before_merging(phi3_run, capsys):
    from pipeline import cli

    run_dir, _ = phi3_run
    assert cli.main(["export", str(run_dir)]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert "architecture 'phi3' is not supported; twin-dpo converts llama, qwen2" in line
    assert "--set export.formats=adapter,merged" in line
    assert not (run_dir / "export").exists() and not list(run_dir.glob(".export*"))
    # adapter and merged weights export (with their proofs) for the same run
    assert cli.main(["export", str(run_dir), "--set", "export.formats=adapter,merged"]) == 0
    assert (run_dir / "export" / "merged" / "model.safetensors").is_file()
