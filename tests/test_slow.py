"""End to end on the embedded SmolLM2-135M-Instruct and the twin made from it (make test-slow; CI runs it too)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow


@pytest.fixture
def shared_cache(tmp_path_factory, monkeypatch):
    """One converted model for the whole module (the autouse fixture gives each test an empty cache)."""
    monkeypatch.setenv("TWIN_DPO_CACHE", str(tmp_path_factory.getbasetemp() / "shared-cache"))


@pytest.mark.usefixtures("shared_cache")
def test_embedded_model_converts_once_and_trains_on_the_twin(tmp_path):
    """The default dpo_lora as a fresh clone runs it: convert the model, build the twin (full SFT), DPO, export."""
    from pipeline.model import paths
    from pipeline.recipe import TWIN_MODEL
    from pipeline.training import twin

    first = paths.embedded_model_dir()
    assert (first / "config.json").is_file() and (first / "chat_template.jinja").is_file()
    assert paths.embedded_model_dir() == first  # reused, not converted again
    assert not list(first.parent.glob(".*tmp*")), "no half-written cache left behind"

    run_dir = tmp_path / "run"
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "pipeline",
            "train",
            "dpo_lora",
            "--max-steps",
            "3",
            "--run-dir",
            str(run_dir),
            "--set",
            "train.eval_every=0",
            "--set",
            "train.learning_rate=1e-4",
            "--set",
            "train.warmup_steps=0",
        ],
        capture_output=True,
        text=True,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert "building the twin once" in out.stdout and "twin ready" in out.stdout
    summary = json.loads((run_dir / "summary.json").read_text())
    folder = str(twin.model_dir(TWIN_MODEL))  # the cached twin: no second build
    info = twin.describe(folder)
    assert summary["model_path"] == folder and info["sft_steps"] == 100
    assert info["sft_held_out_loss"][1] < info["sft_held_out_loss"][0] - 0.5  # SFT learned the author's answers
    assert summary["held_out_precision"] == "float32"
    assert summary["steps"] == 3 and summary["trainable_parameters"] < summary["total_parameters"] / 10
    assert summary["eval_before"]["reward_margin"] == 0.0
    assert (
        summary["eval_after"]["reward_margin"] > 0.0 and summary["eval_after"]["loss"] < summary["eval_before"]["loss"]
    )
    assert (run_dir / "adapter" / "adapter_model.safetensors").is_file()

    # every format, through llama.cpp's own converters, each with its proof
    out = subprocess.run([sys.executable, "-m", "pipeline", "export", str(run_dir)], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    report = json.loads((run_dir / "export" / "export.json").read_text())
    assert report["not_written"] == {} and all(p["passed"] for p in report["proofs"].values())
    assert set(report["written"]) == {
        "adapter", "merged", "gguf-f16", "gguf-q8_0", "gguf-q4_k_m", "gguf-lora", "Modelfile", "Modelfile.lora"
    }  # fmt: skip


@pytest.mark.usefixtures("shared_cache")
def test_embedded_model_chats_with_its_template():
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from pipeline.model import paths

    folder = paths.embedded_model_dir()
    tok = AutoTokenizer.from_pretrained(folder)
    lm = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    prompt = tok.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}], tokenize=False, add_generation_prompt=True
    )
    ids = tok(prompt, return_tensors="pt")
    out = lm.generate(**ids, max_new_tokens=12, do_sample=False)
    assert "Paris" in tok.decode(out[0, ids["input_ids"].shape[1] :])
