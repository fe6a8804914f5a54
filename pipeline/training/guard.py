"""Never lose a run: complete checkpoints, resume, interrupts, divergence, full disks, one process per run.

- A checkpoint is transformers' own folder (adapter or model, optimizer, scheduler, RNG states, trainer
  state) plus a `COMPLETE` marker written last, after every file is on disk (fsync). Resume uses only
  marked folders, so a kill -9 while saving leaves the previous checkpoint as the one that counts. We
  prune old checkpoints ourselves (marker first, then the files), keeping the last `train.keep_checkpoints`.
- SIGINT / SIGTERM ask the trainer to save at the end of the current step and stop; the CLI then prints
  the exact resume command and exits 130 / 143.
- A non-finite loss or gradient norm stops the run at that step, before anything from that step is saved.
- A run folder is locked (flock) by the process that trains in it; a second one is refused with the pid.
"""

from __future__ import annotations

import errno
import fcntl
import math
import os
import shutil
import signal
import time
from pathlib import Path
from typing import Any

from pipeline.errors import EXIT_SIGNAL, UserError
from pipeline.training import distributed

MARKER = "COMPLETE"


# ------------------------------------------------------------------ checkpoints


def _fsync_tree(folder: Path) -> None:
    for path in folder.rglob("*"):
        if path.is_file():
            with path.open("rb") as handle:
                os.fsync(handle.fileno())
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def mark_complete(folder: Path) -> None:
    _fsync_tree(folder)
    tmp = folder / f".{MARKER}.tmp"
    tmp.write_text(f"{time.strftime('%Y-%m-%dT%H:%M:%S')}\n")
    os.replace(tmp, folder / MARKER)
    _fsync_tree(folder)


def complete_checkpoints(root: Path) -> list[Path]:
    """Marked checkpoint folders, oldest first."""
    found = [p for p in Path(root).glob("checkpoint-*") if (p / MARKER).is_file()]
    return sorted(found, key=lambda p: int(p.name.split("-")[-1]))


def latest_checkpoint(root: Path) -> Path | None:
    """The newest marked checkpoint folder, or None."""
    return (complete_checkpoints(root) or [None])[-1]


def prune(root: Path, keep: int) -> None:
    """Drop unmarked (torn) checkpoints and all but the newest `keep` complete ones; marker first."""
    complete = complete_checkpoints(root)
    doomed = complete[:-keep] if keep > 0 else complete
    doomed += [p for p in Path(root).glob("checkpoint-*") if not (p / MARKER).is_file()]
    for folder in doomed:
        marker = folder / MARKER
        if marker.exists():
            marker.unlink()
        shutil.rmtree(folder, ignore_errors=True)


def disk_full_message(err: OSError, where: Path, previous: Path | None) -> str:
    keep = f"the previous checkpoint {previous.name} is intact" if previous else "no earlier checkpoint exists"
    free = shutil.disk_usage(where.parent if where.parent.exists() else Path.cwd()).free
    return (
        f"disk full while writing {where} ({os.strerror(err.errno)}; {free / 2**20:.0f} MB free); {keep}; "
        "free some space and resume with --resume"
    )


def is_disk_full(err: BaseException) -> bool:
    return isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT)


# ------------------------------------------------------------------ lock


class RunLock:
    """An exclusive flock on RUN/.lock, held while this process trains there; the kernel drops it on death."""

    def __init__(self, run_dir: Path):
        self.path = Path(run_dir) / ".lock"
        self.handle = None

    def __enter__(self) -> "RunLock":
        self.path.parent.mkdir(parents=True, exist_ok=True)
        handle = self.path.open("a+")
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "another process"
            handle.close()
            raise UserError(
                f"run folder {self.path.parent} is in use by {holder}; wait for it, or stop it first"
            ) from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"pid {os.getpid()} (since {time.strftime('%H:%M:%S')})")
        handle.flush()
        self.handle = handle
        return self

    def __exit__(self, *exc) -> None:
        if self.handle:
            fcntl.flock(self.handle.fileno(), fcntl.LOCK_UN)
            self.handle.close()
            self.handle = None


# ------------------------------------------------------------------ callbacks


def callback(checkpoints: Path, keep: int, precision: str):
    """Marks checkpoints complete, prunes, stops on divergence and on SIGINT/SIGTERM."""
    from transformers import TrainerCallback

    class Guard(TrainerCallback):
        def __init__(self):
            self.signum: int | None = None
            self.diverged: str | None = None
            self.previous = {}
            self.signalled = 0.0

        def install_signals(self) -> None:
            def handler(signum, _frame):
                # a second Ctrl-C stops now; under a launcher the terminal's SIGINT and the one the launcher
                # forwards arrive together: they count as one
                if self.signum is not None and time.monotonic() - self.signalled > 2.0:
                    raise KeyboardInterrupt
                if self.signum is None:
                    self.signum, self.signalled = signum, time.monotonic()

            for sig in EXIT_SIGNAL:
                self.previous[sig] = signal.signal(sig, handler)

        def restore_signals(self) -> None:
            for sig, old in self.previous.items():
                signal.signal(sig, old)

        def on_step_end(self, args, state, control, **kwargs):
            # every process stops at the same step, whichever of them got the signal (one small all-reduce)
            if distributed.any_rank(self.signum is not None):
                self.signum = self.signum or signal.SIGTERM
                control.should_save = True
                control.should_training_stop = True
            return control

        def on_log(self, args, state, control, logs=None, **kwargs):
            logs = logs or {}
            bad = [k for k in ("loss", "grad_norm") if k in logs and not math.isfinite(logs[k])]
            if bad and self.diverged is None:
                what = " and ".join(f"{k} {logs[k]}" for k in bad)
                cause = (
                    "fp16 overflow is likely: use bf16 or float32 (model.dtype)"
                    if precision == "fp16"
                    else f"the learning rate ({args.learning_rate:g}) is likely too high (or train.beta too low)"
                )
                self.diverged = f"step {state.global_step}: {what}; {cause}"
                control.should_save = False
                control.should_evaluate = False
                control.should_training_stop = True
            return control

        def on_save(self, args, state, control, **kwargs):
            folder = checkpoints / f"checkpoint-{state.global_step}"
            distributed.barrier()  # every rank's files (its RNG state) are written before rank 0 marks the folder
            if distributed.is_main() and folder.is_dir() and self.diverged is None:
                mark_complete(folder)
                prune(checkpoints, keep)
            return control

    return Guard()


def resume_command(command: str, recipe_spec: str, overrides: list[str], max_steps: int | None, run_dir: Path) -> str:
    """The exact command that continues this run with the same settings (`command`: train or sft)."""
    parts = [f"python -m pipeline {command}", recipe_spec]
    parts += [f"--set {o}" for o in overrides]
    if max_steps is not None:
        parts.append(f"--max-steps {max_steps}")
    return " ".join(parts + ["--resume", str(run_dir)])


def changed_fields(old: dict[str, Any], new: dict[str, Any], prefix: str = "") -> list[str]:
    out = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        name = f"{prefix}{key}"
        if isinstance(a, dict) and isinstance(b, dict):
            out += changed_fields(a, b, name + ".")
        elif (list(a) if isinstance(a, (list, tuple)) else a) != (list(b) if isinstance(b, (list, tuple)) else b):
            out.append(f"{name} ({a!r} in the run, {b!r} now)")
    return out
