"""The run folder: where a run lives, how runs are found, what a reader may rely on.

`runs/<recipe>-<time>/` holds recipe.json (resolved, with overrides), metrics.jsonl (one line per logged
step), checkpoints/ (complete-marked), adapter/ or model/, and summary.json, written last with a
`status` ("completed" or "diverged"). Every command that consumes a run reads these files, not globals.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from pipeline.errors import UserError
from pipeline.storage import read_json, write_text_atomic

RUNS = Path("runs")  # relative to the working directory, like every path a user types


def new_run_dir(recipe_name: str, run_dir: str | Path | None) -> Path:
    """`--run-dir` as given (must not hold a finished run), else runs/<recipe>-<time>."""
    if run_dir:
        path = Path(run_dir)
        if (path / "summary.json").exists():
            raise UserError(f"--run-dir {run_dir} already holds a finished run (summary.json); choose another folder")
        if path.exists() and not path.is_dir():
            raise UserError(f"--run-dir {run_dir} is a file, not a folder")
    else:
        stamp = time.strftime("%Y%m%d-%H%M%S")
        path = RUNS / f"{recipe_name}-{stamp}"
        n = 1
        while path.exists():
            n += 1
            path = RUNS / f"{recipe_name}-{stamp}-{n}"
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise UserError(f"cannot create run folder {path}: {err.strerror}") from None
    return path


def status(folder: Path) -> str | None:
    """summary.json's status ("completed", "diverged"), or None for a run that has not finished."""
    path = Path(folder) / "summary.json"
    return read_json(path).get("status") if path.is_file() else None


def find_runs(
    recipe_name: str | None = None, finished: bool | None = True, root: Path | None = None, needs: str | None = None
) -> list[Path]:
    """Run folders under `root` (default runs/), oldest first by modification time.

    `recipe_name`: only that recipe's runs; `finished`: True = completed, False = not completed (what
    --resume continues), None = any; `needs`: a file or folder the run must hold (e.g. "adapter").
    """
    root = RUNS if root is None else Path(root)
    pattern = f"{recipe_name}-*" if recipe_name else "*"
    found = []
    for p in root.glob(pattern):
        if not p.is_dir() or not (p / "recipe.json").is_file():
            continue
        if finished is not None and (status(p) == "completed") != finished:
            continue
        if needs and not (p / needs).exists():
            continue
        found.append(p)
    return sorted(found, key=lambda p: p.stat().st_mtime)


def latest_run(root: Path | None = None) -> Path:
    """The newest finished run (what `evaluate` and `export` use when no run is named)."""
    found = find_runs(root=root)
    if not found:
        raise UserError(f"no finished run in {root or RUNS}/; train one first (make dpo-lora) or name the run folder")
    return found[-1]


def read_metrics(run_dir: Path) -> list[dict]:
    """metrics.jsonl lines; a torn last line (killed mid-write) is skipped."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.exists():
        return []
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return rows


def keep_metrics_until(run_dir: Path, step: int) -> None:
    """On resume, drop metrics logged after the checkpoint: the resumed run logs those steps again."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.exists():
        return
    kept = [r for r in read_metrics(run_dir) if r.get("step", 0) <= step]
    write_text_atomic(path, "".join(json.dumps(r) + "\n" for r in kept))
