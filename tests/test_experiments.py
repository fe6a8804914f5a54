"""evaluate, compare and sweep on the tiny model: every field, the picture, the table, the shared reference."""

from __future__ import annotations

import json

import torch

from conftest import adapter_logits, cli_sets, spy_answer_models, tiny_recipe
from pipeline import cli
from pipeline.evaluation import evaluate, style
from pipeline.training import dpo as train


def test_evaluate_writes_every_field(tiny_llama, small_data, tmp_path, monkeypatch):
    _, run_dir = train.train(tiny_recipe(tiny_llama, small_data), tmp_path / "run", max_steps=2)
    seen = spy_answer_models(monkeypatch)
    report = evaluate.evaluate(run_dir)
    # the untouched twin answers with the adapter off; the trained twin on the adapter merged into the weights
    assert seen["untouched twin"]["lora"] and not seen["trained twin"]["lora"]
    torch.testing.assert_close(seen["untouched twin"]["logits"], adapter_logits(tiny_llama, None))
    torch.testing.assert_close(seen["trained twin"]["logits"], adapter_logits(tiny_llama, run_dir / "adapter"))
    assert report["trained_answers_seconds"] <= report["seconds"]
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
    # the voice judgement: each metric's distance to the author's yardstick, before and after, and a verdict
    voice = saved["voice"]
    assert set(voice["metrics"]) == set(style.VOICE) and voice["verdict"] in (
        "toward the author",
        "away from the author",
        "not at all",
    )
    assert "distance before -> after" in samples and style.verdict_line(voice) in samples
    printed = evaluate.describe(report)
    assert style.verdict_line(voice) in printed and "(author " in printed
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
    verdicts = ("toward the author", "away from the author", "not at all")
    assert table[0].split("|")[11].strip() == "voice moved"
    assert all(line.split("|")[11].strip().startswith(verdicts) for line in table[1:5])  # the run's own judgement
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
    rows = [line.split("|") for line in report.splitlines() if line.startswith(("| 1 |", "| 2 |"))]
    assert "voice moved" in report and all(r[5].strip().startswith(("toward", "away", "not at all")) for r in rows)


def test_sweep_rejects_a_bad_grid_before_training(capsys, tmp_path):
    assert cli.main(["sweep", "dpo_lora", "--grid", "train.bta=0.1,0.5", "--out", str(tmp_path / "s")]) == 2
    assert "--grid train.bta: unknown recipe key; did you mean train.beta?" in capsys.readouterr().err
    assert cli.main(["sweep", "dpo_lora", "--grid", "train.beta=0.1,-1", "--out", str(tmp_path / "s")]) == 2
    assert "train.beta: must be > 0, got -1.0" in capsys.readouterr().err
    assert not (tmp_path / "s").exists()


STYLE = dict(words_per_answer=100.0, words_per_sentence=20.0, stock_phrase_share=0.5, first_person_per_100_words=0.0)
AUTHOR = dict(words_per_answer=40.0, words_per_sentence=12.0, stock_phrase_share=0.0, first_person_per_100_words=3.0)
GENERIC = dict(words_per_answer=120.0, words_per_sentence=24.0, stock_phrase_share=1.0, first_person_per_100_words=0.0)


def _judge(after: dict, repetition=(0.10, 0.10)):
    before = dict(STYLE, repetition_rate=repetition[0])
    return style.judge(before, dict(after, repetition_rate=repetition[1]), AUTHOR, GENERIC)


def test_voice_judgement_says_toward_away_or_not_at_all():
    toward = _judge(dict(words_per_answer=50.0, words_per_sentence=13.0, stock_phrase_share=0.0,
                         first_person_per_100_words=2.5))  # fmt: skip
    assert toward["verdict"] == "toward the author" and toward["metrics_closer"] == 4
    # distances in author-generic gaps: words/answer 60/80 -> 10/80
    assert toward["metrics"]["words_per_answer"]["distance_before"] == 0.75
    assert toward["metrics"]["words_per_answer"]["distance_after"] == 0.125
    away = _judge(dict(words_per_answer=150.0, words_per_sentence=26.0, stock_phrase_share=1.0,
                       first_person_per_100_words=0.0))  # fmt: skip
    assert away["verdict"] == "away from the author" and away["metrics_closer"] == 0
    still = _judge(dict(STYLE, words_per_answer=101.0))
    assert still["verdict"] == "not at all" and "moved not at all" in style.verdict_line(still)


def test_repetition_rising_more_than_005_is_flagged():
    flagged = _judge(STYLE, repetition=(0.16, 0.27))
    assert flagged["repetition_flagged"] and "REPETITION UP" in style.verdict_line(flagged)
    assert not _judge(STYLE, repetition=(0.16, 0.20))["repetition_flagged"]
