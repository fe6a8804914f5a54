"""Every common family trains: LoRA DPO on a tiny random model of each, built from its transformers config class.

Per family: the adapter moved, the base did not, the cached reference log-probs equal a plain transformers
computation on the base (so the completion-only head, where it runs, computes what transformers computes), the
LoRA targets are resolved per family (Phi-3's fused projections, MoE experts) and printed, and a run whose head falls
back to TRL's says why.
"""

from __future__ import annotations

import contextlib
import io
import json

import pytest
import torch
from safetensors.torch import load_file

from conftest import FAMILIES, cli_sets, needs_llama_cpp, save_tiny, tiny_dpo_trainer, tiny_recipe
from pipeline import cli

EXPECTED_TARGETS = {  # what the run prints for the default targets (q, k, v, o, gate, up, down)
    "phi3": "qkv_proj, o_proj, gate_up_proj, down_proj",
    "qwen3_moe": "q_proj, k_proj, v_proj, o_proj",
}
ALL_LINEAR = "q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj"


def _cli(root, argv: list[str]) -> tuple[int, str]:
    """Run the CLI as a user would, in `root` with its own cache; (exit status, what it printed)."""
    out = io.StringIO()
    with pytest.MonkeyPatch.context() as mp, contextlib.redirect_stdout(out):
        mp.setenv("TWIN_DPO_CACHE", str(root / "cache"))
        mp.chdir(root)
        code = cli.main(argv)
    return code, out.getvalue()


def _train(recipe: str, folder, data, run_dir) -> list[str]:
    argv = ["train", recipe, "--max-steps", "2", "--no-answers", "--run-dir", str(run_dir), *cli_sets(folder, data)]
    return argv + ["--set", "model.dtype=float32", "--set", "train.learning_rate=1e-3", "--set", "train.warmup_steps=0"]


@pytest.fixture(scope="module", params=FAMILIES)
def family_run(request, tmp_path_factory, small_data):
    """Two LoRA DPO steps (lr 1e-3) on a tiny model of the family, through the CLI; what it printed."""
    family = request.param
    root = tmp_path_factory.mktemp(family)
    folder = save_tiny(root / "model", family)
    code, printed = _cli(root, _train("dpo_lora", folder, small_data, root / "run"))
    assert code == 0
    return family, folder, root / "run", printed


def _plain_log_probs(model, rows) -> torch.Tensor:
    """Summed log-probs of each completion after its prompt: transformers' own forward, nothing else."""
    out = []
    with torch.no_grad():
        for row in rows:
            prompt, completion = row["prompt_ids"], row["chosen_ids"]
            ids = torch.tensor([prompt + completion])
            logp = torch.log_softmax(model(ids).logits[0, :-1].float(), -1)
            picked = logp.gather(-1, ids[0, 1:, None])[:, 0]
            out.append(picked[len(prompt) - 1 :].sum())
    return torch.stack(out)


def test_lora_dpo_trains_every_family(family_run, small_data, tmp_path):
    from transformers import AutoModelForCausalLM

    family, folder, run_dir, printed = family_run
    summary = json.loads((run_dir / "summary.json").read_text())
    assert f"LoRA adapters on every {EXPECTED_TARGETS.get(family, ALL_LINEAR)} layer" in printed

    adapter = load_file(str(run_dir / "adapter" / "adapter_model.safetensors"))
    lora_b = [v for k, v in adapter.items() if "lora_B" in k]
    assert lora_b and all(t.abs().max() > 0 for t in lora_b), "LoRA B starts at zero; every one must have moved"

    base = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    saved = load_file(str(folder / "model.safetensors"))
    assert all(torch.equal(p.detach(), saved[n]) for n, p in base.named_parameters() if n in saved)

    # the reference log-probs the run cached (computed before training, adapter off) are the base's, as plain
    # transformers computes them; the completion-only head computed them where it applies
    trainer = tiny_dpo_trainer(tiny_recipe(folder, small_data), tmp_path)
    rows = trainer.train_dataset
    tensors = load_file(summary["reference_cache"])
    done = tensors["train.done"].bool()  # a 2-step run computes the batches holding its 4 pairs (rows 0-3)
    assert done[:4].all() and torch.equal(tensors["train.chosen"].isnan(), ~done)
    torch.testing.assert_close(tensors["train.chosen"][done], _plain_log_probs(base, rows)[done], atol=2e-4, rtol=1e-5)

    if family == "gemma2":  # final-logit soft-capping: TRL's head, and the run says why
        assert "LM head: TRL's, not the completion-only one, because the model scales or soft-caps" in printed
        assert summary["lm_head"].startswith("TRL's fused head (the model scales or soft-caps its logits")
    elif family == "qwen3_moe":  # the router loss comes from the model's own output
        assert "experts hold them as fused parameters" in printed and "mixture of experts" in summary["lm_head"]
        metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        assert any(m.get("aux_loss", 0) > 0 for m in metrics), "the router load-balancing loss is part of the loss"
    else:
        assert summary["lm_head"] == "completion-only (training/fast_head.py); padding-free pairs, prompt shared"


def _proven_export(run_dir, formats: str | None = None) -> dict:
    root = run_dir.parent
    code, printed = _cli(root, ["export", str(run_dir)] + (["--set", f"export.formats={formats}"] if formats else []))
    report = json.loads((run_dir / "export" / "export.json").read_text())
    assert code == 0 and report["not_written"] == {}, (printed, report["not_written"])
    assert all(p["passed"] for p in report["proofs"].values()), report["proofs"]
    return report


@needs_llama_cpp
def test_every_family_exports_every_format_with_its_proofs(family_run):
    family, _, run_dir, _ = family_run
    report = _proven_export(run_dir)
    assert report["written"] == [*report["formats"], "Modelfile", "Modelfile.lora"], family
    assert report["proofs"]["gguf base + LoRA vs merged f16 (teacher-forced)"]["top1_agreement"] >= 0.99


@pytest.mark.parametrize("family", FAMILIES)
def test_qlora_dpo_trains_and_exports_every_family(family, small_data, tmp_path):
    import importlib.util

    folder = save_tiny(tmp_path / "model", family)
    code, _ = _cli(tmp_path, _train("dpo_qlora", folder, small_data, tmp_path / "run"))
    assert code == 0
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["artifact"] == "adapter" and summary["load_in_4bit"] is True
    adapter = load_file(str(tmp_path / "run" / "adapter" / "adapter_model.safetensors"))
    assert all(v.abs().max() > 0 for k, v in adapter.items() if "lora_B" in k)
    if importlib.util.find_spec("llama_cpp") is not None:  # merged into the dequantized base, as trained
        _proven_export(tmp_path / "run", "adapter,merged,gguf-f16,gguf-lora")
