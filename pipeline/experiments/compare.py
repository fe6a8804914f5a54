"""`python -m pipeline compare`: LoRA, QLoRA and full DPO and the plain TRL baseline on the same data, seed,
batch and steps -> reports/compare/ (curves.png, report.md). The reference log-probs cache is shared: after
the first run of a model + data, later runs skip the reference pass."""

from __future__ import annotations

import sys
import time
from pathlib import Path

from pipeline import recipe as recipes
from pipeline.errors import UserError
from pipeline.experiments import children, curves, report
from pipeline.storage import write_text_atomic

COMPARED = (("dpo-lora", "dpo_lora"), ("dpo-qlora", "dpo_qlora"), ("dpo-full", "dpo_full"))


def compare(steps: int | None, overrides: list[str], out: Path = Path("reports/compare")) -> Path:
    for _, spec in COMPARED:  # fail on a bad --set before any run starts
        recipes.resolve(spec, overrides)
    if not children.BASELINE.is_file():
        raise UserError(f"compare needs the TRL baseline script {children.BASELINE}; run it from a twin-dpo checkout")
    out = children.fresh(out)
    start = time.perf_counter()
    for name, spec in COMPARED:
        children.run(
            [
                *children.PIPELINE,
                "train",
                spec,
                "--run-dir",
                str(out / "runs" / name),
                *children.flags(steps, overrides),
            ],
            name,
        )
    base_dir = out / "runs" / "trl-baseline"
    children.run(
        [sys.executable, str(children.BASELINE), "--run-dir", str(base_dir), *children.flags(steps, overrides)],
        "trl-baseline",
    )
    children.run([*children.PIPELINE, "evaluate", str(base_dir)], "trl-baseline evaluate")
    every = [report.load(out / "runs" / name, name) for name, _ in COMPARED] + [report.load(base_dir, "trl-baseline")]
    curves.curves(every, out / "curves.png", "LoRA vs QLoRA vs full DPO vs plain TRL")
    write_text_atomic(out / "report.md", report.compare_page(every, time.perf_counter() - start))
    return out / "report.md"
