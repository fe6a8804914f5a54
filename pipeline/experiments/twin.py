"""`python -m pipeline twin`: SFT makes the twin -> DPO on the twin adapter -> export, then the memory of the
two ways to hold the reference, measured on the same data and steps; one summary page in reports/twin/."""

from __future__ import annotations

import time
from pathlib import Path

from pipeline import recipe as recipes
from pipeline.experiments import children, report
from pipeline.storage import read_json, write_text_atomic


def twin(
    steps: int | None,
    overrides: list[str],
    out: Path = Path("reports/twin"),
    memory_steps: int = 10,
    formats: str | None = None,
) -> Path:
    """SFT makes the twin -> DPO on the twin adapter -> export, then the memory of the two ways to hold the
    reference, measured on the same data and steps; one summary page."""
    for spec in ("sft_twin", "dpo_lora_twin"):
        recipes.resolve(spec, overrides)
    out = children.fresh(out)
    start = time.perf_counter()
    py = children.PIPELINE
    sft_dir, dpo_dir = out / "runs" / "sft-twin", out / "runs" / "dpo-lora-twin"
    children.run([*py, "sft", "sft_twin", "--run-dir", str(sft_dir), *children.flags(steps, overrides)], "1/4 sft")
    children.run([*py, "evaluate", str(sft_dir)], "1/4 sft evaluate")
    twin_sets = overrides + [f"model.adapter={sft_dir}"]
    children.run(
        [*py, "train", "dpo_lora_twin", "--run-dir", str(dpo_dir), *children.flags(steps, twin_sets)],
        "2/4 dpo on the twin adapter",
    )
    export_sets = ["--set", f"export.formats={formats}"] if formats else []
    children.run([*py, "export", str(dpo_dir), *export_sets], "3/4 export")
    memory = {}
    for kind in ("adapter-copy", "merged-copy"):
        folder = out / "runs" / f"memory-{kind}"
        sets = twin_sets + [f"model.twin_reference={kind}", "train.precompute_ref=false", "train.eval_every=0"]
        children.run(
            [
                *py,
                "train",
                "dpo_lora_twin",
                "--run-dir",
                str(folder),
                "--no-answers",
                *children.flags(memory_steps, sets),
            ],
            f"4/4 memory, reference as {kind}",
        )
        memory[kind] = read_json(folder / "summary.json")
    page = report.twin_page(
        report.load(sft_dir, "sft-twin"), report.load(dpo_dir, "dpo-lora-twin"), memory, time.perf_counter() - start
    )
    write_text_atomic(out / "summary.md", page)
    return out / "summary.md"
