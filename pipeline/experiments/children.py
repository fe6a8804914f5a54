"""Every experiment runs each training as its own process (`python -m pipeline ...`): peak memory is that
process's own, and one run cannot inflate another's. One helper runs them; one folder layout holds them."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

from pipeline.errors import RunFailed
from pipeline.storage import CHECKOUT

BASELINE = CHECKOUT / "benchmarks" / "trl_baseline.py"
PIPELINE = [sys.executable, "-m", "pipeline"]


def run(command: list[str], what: str, env: dict[str, str] | None = None, quiet: bool = False) -> None:
    """Run a child; `quiet` keeps its output unless it fails. A failure raises RunFailed (exit 1)."""
    if not quiet:
        print(f"[twin-dpo] {what}: {' '.join(command[1:])}", flush=True)
    done = subprocess.run(command, env=env, capture_output=quiet, text=True)
    if done.returncode != 0:
        if quiet:
            sys.stderr.write(done.stdout[-4000:] + done.stderr[-4000:])
        raise RunFailed(f"{what} failed with exit status {done.returncode} (its output is above)")


def flags(steps: int | None, overrides: list[str]) -> list[str]:
    """`--max-steps N --set k=v ...` for a child."""
    out = ["--max-steps", str(steps)] if steps else []
    for o in overrides:
        out += ["--set", o]
    return out


def fresh(folder: Path) -> Path:
    """An empty report folder with runs/ inside; a previous report there is replaced."""
    if folder.exists():
        print(f"[twin-dpo] replacing the previous {folder}", flush=True)
        shutil.rmtree(folder)
    (folder / "runs").mkdir(parents=True)
    return folder
