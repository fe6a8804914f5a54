"""`python -m pipeline sft recipes/sft_twin.py`: make the twin, a LoRA SFT adapter in the author's voice.

TRL's SFTTrainer on prompt/completion conversations (the chat template applied, the loss on the answer tokens
only). The corpus is the author's side of the preference data: each train-split prompt with its `chosen`
answer; the held-out split is never trained on and gives the held-out loss and perplexity before and after.
The run protocol is DPO's (training/run.py): lock, complete-marked checkpoints, --resume, divergence stop,
atomic summary; so `model.adapter=runs:sft-twin` can pick the run up.
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

from pipeline import data as data_mod
from pipeline.errors import UserError
from pipeline.model.backend import precision
from pipeline.recipe import Recipe
from pipeline.storage import human_bytes
from pipeline.training import arguments, distributed
from pipeline.training.callbacks import run_log
from pipeline.training.prepare import announce, begin, load_model, prepare, with_max_steps
from pipeline.training.run import Run


def conversations(pairs, system_prompt: str | None) -> list[dict[str, Any]]:
    return [
        {"prompt": data_mod.messages(p, system_prompt), "completion": [{"role": "assistant", "content": p.chosen}]}
        for p in pairs
    ]


def eval_block(metrics: dict[str, float]) -> dict[str, float]:
    return {"loss": float(metrics["eval_loss"]), "perplexity": float(math.exp(metrics["eval_loss"]))}


def sft(
    recipe: Recipe,
    run_dir: str | Path | None = None,
    max_steps: int | None = None,
    resume: str | Path | None = None,
    force: bool = False,
    extra_callbacks: list | None = None,
) -> tuple[dict[str, Any], Path]:
    """Run SFT for `recipe`; returns (summary, run folder). Arguments as for training.dpo.train."""
    started = time.perf_counter()
    if recipe.method != "sft":
        raise UserError(f"method: `sft` trains recipes with method 'sft', this one has {recipe.method!r}; use `train`")
    recipe = with_max_steps(recipe, max_steps)
    allocator = begin(recipe)
    prep = prepare(recipe)  # the same checks as DPO: data rows, lengths, model path, tokenizer
    recipe, backend = prep.recipe, prep.backend
    prec = precision(recipe, backend.device)
    train_pairs, eval_pairs = prep.train_pairs, prep.eval_pairs
    with Run.open(recipe, run_dir, resume, force, prec.autocast, started) as run:
        announce(prep, run)
        loaded = load_model(prep, run)
        run.start_clock()
        trainer, log = build_trainer(
            recipe, run, loaded, train_pairs, eval_pairs, backend.device, extra_callbacks or []
        )
        try:
            before, after = run.fit(trainer, eval_block)
        finally:
            log.close()
        artifact = run.save_policy(trainer.model, loaded.tokenizer)
        summary = run.summary(
            trainer,
            backend,
            prec,
            loaded.path,
            "examples",
            len(train_pairs),
            before,
            after,
            train_examples=len(train_pairs),
            eval_examples=len(eval_pairs),
            artifact=artifact,
            allocator=allocator,
        )
        run.finish(summary)
    return summary, run.path


def build_trainer(recipe: Recipe, run: Run, loaded, train_pairs, eval_pairs, device: str, extra_callbacks: list):
    """(trl.SFTTrainer on the author's answers, our progress log)."""
    from datasets import Dataset
    from transformers.trainer_callback import PrinterCallback
    from trl import SFTTrainer

    total_steps = arguments.planned_steps(recipe, len(train_pairs))
    log = run_log(run.path, total_steps, "SFT", main=distributed.is_main())
    system = recipe.data.system_prompt
    trainer = SFTTrainer(
        model=loaded.model,
        args=arguments.sft_args(recipe, run.path, device, total_steps),
        processing_class=loaded.tokenizer,
        peft_config=loaded.peft_config,
        train_dataset=Dataset.from_list(conversations(train_pairs, system)),
        eval_dataset=Dataset.from_list(conversations(eval_pairs, system)),
        callbacks=[log, run.guard, *extra_callbacks],
    )
    trainer.remove_callback(PrinterCallback)
    return trainer, log


def describe(summary: dict[str, Any], run_dir: Path) -> str:
    b, a = summary["eval_before"], summary["eval_after"]
    return (
        f"done: {summary['steps']} steps, {summary['examples_trained']} examples in {summary['train_seconds']:.0f} s; "
        f"held-out loss {b['loss']:.3f} -> {a['loss']:.3f} (perplexity {b['perplexity']:.2f} -> "
        f"{a['perplexity']:.2f}) on the author's {summary['eval_examples']} held-out answers; peak memory "
        f"{human_bytes(summary['peak_memory_bytes'])}\nrun folder: {run_dir}  (adapter/ is the twin)"
    )
