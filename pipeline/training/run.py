"""One run protocol for DPO and SFT: open (or resume) the run folder under its lock, fit under the guard,
write the artifact and summary.json atomically.

    with Run.open(recipe, run_dir, resume, force, autocast, started) as run:  # lock; pick the checkpoint
        ...build a trainer with run.guard in its callbacks...
        before, after = run.fit(trainer, block)             # signals, divergence, interrupts, resume
        run.save_policy(trainer.model, tokenizer)
        run.finish(run.summary(...))

Exceptions that end a run (pipeline/errors.py): Diverged (summary.json says "diverged", no artifact),
Interrupted (a checkpoint was saved at the signal), UserError for a full disk (the torn checkpoint dropped).
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

from pipeline import recipe as recipes
from pipeline import run_folder
from pipeline.errors import Diverged, Interrupted, UserError
from pipeline.model import runtime
from pipeline.recipe import Recipe
from pipeline.storage import atomic_dir, read_json, write_json_atomic, write_text_atomic
from pipeline.training import arguments, distributed, guard, trl_compat
from pipeline.training.callbacks import time_evaluations


def locate(recipe: Recipe, run_dir, resume, force: bool) -> tuple[Path, bool]:
    """(a new run folder, False), or (the run folder to resume, True) once its recipe is checked."""
    if resume is None:
        return run_folder.new_run_dir(recipe.name, run_dir), False
    if resume == "latest":
        found = run_folder.find_runs(recipe.name, finished=False)
        if not found:
            raise UserError(f"--resume: no unfinished {recipe.name} run in {run_folder.RUNS}/; name the run folder")
        folder = found[-1]
    else:
        folder = Path(resume)
    if not (folder / "recipe.json").is_file():
        raise UserError(f"--resume {folder}: not a twin-dpo run folder (no recipe.json)")
    if run_folder.status(folder) == "completed":
        raise UserError(f"--resume {folder}: that run already finished (summary.json); start a new run instead")
    changed = guard.changed_fields(read_json(folder / "recipe.json"), recipes.to_dict(recipe))
    if changed and not force:
        raise UserError(
            f"--resume {folder}: the recipe changed since the run started: {'; '.join(changed)}; "
            "resume with the run's own settings, or add --force to continue with the new ones"
        )
    return folder, True


@dataclass
class Run:
    recipe: Recipe
    path: Path
    checkpoint: Path | None  # the complete checkpoint this process resumes from, or None
    started: float  # perf_counter when the command began: wall_seconds counts from there
    guard: Any = None  # training/guard.py's callback: give it to the trainer
    timings: dict[str, float] = field(default_factory=dict)
    train_start: float | None = None  # set by start_clock(): train time counts from building the trainer

    def start_clock(self) -> None:
        """Start the training clock: train time includes building the trainer and the one-off reference pass
        over the train pairs (as the README's and the bench's figures do), not model loading or held-out
        evaluation (the trainer's, and the reference pass over the held-out pairs)."""
        self.train_start = time.perf_counter()

    @property
    def step0(self) -> int:
        return int(self.checkpoint.name.split("-")[-1]) if self.checkpoint else 0

    @classmethod
    @contextmanager
    def open(cls, recipe: Recipe, run_dir, resume, force: bool, autocast: str | None, started: float) -> Iterator[Run]:
        """Lock the folder, pick the checkpoint, write recipe.json; a full disk becomes one line (exit 2).
        Under several processes rank 0 does all of it and tells the others the folder and the checkpoint."""
        keep = recipe.train.keep_checkpoints
        if not distributed.is_main():
            where, chosen = distributed.broadcast(None)
            run = cls(recipe, Path(where), Path(chosen) if chosen else None, started)
            run.guard = guard.callback(run.path / "checkpoints", keep, autocast or "fp32")
            yield run
            return
        path, resuming = locate(recipe, run_dir, resume, force)
        checkpoints = path / "checkpoints"
        with guard.RunLock(path):
            checkpoint = None
            if resuming:  # under the lock: a checkpoint torn by a kill is dropped, the newest complete one is used
                guard.prune(checkpoints, keep)
                checkpoint = guard.latest_checkpoint(checkpoints)
            distributed.broadcast((str(path), str(checkpoint) if checkpoint else None))
            run = cls(recipe, path, checkpoint, started)
            run.guard = guard.callback(checkpoints, keep, autocast or "fp32")
            write_text_atomic(path / "recipe.json", recipes.dumps(recipe))
            run_folder.keep_metrics_until(path, run.step0 if checkpoint else -1)
            try:
                yield run
            except OSError as err:
                if not guard.is_disk_full(err):
                    raise
                guard.prune(checkpoints, recipe.train.keep_checkpoints)  # drop the torn folder, keep the rest
                raise UserError(guard.disk_full_message(err, path, guard.latest_checkpoint(checkpoints))) from None

    def fit(self, trainer, block: Callable[[dict], dict] | None) -> tuple[dict | None, dict | None]:
        """Evaluate (or recall the step-0 evaluation), train or resume, evaluate; (before, after) as `block`s.
        `block` None: no held-out evaluation at all (a smoke test), (None, None). A resumed run started without
        one has no step-0 figures: `before` is None then."""
        eval_timer = time_evaluations(trainer)
        if self.train_start is None:
            self.start_clock()
        self.guard.install_signals()
        before = None
        try:
            if block is not None and self.checkpoint is None:
                print("[twin-dpo] held-out evaluation of the untouched twin", flush=True)
                before = block(trainer.evaluate())
                distributed.rewrap_after_evaluation(trainer)
            elif block is not None:  # measured when the run started
                rows = run_folder.read_metrics(self.path)
                first = [r for r in rows if "eval_loss" in r and r.get("step") == 0]
                before = block(first[0]) if first else None
            trainer.train(resume_from_checkpoint=str(self.checkpoint) if self.checkpoint else None)
            if self.guard.diverged:
                self._diverged(self.guard.diverged)
            if self.guard.signum is not None:
                raise Interrupted(self.guard.signum, guard.latest_checkpoint(self.path / "checkpoints"))
            # the periodic evaluation may have just run at the final step: reuse it rather than pay twice
            step = trainer.state.global_step
            at_end = [r for r in trainer.state.log_history if "eval_loss" in r and r.get("step") == step]
            after = block(at_end[-1] if at_end else trainer.evaluate()) if block is not None else None
        finally:
            self.guard.restore_signals()
        # held-out evaluation: the trainer's evaluations and the reference pass's held-out share (dpo.py sets it)
        self.timings["eval_seconds"] = eval_timer() + self.timings.get("reference_eval_seconds", 0.0)
        self.timings["train_seconds"] = time.perf_counter() - self.train_start - self.timings["eval_seconds"]
        return before, after

    def _diverged(self, message: str) -> None:
        """Record the divergence (no artifact is saved from it) and stop with the distinct exit status."""
        last = guard.latest_checkpoint(self.path / "checkpoints")
        if distributed.is_main():
            write_json_atomic(
                self.path / "summary.json",
                {
                    "status": "diverged",
                    "recipe": self.recipe.name,
                    "message": message,
                    "last_good_checkpoint": str(last) if last else None,
                    "versions": runtime.versions(),
                },
            )
        where = f"the last good checkpoint is {last}" if last else "no checkpoint was saved before it"
        raise Diverged(f"training diverged at {message}; {where}; nothing from the diverged step was saved")

    def save_policy(self, policy, tokenizer) -> str:
        """The trained policy, written atomically: an adapter (never a frozen reference copy) or a full model.
        Rank 0 writes it (every rank holds the same weights under DDP)."""
        artifact = "model" if self.recipe.method == "full" else "adapter"
        if not distributed.is_main():
            return artifact
        with atomic_dir(self.path / artifact) as tmp:
            if artifact == "adapter":
                policy.save_pretrained(tmp, safe_serialization=True, selected_adapters=["default"])
            else:
                policy.save_pretrained(tmp, safe_serialization=True)
                tokenizer.save_pretrained(tmp)
        return artifact

    def summary(
        self, trainer, backend, prec, model_path: str, unit: str, n_rows: int, before: dict, after: dict, **extra
    ) -> dict[str, Any]:
        """The summary both runs write: what ran where, how fast, how big, and the held-out numbers.
        `unit` names what a row is ("pairs" for DPO, "examples" for SFT)."""
        state = trainer.state
        seen = arguments.rows_seen(self.recipe, state.global_step - self.step0, n_rows)
        tokens = trl_compat.tokens_trained(trainer)
        train_seconds = self.timings["train_seconds"]
        trainable, total = arguments.count_parameters(trainer.model)
        peak, peak_kind = runtime.peak_memory(backend.device)
        peaks = distributed.gather(peak)  # each process's own peak
        train_logs = [row for row in state.log_history if "loss" in row]
        return {
            "status": "completed",
            "recipe": self.recipe.name,
            "method": self.recipe.method,
            "load_in_4bit": self.recipe.model.load_in_4bit,
            "backend": backend.name,
            "backend_reason": backend.reason,
            "device": runtime.device_name(backend.device),
            "precision": prec.describe(),
            "model_path": model_path,
            "steps": state.global_step,
            "resumed_from_step": self.step0 or None,
            f"{unit}_trained": seen,
            "tokens_trained": tokens,
            "wall_seconds": round(time.perf_counter() - self.started, 2),
            "load_seconds": round(self.timings.get("load_seconds", 0.0), 2),
            "train_seconds": round(train_seconds, 2),
            "eval_seconds": round(self.timings["eval_seconds"], 2),
            f"{unit}_per_second": round(seen / train_seconds, 4),
            "tokens_per_second": round(tokens / train_seconds, 2),
            "peak_memory_bytes": peak,
            "peak_memory_kind": peak_kind,
            "peak_memory_bytes_per_process": peaks,
            "world_size": distributed.world_size(),
            "distributed": distributed.kind(trainer.accelerator),
            "batch_per_process": self.recipe.train.batch_size,
            "global_batch": arguments.global_batch(self.recipe),
            "trainable_parameters": trainable,
            "total_parameters": total,
            "final_train_loss": train_logs[-1]["loss"] if train_logs else None,
            "eval_before": before,
            "eval_after": after,
            **extra,
            "versions": runtime.versions(),
        }

    def finish(self, summary: dict[str, Any]) -> None:
        if distributed.is_main():
            write_json_atomic(self.path / "summary.json", summary)
        distributed.barrier()  # the other ranks leave only once the run folder is complete
