"""One DPO run, top-down: recipe -> checks -> run folder -> model -> trl.DPOTrainer -> summary.json.

TRL's trainer is wrapped, not subclassed. For method `lora` the policy is the base plus a fresh adapter and
the reference is the same base with the adapter switched off (TRL does this when given a plain model and a
`peft_config`), so the base weights are in memory once. With a twin adapter (`model.adapter`) the policy is a
trainable copy of it and the reference a frozen copy on the same base.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

from pipeline.model import adapters
from pipeline.model.backend import precision
from pipeline.recipe import Recipe
from pipeline.storage import human_bytes
from pipeline.training import (
    arguments,
    compiled,
    distributed,
    exact_eval,
    fast_head,
    held_weights,
    lean_linear,
    lean_norm,
    reference,
    twin,
    work,
)
from pipeline.training.callbacks import run_log, step_clock
from pipeline.training.prepare import Prepared, announce, begin, load_model, prepare, with_max_steps
from pipeline.training.run import Run

EVAL_KEYS = {"reward_accuracy": "eval_rewards/accuracies", "reward_margin": "eval_rewards/margins", "loss": "eval_loss"}


def _install_head(trainer, recipe) -> str:
    """The completion-only LM head where it applies; where it does not on a CPU, the run says why."""
    t = recipe.train
    packing = t.prefix_sharing if t.padding_free else None
    if t.fast_head and fast_head.install_on_trainer(trainer, packing):
        layout = {None: "", False: "; padding-free pairs", True: "; padding-free pairs, prompt shared"}[packing]
        return f"completion-only (training/fast_head.py){layout}"
    model = trainer.accelerator.unwrap_model(trainer.model)
    reason = fast_head.decline_reason(adapters.transformers_model(model))
    if reason and recipe.train.fast_head and next(model.parameters()).device.type != "cuda":
        print(
            f"[twin-dpo] LM head: TRL's, not the completion-only one, because {reason}; the reference pass and each "
            "step compute logits over the whole vocabulary (slower, more memory)",
            flush=True,
        )
        return f"TRL's fused head ({reason})"
    return "TRL's fused head"


def _install_compile(trainer, recipe, backend: str) -> str:
    """train.compile on the hf backend (Unsloth brings its own compiled kernels)."""
    if not recipe.train.compile:
        return "off"
    if backend == "unsloth":
        return "off (Unsloth's own kernels)"
    what = compiled.install(trainer.accelerator.unwrap_model(trainer.model))
    print(f"[twin-dpo] torch.compile: {what}; the first steps include the compile time", flush=True)
    return what


def _install_lean(trainer, recipe, backend: str, autocast: str | None) -> tuple[int, int, int]:
    """Shared input casts, no kept weight copies and gated MLPs that keep two tensors less, under autocast
    (training/lean_linear.py: the same numbers, less memory), and RMSNorms that keep a bf16 copy of their input
    (training/lean_norm.py, its own lever); returns (linears, MLPs, norms) switched. Not under torch.compile
    (inductor plans its own buffers) nor with Unsloth (its own kernels), and not without autocast, where each
    layer would only fall through to its own forward (the summary then counts 0)."""
    if recipe.train.compile or backend == "unsloth" or not autocast:
        return 0, 0, 0
    model = trainer.accelerator.unwrap_model(trainer.model)
    return lean_linear.install(model), lean_linear.install_mlps(model), lean_norm.install(model)


def _hold_frozen(trainer, lean: int, autocast: str | None, folder: Path) -> held_weights.Held | None:
    """The frozen float32 weights of the lean linears held in the autocast dtype for the run
    (training/held_weights.py): no per-step casts, the same numbers. A single process on the CPU only.
    TWIN_DPO_FROZEN_BF16=0 keeps them float32 (the bench's lever table measures it)."""
    if not lean or autocast not in ("bf16", "fp16") or distributed.active():
        return None
    if os.environ.get("TWIN_DPO_FROZEN_BF16", "1").strip() == "0":
        return None
    return held_weights.hold(lean_linear.linears(trainer.accelerator.unwrap_model(trainer.model)), autocast, folder)


def train(
    recipe: Recipe,
    run_dir: str | Path | None = None,
    max_steps: int | None = None,
    inspect: Any = None,
    resume: str | Path | None = None,
    force: bool = False,
    extra_callbacks: list | None = None,
    held_out: bool = True,
) -> tuple[dict[str, Any], Path]:
    """Run DPO for `recipe`; returns (summary, run folder). The folder is made only after all checks pass.

    `max_steps` overrides train.max_steps (and is recorded in recipe.json). `resume`: a run folder, or
    "latest" for the newest unfinished run of this recipe; it continues from the newest complete checkpoint.
    `inspect(trainer)`, if given, is called after training (tests look at the reference adapter there).
    `held_out=False` (`train --no-eval`, a smoke test): no held-out evaluation and no reference pass over the
    held-out pairs; the summary's eval_before / eval_after are None.
    """
    started = time.perf_counter()
    recipe = with_max_steps(recipe, max_steps)
    allocator = begin(recipe)
    with distributed.main_first():  # rank 0 builds what is built once (the twin); the others then find it
        prep = prepare(recipe)
    recipe, backend = prep.recipe, prep.backend
    prec = precision(recipe, backend.device)
    with Run.open(recipe, run_dir, resume, force, prec.autocast, started) as run:
        announce(prep, run)
        print(
            f"[twin-dpo] model: {model_description(recipe, prep.path)}; reference: {reference_kind(recipe)}", flush=True
        )
        loaded = load_model(prep, run)
        run.start_clock()
        clock = step_clock()
        trainer, log = build_trainer(prep, run, loaded, [clock, *(extra_callbacks or [])], held_out)
        head = _install_head(trainer, recipe)
        kernels = _install_compile(trainer, recipe, prep.backend.name)
        lean, lean_mlps, lean_norms = _install_lean(trainer, recipe, prep.backend.name, prec.autocast)
        held = _hold_frozen(trainer, lean, prec.autocast, run.path)
        held_out_fp32 = exact_eval.install(trainer)  # after the head: it wraps whichever forward is in place
        counted = work.install_on_trainer(trainer)  # what the model really computes, for the bench's MFU
        reference_info = attach_reference(trainer, recipe, loaded)
        run.timings["reference_eval_seconds"] = reference_info["reference_eval_seconds"]  # evaluation, not training
        if recipe.train.report_to != "none":  # the tracker shows where the reference came from, beside the curves
            trainer.log(_reference_status(reference_info))
        try:
            before, after = run.fit(trainer, eval_block if held_out else None)
        finally:
            log.close()
            if held is not None:  # what follows (saving, answers, export) reads the float32 weights
                held.restore()
        if inspect is not None:
            inspect(trainer)
        artifact = run.save_policy(trainer.model, loaded.tokenizer)
        summary = run.summary(
            trainer,
            backend,
            prec,
            loaded.path,
            "pairs",
            len(prep.train_rows),
            before,
            after,
            model=model_description(recipe, loaded.path),
            twin_adapter=recipe.model.adapter,
            reference=reference_kind(recipe),
            **reference_info,
            lm_head=head,
            compiled=kernels,
            lean_linears=lean,
            lean_mlps=lean_mlps,
            lean_norms=lean_norms,
            frozen_weights=held.describe() if held is not None else None,
            step_seconds=clock.seconds,
            held_out_precision="float32" if held_out_fp32 else (prec.autocast or "float32"),
            mean_tokens_per_sequence=round(prep.lengths.mean_tokens, 1),
            eval_pairs=len(prep.eval_rows) if held_out else 0,
            artifact=artifact,
            allocator=allocator,
            work=work.total(counted),
        )
        run.finish(summary)
    return summary, run.path


def build_trainer(prep: Prepared, run: Run, loaded, extra_callbacks: list, held_out: bool = True):
    """(trl.DPOTrainer on the prepared rows, our progress log): the log and the guard replace TRL's printer.
    Without `held_out` the trainer gets no held-out set and never evaluates."""
    from datasets import Dataset
    from transformers.trainer_callback import PrinterCallback
    from trl import DPOTrainer

    recipe = prep.recipe
    total_steps = arguments.planned_steps(recipe, len(prep.train_rows))
    log = run_log(run.path, total_steps, "DPO", main=distributed.is_main())
    trainer = DPOTrainer(
        model=loaded.model,
        ref_model=loaded.ref_model,
        args=arguments.dpo_args(
            recipe,
            run.path,
            prep.backend.device,
            total_steps,
            reference.eval_batch_size(len(prep.eval_rows)),
            evaluate=held_out,
        ),
        train_dataset=Dataset.from_list(prep.train_rows),
        eval_dataset=Dataset.from_list(prep.eval_rows) if held_out else None,
        processing_class=loaded.tokenizer,
        peft_config=loaded.peft_config,
        callbacks=[log, run.guard, *extra_callbacks],
    )
    trainer.remove_callback(PrinterCallback)
    if recipe.model.adapter and loaded.ref_model is None:
        adapters.ensure_reference_copy(trainer.model)
    return trainer, log


def attach_reference(trainer, recipe: Recipe, loaded) -> dict[str, Any]:
    """Reference log-probs computed once (or read from the cache) so the reference never runs in training."""
    if not recipe.train.precompute_ref:
        return {
            "reference_cache": None,
            "reference_reused": False,
            "reference_forward_passes": None,
            "reference_pairs_computed": 0,
            "reference_train_pairs_cached": 0,
            "reference_seconds": 0.0,
            "reference_eval_seconds": 0.0,
        }
    info = reference.attach(trainer, reference.default_cache_dir())
    if trainer.ref_model is not None:  # full DPO: its log-probs are stored, the copy can go
        trainer.ref_model = None
        loaded.ref_model = None
    n_train = len(trainer.train_dataset)
    cached = info["reference_train_pairs_cached"]
    later = f"; the other {n_train - cached} train pairs when a run reads them" if cached < n_train else ""
    how = (
        "reused from"
        if info["reference_reused"]
        else f"computed for {info['reference_pairs_computed']} pairs the run reads{later}, cached in"
    )
    held = info["reference_eval_seconds"]
    seconds = f"{info['reference_seconds']:.0f} s" + (f", of which {held:.0f} s for the held-out pairs" if held else "")
    print(f"[twin-dpo] reference log-probs {how} {info['reference_cache']} ({seconds})", flush=True)
    return info


def _reference_status(info: dict[str, Any]) -> dict[str, float]:
    """attach_reference's report as tracker scalars: reference/reused, reference/seconds, reference/forward_passes."""
    keep = ("reused", "seconds", "forward_passes")
    return {f"reference/{k}": float(info[f"reference_{k}"]) for k in keep if info.get(f"reference_{k}") is not None}


def eval_block(metrics: dict[str, float]) -> dict[str, float]:
    return {name: float(metrics[key]) for name, key in EVAL_KEYS.items()}


def reference_kind(recipe: Recipe) -> str:
    if recipe.model.adapter:
        if recipe.model.twin_reference == "merged-copy":
            kind = "the twin adapter merged into a separate full copy of the base"
        else:
            kind = "a frozen copy of the twin adapter on the shared base (one base in memory, two adapters)"
    else:
        kind = (
            "the same model with the adapter switched off"
            if recipe.method == "lora"
            else "separate frozen copy of the model"
        )
    return kind + (
        "; its log-probs computed once before training" if recipe.train.precompute_ref else "; run at every step"
    )


def model_description(recipe: Recipe, path: str) -> str:
    """What the policy starts from, in words: the embedded twin's recipe, a twin adapter, or the model named."""
    made = twin.describe(path)
    if made:
        spec = made.get("spec") or f"twin:{made.get('sft_recipe', '?')}"  # twin.json of an earlier build had no spec
        return f"{spec}, the twin: {made['what']} ({path})"
    if recipe.model.adapter:
        return f"{recipe.model.name_or_path} with the twin adapter {recipe.model.adapter}"
    return f"{recipe.model.name_or_path} ({path})" if path != recipe.model.name_or_path else path


def describe(summary: dict[str, Any], run_dir: Path) -> str:
    b, a = summary["eval_before"], summary["eval_after"]
    held = (
        f"held-out ({summary['backend']}, computed in {summary.get('held_out_precision', 'float32')}): "
        f"reward accuracy {_num(b, 'reward_accuracy', 3)} -> {_num(a, 'reward_accuracy', 3)}, "
        f"margin {_num(b, 'reward_margin', 4)} -> {_num(a, 'reward_margin', 4)}, "
        f"loss {_num(b, 'loss', 4)} -> {_num(a, 'loss', 4)}"
        if a is not None
        else "held-out: not evaluated (--no-eval)"
    )
    return "\n".join(
        [
            f"model: {summary['model']}; reference: {summary['reference']}",
            f"done: {summary['steps']} steps, {summary['pairs_trained']} pairs in {summary['train_seconds']:.0f} s "
            f"({summary['pairs_per_second']:.2f} pairs/s, {summary['tokens_per_second']:.0f} tokens/s); "
            f"model load {summary['load_seconds']:.0f} s, evaluation {summary['eval_seconds']:.0f} s; "
            f"peak memory {human_bytes(summary['peak_memory_bytes'])}",
            held,
            f"trainable parameters: {summary['trainable_parameters']:,} of {summary['total_parameters']:,}",
            f"run folder: {run_dir}  ({summary['artifact']}/, metrics.jsonl, summary.json)",
        ]
    )


def _num(block: dict | None, key: str, digits: int) -> str:
    """One held-out figure; "not measured" where the block is missing (a resumed run started with --no-eval)."""
    return f"{block[key]:.{digits}f}" if block is not None else "not measured"
