"""Run folders: naming, atomic writes, and the facts every summary carries."""

from __future__ import annotations

import json
import os
import platform
import resource
import shutil
import time
from contextlib import contextmanager
from importlib import metadata
from pathlib import Path
from typing import Any, Iterator

from pipeline.errors import UserError

RUNS = Path("runs")


def new_run_dir(recipe_name: str, run_dir: str | None) -> Path:
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


def write_text_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with tmp.open("w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def write_json_atomic(path: Path, data: Any) -> None:
    write_text_atomic(path, json.dumps(data, indent=2, default=str) + "\n")


@contextmanager
def atomic_dir(target: Path) -> Iterator[Path]:
    """Yield a temporary sibling folder; it replaces `target` only if the block finishes."""
    tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        yield tmp
        if target.exists():
            old = target.with_name(f".{target.name}.old-{os.getpid()}")
            target.rename(old)
            tmp.rename(target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def read_json(path: Path) -> Any:
    return json.loads(path.read_text(encoding="utf-8"))


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


def versions() -> dict[str, str | None]:
    out: dict[str, str | None] = {}
    for name in ("torch", "transformers", "trl", "peft", "bitsandbytes", "accelerate", "datasets", "unsloth", "unsloth_zoo"):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    out["python"] = platform.python_version()
    return out


def peak_memory(device: str) -> tuple[int, str]:
    """(bytes, what was measured): CUDA max allocated on GPU, else this process's peak RSS."""
    if device == "cuda":
        import torch

        return int(torch.cuda.max_memory_allocated()), "torch.cuda.max_memory_allocated"
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "peak RSS (ru_maxrss)"


def device_name(device: str) -> str:
    if device == "cuda":
        import torch

        return torch.cuda.get_device_name(0)
    return f"{platform.processor() or platform.machine()} CPU, {os.cpu_count()} cores"


def latest_run(root: Path = RUNS, finished: bool = True) -> Path:
    candidates = [p for p in root.glob("*/") if p.is_dir() and (not finished or (
        (p / "summary.json").exists() and read_json(p / "summary.json").get("status") == "completed"))]
    if not candidates:
        raise UserError(f"no finished run in {root}/; train one first (make dpo-lora) or name the run folder")
    return max(candidates, key=lambda p: p.stat().st_mtime)


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if abs(n) < 1024 or unit == "GB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} GB"


def latest_unfinished(recipe_name: str, root: Path = RUNS) -> Path:
    """The newest run of this recipe without a completed summary.json (the one --resume continues)."""
    candidates = [p for p in root.glob(f"{recipe_name}-*") if p.is_dir() and (p / "recipe.json").is_file()
                  and not ((p / "summary.json").is_file() and read_json(p / "summary.json").get("status") == "completed")]
    if not candidates:
        raise UserError(f"--resume: no unfinished {recipe_name} run in {root}/; name the run folder")
    return max(candidates, key=lambda p: p.stat().st_mtime)


def keep_metrics_until(run_dir: Path, step: int) -> None:
    """On resume, drop metrics logged after the checkpoint: the resumed run logs those steps again."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.exists():
        return
    kept = [r for r in read_metrics(run_dir) if r.get("step", 0) <= step]
    write_text_atomic(path, "".join(json.dumps(r) + "\n" for r in kept))
