"""The bench's honest utilisation and its target lines, on made-up run summaries (no model runs here)."""

from __future__ import annotations

import pytest

from pipeline.experiments import bench_report

SHAPE = {"body": 100, "head": 1000, "params": 1100}


def _summary(pairs_per_second, train, reference, *, method="lora", trainable=10, seconds=10.0, memory=1.0, acc=0.8):
    return {
        "method": method,
        "trainable_parameters": trainable,
        "train_seconds": seconds,
        "pairs_per_second": pairs_per_second,
        "pairs_trained": pairs_per_second * seconds,
        "tokens_per_second": 1.0,
        "peak_memory_bytes": memory,
        "final_train_loss": 0.5,
        "eval_after": {"reward_accuracy": acc},
        "reference_reused": True,
        "reference_seconds": 0.0,
        "steps": 1,
        "device": "cpu",
        "work": {
            "train": {"body_tokens": train[0], "head_rows": train[1], "forwards": 1},
            "reference": {"body_tokens": reference[0], "head_rows": reference[1], "forwards": 1},
        },
    }


def test_model_flops_count_what_each_side_ran():
    # LoRA: (2 + 2) x body + 6 x adapter per body position; (2 + 2) x head per projected row; reference 2 + 2
    lora = _summary(1.0, (50, 20), (0, 0))
    assert bench_report.model_flops(lora, SHAPE) == (4 * 100 + 6 * 10) * 50 + 4 * 1000 * 20
    with_ref = _summary(1.0, (50, 20), (50, 50))  # TRL: the reference forward every step, every position's head
    assert bench_report.model_flops(with_ref, SHAPE) - bench_report.model_flops(lora, SHAPE) == 2 * 100 * 50 + 2000 * 50
    full = _summary(1.0, (50, 20), (0, 0), method="full")
    assert bench_report.model_flops(full, SHAPE) == 6 * 100 * 50 + 6 * 1000 * 20
    assert bench_report.mfu(lora, SHAPE, peak=1e6) == pytest.approx(bench_report.model_flops(lora, SHAPE) / 10 / 1e6)
    old = dict(lora)
    del old["work"]  # a summary from before the counts: no figure rather than a made-up one
    assert bench_report.model_flops(old, SHAPE) is None


def test_targets_say_met_or_not_met():
    base = [_summary(1.0, (80, 80), (80, 80), memory=2.0) for _ in range(3)]
    cold = [_summary(p, (50, 20), (50, 20)) for p in (2.6, 1.9, 2.5)]  # median 2.5, one run below 2.0
    ours = [_summary(2.9, (50, 20), (0, 0)), _summary(3.2, (50, 20), (0, 0))]
    scale = [
        {
            "length": 512,
            "batch": 2,
            "baseline": _summary(1.0, (1, 1), (1, 1), memory=2.0),
            "ours": _summary(2.4, (1, 1), (0, 0)),
        },
        {
            "length": 1024,
            "batch": 4,
            "baseline": dict(_summary(1.0, (1, 1), (1, 1), memory=2.0), step_seconds=[30.0, 20.0, 22.0]),
            "ours": dict(_summary(1.8, (1, 1), (0, 0), memory=2.5), step_seconds=[25.0, 10.0, 12.0]),
        },
    ]

    class Prec:
        autocast = None

    report = bench_report.render(
        {"baseline": base, "cold": cold, "ours": ours}, [("none", ours[1])], scale, SHAPE, 1e6, Prec, 3, 3, 3, 60.0
    )
    lines = report["targets"]
    assert any(line.startswith("cold single run") and "median of 3: 2.50x, met" in line for line in lines)
    assert any(line.startswith("warm") and "median of 2: 3.05x, met" in line for line in lines)  # 2.9 and 3.2
    assert report["md"].startswith("# Bench: twin-dpo LoRA DPO vs plain TRL — **2.50x pairs/s cold, 3.05x warm**")
    # steady steps where both sides timed them: 21 s / 11 s (the first step left out), not whole-run pairs/s (1.8x)
    assert any("lowest 1.91x (1024 tokens, batch 4), NOT met" in line for line in lines)
    assert any("highest ours / TRL 1.25 (1024 tokens, batch 4), NOT met" in line for line in lines)
    assert "## Targets" in report["md"] and "100%" in report["md"]
    # the scaling table shows the training-loop speed-up the target line reads; without step times (512) the
    # loop is read from whole-run pairs/s less the reference pass
    assert "| 1024 | 4 | 10.00 | 10.00 | 21.00 | 11.00 | 1.91x |" in report["md"]
    assert "| 512 | 2 | 10.00 | 10.00 | 10.00 | 10.00 | 2.40x |" in report["md"]


def test_the_training_loop_rate_leaves_out_only_the_train_share_of_a_reference_pass():
    # a cold 4-step run: 30 s of reference pass, 20 s of it for the held-out pairs (counted as evaluation, not in
    # train_seconds), so train_seconds 18 = 10 s of train-pair reference + an 8 s loop for 8 pairs
    cold = _summary(8 / 18, (1, 1), (1, 1), seconds=18.0)
    cold.update(reference_reused=False, reference_seconds=30.0, reference_eval_seconds=20.0)
    assert bench_report.train_reference_seconds(cold) == 10.0
    assert bench_report._loop_pairs_per_second(cold) == pytest.approx(1.0)
    old = dict(cold, train_seconds=38.0, pairs_per_second=8 / 38)  # before the split: the whole pass in train time
    del old["reference_eval_seconds"]
    assert bench_report._loop_pairs_per_second(old) == pytest.approx(1.0)
    assert bench_report.train_reference_seconds(dict(cold, reference_reused=True)) == 0.0
