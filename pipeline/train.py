"""One DPO run: recipe -> data + model -> trl.DPOTrainer -> run folder.

TRL's trainer is wrapped, not subclassed. For method `lora` the policy is the
base plus a fresh adapter and the reference is the same base with the adapter
switched off (TRL does this when given a plain model and a `peft_config`), so
the base weights are in memory once.
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from pipeline import config as cfg
from pipeline import data as data_mod
from pipeline import fast, guard, reference, runs
from pipeline.config import Recipe
from pipeline.errors import UserError

EVAL_BATCH = 8  # pairs per evaluation forward: the reference pass's batches, so untrained rewards are exactly 0
STEP_DELAY = float(os.environ.get("TWIN_DPO_TEST_STEP_DELAY", "0") or 0)
POSTFIX = (("loss", "loss"), ("rewards/accuracies", "reward accuracy"), ("rewards/margins", "margin"),
           ("mean_token_accuracy", "token accuracy"))
EVAL_KEYS = {"reward_accuracy": "eval_rewards/accuracies", "reward_margin": "eval_rewards/margins", "loss": "eval_loss"}


def quiet_libraries() -> None:
    """Keep the terminal for our progress bar and messages."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import datasets
    import transformers

    datasets.disable_progress_bars()
    datasets.logging.set_verbosity_error()
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()


def tune_allocator() -> str:
    """Serve tensors of 4 MB and more from mmap (returned to the OS when freed) instead of glibc's heap.

    glibc raises its mmap threshold as large blocks are freed, so the variable-size activations of a training
    run fragment the heap and the RSS creeps up. A fixed threshold stops that: measured here (40 LoRA DPO
    steps), peak RSS 3.97 -> 3.36 GB at the same speed (1.69 pairs/s both); 128 KB was 2.3x slower (page faults).
    TWIN_DPO_MMAP_THRESHOLD_MB=0 turns it off.
    """
    import ctypes
    import ctypes.util

    mb = int(os.environ.get("TWIN_DPO_MMAP_THRESHOLD_MB", "4") or 0)
    if mb <= 0:
        return "glibc default"
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        if libc.mallopt(-3, mb << 20) != 1:  # M_MMAP_THRESHOLD
            return "glibc default"
    except (OSError, AttributeError):  # not glibc (macOS, musl): nothing to tune
        return "system default"
    return f"mmap threshold {mb} MB"


def set_threads(threads: int) -> int:
    import torch

    n = threads or max(1, len(os.sched_getaffinity(0)))
    torch.set_num_threads(n)
    return n


# ------------------------------------------------------------------ callbacks


def callbacks(run_dir: Path, total_steps: int, desc: str = "DPO"):
    from tqdm.auto import tqdm
    from transformers import TrainerCallback

    class RunLog(TrainerCallback):
        """metrics.jsonl (one line per log, TRL's names) and a progress bar with the numbers that matter."""

        def __init__(self):
            self.bar = None
            self.start = time.perf_counter()
            self.handle = (run_dir / "metrics.jsonl").open("a", encoding="utf-8")

        def on_train_begin(self, args, state, control, **kwargs):
            self.bar = tqdm(total=total_steps, desc=desc, unit="step", dynamic_ncols=True)

        def on_step_end(self, args, state, control, **kwargs):
            if self.bar is not None:
                self.bar.update(state.global_step - self.bar.n)
            if STEP_DELAY:  # tests: slow a tiny model's steps down enough to kill it at a chosen moment
                time.sleep(STEP_DELAY)

        def on_log(self, args, state, control, logs=None, **kwargs):
            logs = dict(logs or {})
            row = {"step": state.global_step, "elapsed_seconds": round(time.perf_counter() - self.start, 3), **logs}
            self.handle.write(json.dumps(row) + "\n")
            self.handle.flush()
            if self.bar is not None and "loss" in logs:
                shown = {label: logs[key] for key, label in POSTFIX if key in logs}
                self.bar.set_postfix({k: f"{v:.3f}" for k, v in shown.items()})
            if self.bar is not None and "eval_loss" in logs:
                extra = "".join(f", {label} {logs['eval_' + key]:.3f}" for key, label in POSTFIX[1:] if "eval_" + key in logs)
                self.bar.write(f"  step {state.global_step}: held-out loss {logs['eval_loss']:.4f}{extra}")

        def on_train_end(self, args, state, control, **kwargs):
            if self.bar is not None:
                self.bar.close()

        def close(self):
            if self.bar is not None:
                self.bar.close()
            self.handle.close()

    return RunLog()


# ------------------------------------------------------------------ trainer


def common_args(recipe: Recipe, run_dir: Path, device: str, total_steps: int, max_steps: int | None) -> dict[str, Any]:
    """The transformers.TrainingArguments both trainers (DPO, SFT) take from a recipe."""
    from pipeline.model import precision

    t = recipe.train
    on_gpu = device == "cuda"
    autocast = precision(recipe, device).autocast
    optim = t.optim
    if optim == "auto":
        optim = "adamw_8bit" if on_gpu else "adamw_torch"
    eval_steps = max(1, math.ceil(total_steps * t.eval_every)) if t.eval_every > 0 else None
    return dict(
        output_dir=str(run_dir / "checkpoints"),
        learning_rate=t.learning_rate,
        num_train_epochs=t.epochs,
        max_steps=max_steps if max_steps is not None else t.max_steps,
        per_device_train_batch_size=t.batch_size,
        per_device_eval_batch_size=EVAL_BATCH,
        gradient_accumulation_steps=t.grad_accum,
        warmup_steps=t.warmup_steps,
        lr_scheduler_type=t.scheduler,
        weight_decay=t.weight_decay,
        optim=optim,
        gradient_checkpointing=t.gradient_checkpointing,
        max_length=recipe.data.max_length,
        logging_steps=t.logging_steps,
        eval_strategy="steps" if eval_steps else "no",
        eval_steps=eval_steps,
        save_strategy="steps" if t.save_every > 0 else "no",
        save_steps=t.save_every if t.save_every > 0 else None,
        save_total_limit=None,  # pipeline.guard prunes, after a checkpoint is marked complete
        logging_nan_inf_filter=False,  # a NaN loss must be seen, not averaged away
        train_sampling_strategy="sequential" if t.group_by_length else "random",
        prediction_loss_only=True,  # else TRL reruns a full-logits forward per eval batch for compute_metrics
        seed=t.seed,
        data_seed=t.seed,
        bf16=autocast == "bf16",
        fp16=autocast == "fp16",
        use_cpu=not on_gpu,
        report_to="none",
        disable_tqdm=True,
        dataloader_num_workers=0,
    )


def dpo_args(recipe: Recipe, run_dir: Path, device: str, total_steps: int, max_steps: int | None = None):
    """Translate the recipe into trl.DPOConfig."""
    from trl import DPOConfig

    return DPOConfig(
        **common_args(recipe, run_dir, device, total_steps, max_steps),
        beta=recipe.train.beta,
        loss_type=[recipe.train.loss_type],
        precompute_ref_log_probs=False,  # pipeline.reference does it, cached on disk, then switches TRL to it
    )


def planned_steps(recipe: Recipe, n_pairs: int, max_steps: int | None) -> int:
    t = recipe.train
    steps = max_steps if max_steps is not None else t.max_steps
    if steps and steps > 0:
        return steps
    per_epoch = math.ceil(math.ceil(n_pairs / t.batch_size) / t.grad_accum)
    return max(1, math.ceil(per_epoch * t.epochs))


def eval_block(metrics: dict[str, float]) -> dict[str, float]:
    return {name: float(metrics[key]) for name, key in EVAL_KEYS.items()}


def count_parameters(model) -> tuple[int, int]:
    if hasattr(model, "get_nb_trainable_parameters"):  # PEFT counts 4-bit packed weights correctly
        trainable, total = model.get_nb_trainable_parameters()
        return int(trainable), int(total)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return trainable, total


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


@dataclass
class Prepared:
    """Everything checked before a model weight is loaded."""

    recipe: Recipe
    backend: Any
    path: str
    tokenizer: Any
    train_rows: list[dict[str, str]]
    eval_rows: list[dict[str, str]]
    lengths: Any


def prepare(recipe: Recipe) -> Prepared:
    """Validate recipe, data and model location, and load the tokenizer; no model weights yet."""
    from pipeline import model as model_mod

    cfg.validate(recipe)
    backend = model_mod.resolve_backend(recipe)
    train_pairs, eval_pairs = data_mod.load_splits(recipe.data)
    path = model_mod.resolve_model_path(recipe.model.name_or_path, recipe.model.allow_pickle_weights)
    if recipe.model.adapter:
        from pipeline import adapters

        adapter_dir = adapters.resolve(recipe.model.adapter)
        if (Path(path) / "config.json").is_file():
            adapters.check_fits(adapter_dir, json.loads((Path(path) / "config.json").read_text()), path)
        # pin `runs:<recipe>` to the folder it means now, so recipe.json always names the same twin
        recipe = replace(recipe, model=replace(recipe.model, adapter=str(adapter_dir.resolve())))
    tokenizer = model_mod.load_tokenizer(recipe, path)
    system = recipe.data.system_prompt
    train_rows = data_mod.templated(tokenizer, train_pairs, system)
    eval_rows = data_mod.templated(tokenizer, eval_pairs, system)
    lengths = data_mod.check_lengths(tokenizer, train_rows, train_pairs, recipe.data.max_length, "data.train")
    eval_lengths = data_mod.check_lengths(tokenizer, eval_rows, eval_pairs, recipe.data.max_length, "data.eval")
    t = recipe.train
    if t.group_by_length:  # training reads rows in this order (sequential sampler)
        train_order = data_mod.grouped_order(lengths.lengths, t.batch_size, t.seed)
    else:
        train_order = list(range(len(train_rows)))  # the trainer's random sampler shuffles
    # evaluation reads rows sorted by length, in the same batches as the reference pass
    eval_order = sorted(range(len(eval_rows)), key=lambda i: eval_lengths.lengths[i])
    return Prepared(recipe, backend, path, tokenizer, [train_rows[i] for i in train_order],
                    [eval_rows[i] for i in eval_order], lengths)


def _open_run(recipe: Recipe, run_dir, resume, force: bool) -> tuple[Path, bool]:
    """(a new run folder, False), or (the run folder to resume, True) once its recipe is checked."""
    if resume is None:
        return runs.new_run_dir(recipe.name, str(run_dir) if run_dir else None), False
    folder = Path(resume) if resume != "latest" else runs.latest_unfinished(recipe.name)
    if not (folder / "recipe.json").is_file():
        raise UserError(f"--resume {folder}: not a twin-dpo run folder (no recipe.json)")
    if (folder / "summary.json").is_file() and runs.read_json(folder / "summary.json").get("status") == "completed":
        raise UserError(f"--resume {folder}: that run already finished (summary.json); start a new run instead")
    changed = guard.changed_fields(runs.read_json(folder / "recipe.json"), cfg.to_dict(recipe))
    if changed and not force:
        raise UserError(f"--resume {folder}: the recipe changed since the run started: {'; '.join(changed)}; "
                        "resume with the run's own settings, or add --force to continue with the new ones")
    return folder, True


def train(recipe: Recipe, run_dir: str | Path | None = None, max_steps: int | None = None, inspect: Any = None,
          resume: str | Path | None = None, force: bool = False, extra_callbacks: list | None = None,
          ) -> tuple[dict[str, Any], Path]:
    """Run DPO for `recipe`; returns (summary, run folder). The folder is made only after all checks pass.

    `max_steps` overrides train.max_steps (and is recorded in recipe.json). `resume`: a run folder, or
    "latest" for the newest unfinished run of this recipe; it continues from the newest complete checkpoint.
    `inspect(trainer)`, if given, is called after training (tests look at the reference adapter there).
    """
    wall_start = time.perf_counter()
    from pipeline import model as model_mod

    if model_mod.resolve_backend(recipe).name == "unsloth":
        model_mod.import_unsloth()  # before transformers, trl and peft: Unsloth patches them on import
    allocator = tune_allocator()
    quiet_libraries()
    if max_steps is not None:
        recipe = replace(recipe, train=replace(recipe.train, max_steps=max_steps))
    prep = prepare(recipe)
    recipe = prep.recipe
    run_dir, resuming = _open_run(recipe, run_dir, resume, force)
    with guard.RunLock(run_dir):
        checkpoint = None
        if resuming:  # under the lock: a checkpoint torn by a kill is dropped, the newest complete one is used
            guard.prune(run_dir / "checkpoints", recipe.train.keep_checkpoints)
            checkpoint = guard.latest_checkpoint(run_dir / "checkpoints")
        summary, folder = _train_locked(prep, run_dir, checkpoint, wall_start, inspect, extra_callbacks or [])
    summary["allocator"] = allocator
    runs.write_json_atomic(folder / "summary.json", summary)
    return summary, folder


def _train_locked(prep: Prepared, run_dir: Path, checkpoint: Path | None, wall_start: float, inspect, extra) -> tuple[dict, Path]:
    recipe, backend = prep.recipe, prep.backend
    print(f"[twin-dpo] {recipe.name}: run folder {run_dir}" + (f", resuming from {checkpoint.name}" if checkpoint else ""),
          flush=True)
    threads = set_threads(recipe.train.threads)
    from pipeline.model import precision

    prec = precision(recipe, backend.device)
    print(f"[twin-dpo] backend: {backend.name} ({backend.reason}); device: {runs.device_name(backend.device)}; "
          f"{prec.describe()}; threads: {threads}", flush=True)
    if prep.lengths.truncated:
        print(f"[twin-dpo] note: {prep.lengths.truncated} of {prep.lengths.pairs} train pairs are longer than "
              f"data.max_length={recipe.data.max_length} and will be cut", flush=True)
    runs.write_text_atomic(run_dir / "recipe.json", cfg.dumps(recipe))
    step0 = int(checkpoint.name.split("-")[-1]) if checkpoint else 0
    runs.keep_metrics_until(run_dir, step0 if checkpoint else -1)

    from datasets import Dataset
    from trl import DPOTrainer

    from pipeline import model as model_mod

    load_start = time.perf_counter()
    loaded = model_mod.load(recipe, backend, tokenizer=prep.tokenizer)
    load_seconds = time.perf_counter() - load_start

    total_steps = planned_steps(recipe, len(prep.train_rows), None)
    args = dpo_args(recipe, run_dir, backend.device, total_steps, None)
    log = callbacks(run_dir, total_steps)
    watch = guard.callback(run_dir / "checkpoints", recipe.train.keep_checkpoints, prec.autocast or "fp32")
    train_start = time.perf_counter()
    trainer = DPOTrainer(
        model=loaded.model,
        ref_model=loaded.ref_model,
        args=args,
        train_dataset=Dataset.from_list(prep.train_rows),
        eval_dataset=Dataset.from_list(prep.eval_rows),
        processing_class=loaded.tokenizer,
        peft_config=loaded.peft_config,
        callbacks=[log, watch, *extra],
    )
    from transformers.trainer_callback import PrinterCallback

    trainer.remove_callback(PrinterCallback)
    if recipe.model.adapter and loaded.ref_model is None:
        from pipeline import adapters

        adapters.ensure_reference_copy(trainer.model)
    head = "completion-only (pipeline.fast)" if recipe.train.fast_head and fast.install_on_trainer(trainer) else "TRL's fused head"
    reference_info: dict[str, Any] = {"reference_cache": None, "reference_reused": False, "reference_forward_passes": None,
                                      "reference_seconds": 0.0}
    if recipe.train.precompute_ref:
        reference_info = reference.attach(trainer, reference.default_cache_dir())
        if trainer.ref_model is not None:  # full DPO: its log-probs are stored, the copy can go
            trainer.ref_model = None
            loaded.ref_model = None
        how = "reused from" if reference_info["reference_reused"] else "computed and cached in"
        print(f"[twin-dpo] reference log-probs {how} {reference_info['reference_cache']} ({reference_info['reference_seconds']:.0f} s)", flush=True)
    eval_timer = time_evaluations(trainer)
    watch.install_signals()
    try:
        if checkpoint is None:
            print("[twin-dpo] held-out evaluation of the untouched twin", flush=True)
            before = eval_block(trainer.evaluate())
        else:  # measured when the run started
            before = eval_block(next(r for r in runs.read_metrics(run_dir) if "eval_loss" in r and r.get("step") == 0))
        trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint else None)
        if watch.diverged:
            _diverged(run_dir, recipe, watch.diverged)
        if watch.signum is not None:
            raise guard.Interrupted(watch.signum, guard.latest_checkpoint(run_dir / "checkpoints"))
        # the periodic evaluation may have just run at the final step: reuse it rather than pay twice
        evaluated_at_end = [r for r in trainer.state.log_history if "eval_loss" in r and r.get("step") == trainer.state.global_step]
        after = eval_block(evaluated_at_end[-1] if evaluated_at_end else trainer.evaluate())
        eval_seconds = eval_timer()
        train_seconds = time.perf_counter() - train_start - eval_seconds
        if inspect is not None:
            inspect(trainer)
        artifact = _save_policy(trainer.model, loaded.tokenizer, recipe, run_dir)
    except OSError as err:
        if not guard.is_disk_full(err):
            raise
        guard.prune(run_dir / "checkpoints", recipe.train.keep_checkpoints)  # drop the torn folder, keep the rest
        last = guard.latest_checkpoint(run_dir / "checkpoints")
        raise UserError(guard.disk_full_message(err, run_dir, last)) from None
    finally:
        watch.restore_signals()
        log.close()

    state = trainer.state
    pairs_seen = (state.global_step - step0) * recipe.train.batch_size * recipe.train.grad_accum
    if args.max_steps <= 0:  # epoch-bound: the last batch of an epoch may be short
        pairs_seen = min(pairs_seen, math.ceil(len(prep.train_rows) * recipe.train.epochs))
    tokens = trainer._total_train_tokens
    trainable, total = count_parameters(trainer.model)
    peak, peak_kind = runs.peak_memory(backend.device)
    train_logs = [row for row in state.log_history if "loss" in row]
    summary = {
        "status": "completed",
        "recipe": recipe.name,
        "method": recipe.method,
        "load_in_4bit": recipe.model.load_in_4bit,
        "twin_adapter": recipe.model.adapter,
        "reference": _reference_kind(recipe)
        + ("; its log-probs computed once before training" if recipe.train.precompute_ref else "; run at every step"),
        **reference_info,
        "lm_head": head,
        "backend": backend.name,
        "backend_reason": backend.reason,
        "device": runs.device_name(backend.device),
        "precision": prec.describe(),
        "model_path": loaded.path,
        "steps": state.global_step,
        "resumed_from_step": step0 or None,
        "pairs_trained": pairs_seen,
        "tokens_trained": tokens,
        "wall_seconds": round(time.perf_counter() - wall_start, 2),
        "load_seconds": round(load_seconds, 2),
        "train_seconds": round(train_seconds, 2),
        "eval_seconds": round(eval_seconds, 2),
        "pairs_per_second": round(pairs_seen / train_seconds, 4),
        "tokens_per_second": round(tokens / train_seconds, 2),
        "mean_tokens_per_sequence": round(prep.lengths.mean_tokens, 1),
        "peak_memory_bytes": peak,
        "peak_memory_kind": peak_kind,
        "trainable_parameters": trainable,
        "total_parameters": total,
        "final_train_loss": train_logs[-1]["loss"] if train_logs else None,
        "eval_pairs": len(prep.eval_rows),
        "eval_before": before,
        "eval_after": after,
        "artifact": artifact,
        "versions": runs.versions(),
    }
    runs.write_json_atomic(run_dir / "summary.json", summary)
    return summary, run_dir


def _save_policy(policy, tokenizer, recipe: Recipe, run_dir: Path) -> str:
    """The trained policy, written atomically: an adapter (never the frozen reference copy) or a full model."""
    artifact = "adapter" if recipe.method == "lora" else "model"
    with runs.atomic_dir(run_dir / artifact) as tmp:
        if artifact == "adapter":
            policy.save_pretrained(tmp, safe_serialization=True, selected_adapters=["default"])
        else:
            policy.save_pretrained(tmp, safe_serialization=True)
            tokenizer.save_pretrained(tmp)
    return artifact


def _diverged(run_dir: Path, recipe: Recipe, message: str) -> None:
    """Record the divergence (no adapter is saved from it) and stop with the distinct exit status."""
    last = guard.latest_checkpoint(run_dir / "checkpoints")
    runs.write_json_atomic(run_dir / "summary.json", {
        "status": "diverged", "recipe": recipe.name, "message": message,
        "last_good_checkpoint": str(last) if last else None, "versions": runs.versions()})
    where = f"the last good checkpoint is {last}" if last else "no checkpoint was saved before it"
    raise guard.Diverged(f"training diverged at {message}; {where}; nothing from the diverged step was saved")


def _twin_adapter(recipe: Recipe):
    if not recipe.model.adapter:
        return None
    from pipeline import adapters

    return adapters.resolve(recipe.model.adapter)


def _reference_kind(recipe: Recipe) -> str:
    if recipe.model.adapter:
        if recipe.model.twin_reference == "merged-copy":
            return "the twin adapter merged into a separate full copy of the base"
        return "a frozen copy of the twin adapter on the shared base (one base in memory, two adapters)"
    return "base with the adapter switched off" if recipe.method == "lora" else "separate frozen copy of the model"


def describe(summary: dict[str, Any], run_dir: Path) -> str:
    b, a = summary["eval_before"], summary["eval_after"]
    return "\n".join([
        f"done: {summary['steps']} steps, {summary['pairs_trained']} pairs in {summary['train_seconds']:.0f} s "
        f"({summary['pairs_per_second']:.2f} pairs/s, {summary['tokens_per_second']:.0f} tokens/s); "
        f"model load {summary['load_seconds']:.0f} s, evaluation {summary['eval_seconds']:.0f} s; "
        f"peak memory {runs.human_bytes(summary['peak_memory_bytes'])}",
        f"held-out ({summary['backend']}): reward accuracy {b['reward_accuracy']:.3f} -> {a['reward_accuracy']:.3f}, "
        f"margin {b['reward_margin']:.4f} -> {a['reward_margin']:.4f}, loss {b['loss']:.4f} -> {a['loss']:.4f}",
        f"trainable parameters: {summary['trainable_parameters']:,} of {summary['total_parameters']:,}",
        f"run folder: {run_dir}  ({summary['artifact']}/, metrics.jsonl, summary.json)",
    ])
