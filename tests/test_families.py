"""Families other than Llama / Qwen2: LoRA targets resolved per family (Phi-3's fused projections get adapters),
a named target that matches no layer is an error naming it, and a GGUF export the converter cannot write stops
before merging while adapter / merged export works."""

from __future__ import annotations

import json

import pytest
from safetensors.torch import load_file

from conftest import cli_sets, save_tiny, train_argv


@pytest.fixture(scope="module")
def tiny_phi3(tmp_path_factory):
    return save_tiny(tmp_path_factory.mktemp("tiny-phi3"), "phi3")


@pytest.fixture(scope="module")
def phi3_run(tiny_phi3, small_data, tmp_path_factory):
    """One DPO step on the tiny Phi-3 model, and what the run printed."""
    import contextlib
    import io

    from pipeline import cli

    run_dir = tmp_path_factory.mktemp("phi3") / "run"
    argv = train_argv(tiny_phi3, small_data, run_dir)
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
    # r 32 on 4 layers x 2 blocks, in + out features: qkv 64 + (64 + 2 x 32 for 2 KV heads), o 64 + 64,
    # gate_up 64 + 2 x 128, down 128 + 64
    assert summary["trainable_parameters"] == 32 * 2 * ((64 + 128) + (64 + 64) + (64 + 256) + (128 + 64))


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
