"""`python -m pipeline gpu-smoke`: dpo-lora and dpo-qlora for N steps with each backend (unsloth, hf) on one
CUDA GPU -> reports/gpu-smoke/report.md."""

from __future__ import annotations

from pathlib import Path

from pipeline.errors import UserError
from pipeline.experiments import children, report
from pipeline.model.backend import cuda_available
from pipeline.storage import read_json, write_text_atomic


def gpu_smoke(steps: int = 30, overrides: list[str] | None = None, out: Path = Path("reports/gpu-smoke")) -> Path:
    if not cuda_available():
        raise UserError("gpu-smoke needs a CUDA GPU and none was found (torch.cuda.is_available() is False)")
    out = children.fresh(out)
    rows = []
    for method in ("dpo_lora", "dpo_qlora"):
        for backend in ("unsloth", "hf"):
            folder = out / "runs" / f"{method}-{backend}"
            sets = (overrides or []) + [f"model.backend={backend}", "train.eval_every=0"]
            children.run(
                [
                    *children.PIPELINE,
                    "train",
                    method,
                    "--run-dir",
                    str(folder),
                    "--no-answers",
                    *children.flags(steps, sets),
                ],
                f"{method} on {backend}",
            )
            rows.append((method, read_json(folder / "summary.json")))
    write_text_atomic(out / "report.md", report.gpu_smoke_page(rows))
    return out / "report.md"
