"""The twin as an adapter: SFT makes it; DPO trains a copy against a frozen copy on one shared base."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch
from safetensors.torch import load_file

from conftest import adapter_logits, cli_sets, save_tiny, spy_answer_models, tiny_recipe
from pipeline import cli
from pipeline.evaluation import evaluate
from pipeline.training import dpo as train
from pipeline.training import sft


@pytest.fixture(scope="module")
def sft_run(tiny_llama, small_data, tmp_path_factory):
    from recipes.sft_twin import recipe

    recipe = replace(
        recipe,
        model=replace(recipe.model, name_or_path=str(tiny_llama), dtype="float32"),
        data=replace(recipe.data, train=str(small_data["train"]), eval=str(small_data["heldout"])),
        train=replace(recipe.train, learning_rate=3e-3, warmup_steps=0, eval_every=0.0),
    )
    summary, run_dir = sft.sft(recipe, tmp_path_factory.mktemp("sft") / "run", max_steps=4)
    return summary, run_dir


def test_sft_makes_an_adapter_that_lowers_held_out_loss(sft_run):
    summary, run_dir = sft_run
    assert summary["method"] == "sft" and summary["steps"] == 4
    assert summary["eval_after"]["loss"] < summary["eval_before"]["loss"]
    assert summary["eval_after"]["perplexity"] == pytest.approx(2.718281828 ** summary["eval_after"]["loss"], rel=1e-6)
    assert summary["train_examples"] == 16 and summary["eval_examples"] == 8
    adapter = load_file(str(run_dir / "adapter" / "adapter_model.safetensors"))
    assert all(t.abs().max() > 0 for k, t in adapter.items() if "lora_B" in k)


def _sum_logps(model_dir, adapter_dir, rows):
    """Summed log-probs of chosen and rejected answers under base + adapter, computed from scratch."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32), adapter_dir
    ).eval()
    out = []
    with torch.no_grad():
        for row in rows:
            prompt = tok(row["prompt"])["input_ids"]
            for side in ("chosen", "rejected"):
                answer = row[side] if row[side].endswith(tok.eos_token) else row[side] + tok.eos_token  # TRL added it
                full = tok(row["prompt"] + answer)["input_ids"]
                logp = torch.log_softmax(model(torch.tensor([full])).logits[0, :-1].float(), -1)
                out.append(logp.gather(-1, torch.tensor(full[1:])[:, None])[len(prompt) - 1 :, 0].sum())
    return torch.stack(out)


def test_dpo_on_the_twin_adapter_keeps_its_reference_copy(tiny_llama, small_data, sft_run, tmp_path):
    _, sft_dir = sft_run
    sft_weights = load_file(str(sft_dir / "adapter" / "adapter_model.safetensors"))
    base_before = load_file(str(tiny_llama / "model.safetensors"))
    recipe = tiny_recipe(tiny_llama, small_data)
    recipe = replace(recipe, name="dpo-lora-twin", model=replace(recipe.model, adapter=str(sft_dir)))
    seen = {}

    def look(trainer):
        model = trainer.model
        seen["adapters"] = sorted(model.peft_config)
        seen["ref"] = {n.replace(".ref.", "."): p.detach().clone() for n, p in model.named_parameters() if ".ref." in n}
        seen["ref_trainable"] = any(p.requires_grad for n, p in model.named_parameters() if ".ref." in n)
        seen["reference_logps"] = (trainer.eval_dataset["ref_chosen_logps"], trainer.eval_dataset["ref_rejected_logps"])
        seen["eval_rows"] = [{k: r[k] for k in ("prompt", "chosen", "rejected")} for r in trainer.eval_dataset]

    summary, run_dir = train.train(recipe, tmp_path / "run", max_steps=3, inspect=look)
    assert seen["adapters"] == ["default", "ref"] and not seen["ref_trainable"]
    # the reference copy is bitwise the SFT adapter, after training
    flat_sft = {k.replace("base_model.model.", ""): v for k, v in sft_weights.items()}
    for name, tensor in seen["ref"].items():
        key = name.replace("base_model.model.", "")
        assert torch.equal(tensor, flat_sft[key]), name
    # the policy moved away from it, the base did not move
    policy = load_file(str(run_dir / "adapter" / "adapter_model.safetensors"))
    assert policy.keys() == sft_weights.keys()
    assert any(not torch.equal(policy[k], sft_weights[k]) for k in policy)
    assert all(torch.equal(v, load_file(str(tiny_llama / "model.safetensors"))[k]) for k, v in base_before.items())
    # the reference log-probs are those of base + SFT adapter
    fresh = _sum_logps(tiny_llama, sft_dir / "adapter", seen["eval_rows"])
    cached = torch.tensor([v for pair in zip(*seen["reference_logps"], strict=True) for v in pair])
    torch.testing.assert_close(cached, fresh, atol=2e-3, rtol=1e-4)
    assert "frozen copy of the twin adapter" in summary["reference"]
    assert summary["twin_adapter"] == str((sft_dir / "adapter").resolve())
    assert summary["eval_before"]["reward_margin"] == 0.0
    recipe_json = json.loads((run_dir / "recipe.json").read_text())
    assert recipe_json["model"]["adapter"] == str((sft_dir / "adapter").resolve())


def test_twin_export_merges_base_and_policy_only(tiny_llama, small_data, sft_run, tmp_path, monkeypatch):
    _, sft_dir = sft_run
    recipe = tiny_recipe(tiny_llama, small_data)
    recipe = replace(recipe, name="dpo-lora-twin", model=replace(recipe.model, adapter=str(sft_dir)))
    _, run_dir = train.train(recipe, tmp_path / "run", max_steps=2)
    # the answers: the untouched twin is base + the SFT adapter; the trained one base + the policy adapter, merged
    seen = spy_answer_models(monkeypatch)
    evaluate.evaluate(run_dir)
    assert seen["untouched twin"]["lora"] and not seen["trained twin"]["lora"]
    torch.testing.assert_close(seen["untouched twin"]["logits"], adapter_logits(tiny_llama, sft_dir / "adapter"))
    torch.testing.assert_close(seen["trained twin"]["logits"], adapter_logits(tiny_llama, run_dir / "adapter"))
    assert cli.main(["export", str(run_dir), "--set", "export.formats=adapter,merged"]) == 0
    report = json.loads((run_dir / "export" / "export.json").read_text())
    merge = report["proofs"]["merge (fp32) vs adapter model"]
    assert merge["passed"] and merge["max_abs_logit_diff"] < 1e-3
    assert not (run_dir / "export" / "adapter" / "ref").exists()


def test_missing_or_foreign_twin_adapter_is_one_line(tiny_llama, small_data, tmp_path, capsys, sft_run):
    base = [
        "train",
        "dpo_lora",
        "--max-steps",
        "1",
        "--set",
        f"model.name_or_path={tiny_llama}",
        "--set",
        f"data.train={small_data['train']}",
    ]
    assert cli.main(base + ["--set", f"model.adapter={tmp_path / 'nope'}"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "model.adapter:" in err[0] and "nope is not a LoRA adapter" in err[0]

    other = save_tiny(tmp_path / "other", "llama")
    cfg = json.loads((other / "config.json").read_text())
    cfg.update(hidden_size=32, intermediate_size=64)
    (other / "config.json").write_text(json.dumps(cfg))
    _, sft_dir = sft_run
    assert (
        cli.main(
            [
                "train",
                "dpo_lora",
                "--max-steps",
                "1",
                "--set",
                f"model.name_or_path={other}",
                "--set",
                f"data.train={small_data['train']}",
                "--set",
                f"model.adapter={sft_dir}",
            ]
        )
        == 2
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1
    assert f"adapter {sft_dir / 'adapter'} was made for another base" in err[0] and str(other) in err[0]
    assert "hidden size 64" in err[0] and "hidden size 32" in err[0]


def test_make_twin_quick_version_writes_the_summary_page(tiny_llama, small_data, tmp_path):
    out = tmp_path / "twin"
    code = cli.main(
        ["twin", "--steps", "2", "--out", str(out), "--formats", "adapter,merged", *cli_sets(tiny_llama, small_data)]
    )
    assert code == 0
    page = (out / "summary.md").read_text()
    for part in (
        "## 1. SFT makes the twin",
        "## 2. DPO on the twin adapter",
        "frozen copy of the twin adapter",
        "## 3. Memory",
        "| frozen copy of the adapter on the shared base |",
        "## 4. Files",
    ):
        assert part in page, part
    assert (out / "runs" / "dpo-lora-twin" / "export" / "merged" / "model.safetensors").is_file()
    shared = json.loads((out / "runs" / "memory-adapter-copy" / "summary.json").read_text())
    merged = json.loads((out / "runs" / "memory-merged-copy" / "summary.json").read_text())
    assert "separate full copy" in merged["reference"] and "shared base" in shared["reference"]
