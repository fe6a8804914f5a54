"""evaluate, compare and sweep on the tiny model: every field, the picture, the table, the shared reference."""

from __future__ import annotations

import json

from conftest import cli_sets, tiny_recipe
from pipeline import cli
from pipeline.evaluation import evaluate
from pipeline.training import dpo as train


def test_evaluate_writes_every_field(tiny_llama, small_data, tmp_path):
    _, run_dir = train.train(tiny_recipe(tiny_llama, small_data), tmp_path / "run", max_steps=2)
    report = evaluate.evaluate(run_dir)
    saved = json.loads((run_dir / "eval.json").read_text())
    assert saved == json.loads(json.dumps(report))
    assert set(saved["held_out"]["before"]) == {"reward_accuracy", "reward_margin", "loss"}
    assert saved["held_out"]["pairs"] == 8
    for side in ("before", "after", "author_reference", "generic_reference"):
        assert set(saved["style"][side]) == {
            "words_per_answer",
            "words_per_sentence",
            "stock_phrase_share",
            "first_person_per_100_words",
            "repetition_rate",
        }
    assert len(saved["generations"]) >= 8
    assert saved["generations"][0]["question"] == "Write a paragraph to introduce supervised fine-tuning."
    assert all(g["after"] and g["before"] for g in saved["generations"])
    # the yardsticks tell the two voices apart
    assert saved["style"]["author_reference"]["stock_phrase_share"] == 0.0
    assert saved["style"]["generic_reference"]["stock_phrase_share"] == 1.0
    samples = (run_dir / "samples.md").read_text()
    assert "**Untouched twin:**" in samples and "**Trained:**" in samples
    # the untouched twin's answers are cached: a second evaluation reuses them
    cached = list((tmp_path / "cache" / "generations").glob("*.json"))
    assert len(cached) == 1
    evaluate.evaluate(run_dir)
    assert list((tmp_path / "cache" / "generations").glob("*.json")) == cached


def test_compare_quick_version_writes_curves_and_four_rows(tiny_llama, small_data, tmp_path):
    out = tmp_path / "compare"
    code = cli.main(["compare", "--steps", "2", "--out", str(out), *cli_sets(tiny_llama, small_data)])
    assert code == 0
    png = (out / "curves.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 20_000
    table = [line for line in (out / "report.md").read_text().splitlines() if line.startswith("| ")]
    names = [line.split("|")[1].strip() for line in table]
    assert names[:5] == ["run", "dpo-lora", "dpo-qlora", "dpo-full", "trl-baseline"]
    assert [line.split("|")[2].strip() for line in table[1:5]][2:] == ["every step", "every step"]
    assert "(1.00x)" in table[4] and "x)" in table[1]
    for name in ("dpo-lora", "dpo-qlora", "dpo-full", "trl-baseline"):
        summary = json.loads((out / "runs" / name / "summary.json").read_text())
        assert summary["steps"] == 2 and summary["pairs_trained"] == 4
        assert (out / "runs" / name / "eval.json").is_file()
    assert "### Write a paragraph to introduce supervised fine-tuning." in (out / "report.md").read_text()


def test_sweep_reuses_the_reference_after_the_first_run(tiny_llama, small_data, tmp_path):
    out = tmp_path / "sweep"
    code = cli.main(
        [
            "sweep",
            "dpo_lora",
            "--grid",
            "train.beta=0.1,0.5",
            "--steps",
            "2",
            "--out",
            str(out),
            *cli_sets(tiny_llama, small_data),
        ]
    )
    assert code == 0
    first = json.loads((out / "runs" / "beta0.1" / "summary.json").read_text())
    second = json.loads((out / "runs" / "beta0.5" / "summary.json").read_text())
    assert first["reference_forward_passes"] == 2 and not first["reference_reused"]
    assert second["reference_forward_passes"] == 0 and second["reference_reused"]
    assert second["reference_cache"] == first["reference_cache"]
    report = (out / "report.md").read_text()
    assert "| 1 |" in report and "| 2 |" in report and "read from cache" in report and "once, " in report


def test_sweep_rejects_a_bad_grid_before_training(capsys, tmp_path):
    assert cli.main(["sweep", "dpo_lora", "--grid", "train.bta=0.1,0.5", "--out", str(tmp_path / "s")]) == 2
    assert "--grid train.bta: unknown recipe key; did you mean train.beta?" in capsys.readouterr().err
    assert cli.main(["sweep", "dpo_lora", "--grid", "train.beta=0.1,-1", "--out", str(tmp_path / "s")]) == 2
    assert "train.beta: must be > 0, got -1.0" in capsys.readouterr().err
    assert not (tmp_path / "s").exists()
