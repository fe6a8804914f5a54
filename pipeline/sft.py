"""`python -m pipeline sft recipes/sft_twin.py`: make the twin, a LoRA SFT adapter in the author's voice.

TRL's SFTTrainer on prompt/completion conversations (the chat template applied,
the loss on the answer tokens only). The corpus is the author's side of the
preference data: each train-split prompt with its `chosen` answer; the held-out
split is never trained on and gives the held-out loss and perplexity before
and after. The run folder is laid out like a DPO run's (adapter/, metrics.jsonl,
summary.json), so `model.adapter=runs:sft-twin` can pick it up.
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

from pipeline import config as cfg
from pipeline import data as data_mod
from pipeline import runs
from pipeline.config import Recipe


def conversations(pairs, system_prompt: str | None) -> list[dict[str, Any]]:
    return [{"prompt": data_mod.messages(p, system_prompt), "completion": [{"role": "assistant", "content": p.chosen}]}
            for p in pairs]


def _block(metrics: dict[str, float]) -> dict[str, float]:
    return {"loss": float(metrics["eval_loss"]), "perplexity": float(math.exp(metrics["eval_loss"]))}


def sft(recipe: Recipe, run_dir: str | Path | None = None, max_steps: int | None = None) -> tuple[dict[str, Any], Path]:
    from pipeline import model as model_mod
    from pipeline import train as train_mod

    wall_start = time.perf_counter()
    cfg.validate(recipe)
    if recipe.method != "sft":
        from pipeline.errors import UserError

        raise UserError(f"method: `sft` trains recipes with method 'sft', this one has {recipe.method!r}; use `train`")
    train_mod.quiet_libraries()
    prep = train_mod.prepare(recipe)  # the same checks as DPO: data rows, lengths, model path, tokenizer
    train_pairs, eval_pairs = data_mod.load_splits(recipe.data)
    run_dir = runs.new_run_dir(recipe.name, str(run_dir) if run_dir else None)
    threads = train_mod.set_threads(recipe.train.threads)
    prec = model_mod.precision(recipe, prep.backend.device)
    print(f"[twin-dpo] {recipe.name}: run folder {run_dir}; backend {prep.backend.name}; {prec.describe()}; threads {threads}", flush=True)
    runs.write_text_atomic(run_dir / "recipe.json", cfg.dumps(recipe))

    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    load_start = time.perf_counter()
    loaded = model_mod.load(recipe, prep.backend, tokenizer=prep.tokenizer)
    load_seconds = time.perf_counter() - load_start
    total_steps = train_mod.planned_steps(recipe, len(train_pairs), max_steps)
    args = SFTConfig(**train_mod.common_args(recipe, run_dir, prep.backend.device, total_steps, max_steps),
                     completion_only_loss=True)
    log = train_mod.callbacks(run_dir, total_steps, desc="SFT")
    train_start = time.perf_counter()
    trainer = SFTTrainer(model=loaded.model, args=args, processing_class=loaded.tokenizer, peft_config=loaded.peft_config,
                         train_dataset=Dataset.from_list(conversations(train_pairs, recipe.data.system_prompt)),
                         eval_dataset=Dataset.from_list(conversations(eval_pairs, recipe.data.system_prompt)),
                         callbacks=[log])
    from transformers.trainer_callback import PrinterCallback

    trainer.remove_callback(PrinterCallback)
    eval_timer = train_mod.time_evaluations(trainer)
    try:
        before = _block(trainer.evaluate())
        trainer.train()
        after = _block(trainer.evaluate())
    finally:
        log.close()
    eval_seconds = eval_timer()
    train_seconds = time.perf_counter() - train_start - eval_seconds
    with runs.atomic_dir(run_dir / "adapter") as tmp:
        trainer.model.save_pretrained(tmp, safe_serialization=True)
    trainable, total = train_mod.count_parameters(trainer.model)
    peak, peak_kind = runs.peak_memory(prep.backend.device)
    state = trainer.state
    examples = min(state.global_step * recipe.train.batch_size * recipe.train.grad_accum,
                   math.ceil(len(train_pairs) * recipe.train.epochs)) if args.max_steps <= 0 else \
        state.global_step * recipe.train.batch_size * recipe.train.grad_accum
    summary = {
        "status": "completed", "recipe": recipe.name, "method": "sft", "load_in_4bit": recipe.model.load_in_4bit,
        "backend": prep.backend.name, "backend_reason": prep.backend.reason, "device": runs.device_name(prep.backend.device),
        "precision": prec.describe(), "model_path": loaded.path, "steps": state.global_step,
        "examples_trained": examples, "train_examples": len(train_pairs), "eval_examples": len(eval_pairs),
        "wall_seconds": round(time.perf_counter() - wall_start, 2), "load_seconds": round(load_seconds, 2),
        "train_seconds": round(train_seconds, 2), "eval_seconds": round(eval_seconds, 2),
        "examples_per_second": round(examples / train_seconds, 4),
        "peak_memory_bytes": peak, "peak_memory_kind": peak_kind,
        "trainable_parameters": trainable, "total_parameters": total,
        "eval_before": before, "eval_after": after, "artifact": "adapter", "versions": runs.versions(),
    }
    runs.write_json_atomic(run_dir / "summary.json", summary)
    return summary, run_dir


def describe(summary: dict[str, Any], run_dir: Path) -> str:
    b, a = summary["eval_before"], summary["eval_after"]
    return (f"done: {summary['steps']} steps, {summary['examples_trained']} examples in {summary['train_seconds']:.0f} s; "
            f"held-out loss {b['loss']:.3f} -> {a['loss']:.3f} (perplexity {b['perplexity']:.2f} -> {a['perplexity']:.2f}) "
            f"on the author's {summary['eval_examples']} held-out answers; peak memory "
            f"{runs.human_bytes(summary['peak_memory_bytes'])}\nrun folder: {run_dir}  (adapter/ is the twin)")
