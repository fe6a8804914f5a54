"""The plain TRL baseline: LoRA DPO written the way TRL's documentation shows it.

    python benchmarks/trl_baseline.py --run-dir DIR [--max-steps N] [--set key=value ...]

TRL and PEFT defaults throughout (DPOConfig's own: gradient checkpointing on,
the reference run at every step, TRL's LM head, random batches). Only what
must match the twin-dpo run it is compared with is set, read from the same
recipe: model, data, batch size, steps/epochs, LoRA shape, learning rate,
beta, max length, seed and how often to evaluate. On a CPU, TRL's default
bf16=True needs use_cpu=True (transformers' error says so), and on CPUs
without native bf16 it fails outright, so there bf16 is turned off.
Writes the same run-folder files as `pipeline train` (recipe.json, metrics.jsonl,
adapter/, summary.json) so reports can read both. Where TRL evaluated under CPU
bf16 autocast, the final adapter is evaluated once more in float32, as twin-dpo
evaluates, so the held-out comparison is not bf16 noise; TRL's own figures stay
in the summary (eval_after_trl), and peak memory is read before that pass.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pipeline import data as data_mod  # noqa: E402  (only to read the same settings and data)
from pipeline import recipe as cfg  # noqa: E402
from pipeline import storage  # noqa: E402
from pipeline.model import runtime  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", default="dpo_lora")
    parser.add_argument("--run-dir", required=True)
    parser.add_argument("--max-steps", type=int, default=None)
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    args = parser.parse_args()
    wall = time.perf_counter()
    recipe = cfg.validate(cfg.apply_overrides(cfg.load_recipe(args.recipe), args.overrides))
    recipe = replace(recipe, name="trl-baseline")
    run_dir = Path(args.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)

    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    from pipeline.model.backend import cpu_has_bf16
    from pipeline.model.paths import resolve_model_path
    from pipeline.training import exact_eval, twin, work
    from pipeline.training.callbacks import step_clock

    spec = recipe.model.name_or_path
    path = str(twin.model_dir(spec)) if spec.startswith(twin.PREFIX) else resolve_model_path(spec)
    load_start = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(path)
    tokenizer = AutoTokenizer.from_pretrained(path)
    load_seconds = time.perf_counter() - load_start
    train_pairs, eval_pairs = data_mod.load_splits(recipe.data)
    train_dataset = Dataset.from_list(data_mod.templated(tokenizer, train_pairs, recipe.data.system_prompt))
    eval_dataset = Dataset.from_list(data_mod.templated(tokenizer, eval_pairs, recipe.data.system_prompt))

    t = recipe.train
    max_steps = args.max_steps or t.max_steps
    steps = (
        max_steps if max_steps > 0 else math.ceil(math.ceil(len(train_pairs) / t.batch_size) / t.grad_accum * t.epochs)
    )
    extra = {}
    if not torch.cuda.is_available():
        extra["use_cpu"] = True  # what transformers' error asks for with TRL's default bf16=True on a CPU
        if not cpu_has_bf16():
            extra["bf16"] = False  # TRL's default bf16 fails on CPUs without native bf16
    training_args = DPOConfig(
        output_dir=str(run_dir / "checkpoints"),
        per_device_train_batch_size=t.batch_size,
        gradient_accumulation_steps=t.grad_accum,
        num_train_epochs=t.epochs,
        max_steps=max_steps,
        learning_rate=t.learning_rate,
        beta=t.beta,
        max_length=recipe.data.max_length,
        seed=t.seed,
        logging_steps=1,
        eval_strategy="steps" if t.eval_every > 0 else "no",
        eval_steps=max(1, math.ceil(steps * t.eval_every)) if t.eval_every > 0 else None,
        save_strategy="no",
        report_to="none",
        **extra,
    )
    peft_config = LoraConfig(
        r=recipe.lora.r,
        lora_alpha=recipe.lora.alpha,
        lora_dropout=recipe.lora.dropout,
        target_modules=list(recipe.lora.target_modules),
        task_type="CAUSAL_LM",
    )
    train_start = time.perf_counter()
    trainer = DPOTrainer(
        model=model,
        args=training_args,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        processing_class=tokenizer,
        peft_config=peft_config,
    )
    counted = work.install_on_trainer(trainer)  # counts what the model computes (the bench's MFU); changes nothing
    clock = step_clock()  # times each step as twin-dpo's runs do (the bench's steady steps); changes nothing
    trainer.add_callback(clock)
    eval_seconds = time.perf_counter()
    before = trainer.evaluate()
    eval_seconds = time.perf_counter() - eval_seconds
    trainer.train()
    eval_start = time.perf_counter()
    after = trainer.evaluate()
    eval_seconds += time.perf_counter() - eval_start
    eval_seconds += sum(
        r.get("eval_runtime", 0.0) for r in trainer.state.log_history[:-1] if "eval_loss" in r and r["step"] > 0
    )
    train_seconds = time.perf_counter() - train_start - eval_seconds
    # before the float32 re-evaluation below, which is measurement, not part of the baseline
    peak_memory, _ = runtime.peak_memory("cuda" if torch.cuda.is_available() else "cpu")
    after_trl = after
    if exact_eval.install(trainer):
        # On a CPU under bf16 autocast TRL's held-out numbers are bf16 rounding noise at a small update (README,
        # "bf16 and small updates"); ours are computed in float32. The bench compares the learning, so the same
        # final adapter is evaluated again in float32; TRL's own figures stay in the summary as eval_after_trl.
        after = trainer.evaluate()
    trainer.save_model(str(run_dir / "adapter"))

    logs = trainer.state.log_history
    with (run_dir / "metrics.jsonl").open("w") as handle:
        for row in logs:
            handle.write(json.dumps(row) + "\n")
    storage.write_text_atomic(run_dir / "recipe.json", cfg.dumps(recipe))
    pairs = (
        min(trainer.state.global_step * t.batch_size * t.grad_accum, len(train_pairs) * math.ceil(t.epochs))
        if max_steps <= 0
        else trainer.state.global_step * t.batch_size * t.grad_accum
    )
    tokens = max((r.get("num_tokens", 0) for r in logs), default=0)
    trainable, total = trainer.model.get_nb_trainable_parameters()

    def pick(m):
        return {
            "reward_accuracy": m["eval_rewards/accuracies"],
            "reward_margin": m["eval_rewards/margins"],
            "loss": m["eval_loss"],
        }

    summary = {
        "status": "completed",
        "recipe": "trl-baseline",
        "method": "lora",
        "load_in_4bit": False,
        "reference": "base with the adapter switched off (TRL default: run at every step)",
        "backend": "trl-baseline",
        "device": runtime.device_name("cuda" if torch.cuda.is_available() else "cpu"),
        "precision": "bf16 autocast" if training_args.bf16 else "float32",
        "steps": trainer.state.global_step,
        "pairs_trained": pairs,
        "tokens_trained": tokens,
        "wall_seconds": round(time.perf_counter() - wall, 2),
        "load_seconds": round(load_seconds, 2),
        "train_seconds": round(train_seconds, 2),
        "eval_seconds": round(eval_seconds, 2),
        "pairs_per_second": round(pairs / train_seconds, 4),
        "tokens_per_second": round(tokens / train_seconds, 2),
        "peak_memory_bytes": peak_memory,
        "step_seconds": clock.seconds,
        "trainable_parameters": int(trainable),
        "total_parameters": int(total),
        "final_train_loss": next((r["loss"] for r in reversed(logs) if "loss" in r), None),
        "eval_pairs": len(eval_pairs),
        "eval_before": pick(before),
        "eval_after": pick(after),
        "eval_after_trl": pick(after_trl),
        "held_out_precision": "float32 (re-evaluated; TRL's own bf16 figures in eval_after_trl)"
        if after is not after_trl
        else ("bf16 autocast" if training_args.bf16 else "float32"),
        "artifact": "adapter",
        "work": work.total(counted),
        "versions": runtime.versions(),
    }
    storage.write_json_atomic(run_dir / "summary.json", summary)
    print(
        f"trl-baseline: {summary['steps']} steps, {summary['pairs_per_second']} pairs/s, "
        f"held-out reward accuracy {summary['eval_after']['reward_accuracy']:.3f}"
    )


if __name__ == "__main__":
    main()
