"""`bench` end to end on the tiny model: both sides run, every table is written, the figures come from the runs."""

from __future__ import annotations

import json
import subprocess
import sys

from pipeline.experiments import bench
from pipeline.model import runtime


def test_quick_bench_writes_ratio_ablation_and_scaling(tiny_llama, small_data, tmp_path, capsys):
    sets = [
        f"model.name_or_path={tiny_llama}",
        f"data.train={small_data['train']}",
        f"data.eval={small_data['heldout']}",
        "model.dtype=float32",
    ]
    levers = tuple(a for a in bench.ABLATIONS if a[1] == ["train.precompute_ref=false"])  # reference every step
    assert len(levers) == 1
    md_path = bench.bench(
        steps=2,
        repeats=1,
        scaling_steps=1,
        out=tmp_path / "bench",
        overrides=sets,
        lengths=(128,),
        batches=(1,),
        ablations=levers,
        ablation_steps=1,
    )
    md = md_path.read_text()
    report = json.loads((tmp_path / "bench" / "bench.json").read_text())
    assert md.startswith(
        f"# Bench: twin-dpo LoRA DPO vs plain TRL — **{report['ratio_cold_pairs_per_second']:.2f}x pairs/s cold, "
        f"{report['ratio_pairs_per_second']:.2f}x warm**"
    )
    for side in ("baseline", "ours_cold", "ours"):
        pairs = report[side]["pairs_per_second"]["values"]
        assert len(pairs) == 1 and all(p > 0 for p in pairs)
        assert report[side]["peak_memory_bytes"]["median"] > 100 * 2**20
        assert 0 < report[side]["mfu"]["median"] < 1
    work = next((tmp_path / "bench").glob("twin-bench-*"))
    baseline = json.loads((work / "baseline-0" / "summary.json").read_text())
    if baseline["precision"] == "bf16 autocast":  # this CPU computes bf16: TRL's held-out figures are re-evaluated
        assert baseline["held_out_precision"].startswith("float32 (re-evaluated")
        assert set(baseline["eval_after_trl"]) == set(baseline["eval_after"])
    else:
        assert baseline["held_out_precision"] == "float32" and baseline["eval_after_trl"] == baseline["eval_after"]
    ours = json.loads((work / "ours-0" / "summary.json").read_text())
    cold = json.loads((work / "ours-cold-0" / "summary.json").read_text())
    assert not cold["reference_reused"] and ours["reference_reused"]  # the warm run read what the cold one cached
    for side in (baseline, ours):  # both sides time each step the same way (the scaling grid's steady steps)
        assert len(side["step_seconds"]) == side["steps"] == 2 and all(
            0 < s < side["train_seconds"] for s in side["step_seconds"]
        )
    ratio = report["ours"]["pairs_per_second"]["median"] / report["baseline"]["pairs_per_second"]["median"]
    assert abs(ratio - report["ratio_pairs_per_second"]) < 1e-12
    # the ablation runs really ran with the lever off
    assert [a["lever_off"] for a in report["ablation"]] == ["none (all levers on)"] + [label for label, _ in levers]
    assert all(a["summary"]["steps"] == 1 for a in report["ablation"])
    assert report["ablation"][1]["summary"]["reference"].endswith("run at every step")
    assert "| reference run at every step (no cached log-probs) |" in md and "none: run at every step" in md
    assert len(report["scaling"]) == 1 and report["scaling"][0]["ours"]["steps"] == 1
    assert "## Ablation" in md and "## Scaling" in md and "| 128 | 1 |" in md
    # each child run says it is done as it ends (main runs, lever rows, grid points), with its own figures
    done = [line for line in capsys.readouterr().out.splitlines() if line.startswith("[twin-dpo]   ")]
    assert len(done) == 3 + 2 + 2
    assert done[0].startswith(
        f"[twin-dpo]   TRL baseline (baseline-0): 2 steps, {baseline['pairs_per_second']:.3f} pairs/s"
    )
    assert done[2].startswith(f"[twin-dpo]   ours (ours-0): 2 steps, {ours['pairs_per_second']:.3f} pairs/s")


def test_a_child_reports_its_own_peak_memory_not_its_parents():
    """Every bench, compare and sweep run is a child of a process that may be big (bench builds the twin
    in-process: 3.4 GB). Linux carries ru_maxrss over fork and exec, so with it every small run read 3.4 GB."""
    parent = bytearray(600 * 2**20)
    parent[::4096] = b"\x01" * len(parent[::4096])  # resident, not just reserved
    code = "from pipeline.model import runtime; print(runtime.peak_memory('cpu')[0])"
    child = int(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout)
    assert child < 300 * 2**20, f"the child reports {child / 2**20:.0f} MiB: its parent's peak"
    own, kind = runtime.peak_memory("cpu")
    assert own > len(parent) and "peak RSS" in kind  # the parent's own peak still counts its buffer
    del parent
