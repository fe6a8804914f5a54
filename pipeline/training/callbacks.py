"""What a user sees and what the run folder records while a trainer runs: the progress bar with the numbers
that matter, metrics.jsonl (one line per log, TRL's names), and the time spent in evaluation."""

from __future__ import annotations

import json
import time
from pathlib import Path

POSTFIX = (
    ("loss", "loss"),
    ("rewards/accuracies", "reward accuracy"),
    ("rewards/margins", "margin"),
    ("mean_token_accuracy", "token accuracy"),
)


def run_log(run_dir: Path, total_steps: int, desc: str, main: bool = True):
    """A transformers TrainerCallback writing metrics.jsonl and drawing the progress bar. `main`: this process
    shows and writes (under several processes only rank 0 does; the logged numbers are already gathered)."""
    from tqdm.auto import tqdm
    from transformers import TrainerCallback

    class RunLog(TrainerCallback):
        def __init__(self):
            self.bar = None
            self.start = time.perf_counter()
            self.handle = (run_dir / "metrics.jsonl").open("a", encoding="utf-8") if main else None

        def on_train_begin(self, args, state, control, **kwargs):
            if main:
                self.bar = tqdm(total=total_steps, desc=desc, unit="step", dynamic_ncols=True)

        def on_step_end(self, args, state, control, **kwargs):
            if self.bar is not None:
                self.bar.update(state.global_step - self.bar.n)

        def on_log(self, args, state, control, logs=None, **kwargs):
            if self.handle is None:
                return
            logs = dict(logs or {})
            row = {"step": state.global_step, "elapsed_seconds": round(time.perf_counter() - self.start, 3), **logs}
            self.handle.write(json.dumps(row) + "\n")
            self.handle.flush()
            if self.bar is not None and "loss" in logs:
                shown = {label: logs[key] for key, label in POSTFIX if key in logs}
                self.bar.set_postfix({k: f"{v:.3f}" for k, v in shown.items()})
            if self.bar is not None and "eval_loss" in logs:
                extra = "".join(
                    f", {label} {logs['eval_' + key]:.3f}" for key, label in POSTFIX[1:] if "eval_" + key in logs
                )
                self.bar.write(f"  step {state.global_step}: held-out loss {logs['eval_loss']:.4f}{extra}")

        def on_train_end(self, args, state, control, **kwargs):
            if self.bar is not None:
                self.bar.close()

        def close(self):
            if self.bar is not None:
                self.bar.close()
            if self.handle is not None:
                self.handle.close()

    return RunLog()


def step_clock():
    """A TrainerCallback timing each optimizer step from on_step_begin to on_step_end (forward, backward and
    optimizer update of every micro-batch; not data loading, logging or evaluation): `.seconds`, one per step.
    The bench reads steady steps from both sides with it (its TRL baseline adds the same callback)."""
    from transformers import TrainerCallback

    class StepClock(TrainerCallback):
        def __init__(self):
            self.seconds: list[float] = []
            self.began = None

        def on_step_begin(self, args, state, control, **kwargs):
            self.began = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            if self.began is not None:
                self.seconds.append(round(time.perf_counter() - self.began, 4))
                self.began = None

    return StepClock()


def time_evaluations(trainer):
    """Wrap trainer.evaluate (also called inside train()) to add up its time; returns a reader of the total.
    Evaluation time is reported apart from training time."""
    total = [0.0]
    original = trainer.evaluate

    def timed(*args, **kwargs):
        start = time.perf_counter()
        try:
            return original(*args, **kwargs)
        finally:
            total[0] += time.perf_counter() - start

    trainer.evaluate = timed
    return lambda: total[0]
