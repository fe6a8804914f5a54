"""The recipe as trainer arguments (shared by DPO and SFT) and the step / example arithmetic of a run."""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

from pipeline.model.backend import precision
from pipeline.recipe import Recipe
from pipeline.training import distributed
from pipeline.training.reference import BATCH as EVAL_BATCH  # one constant: untrained rewards are then exactly 0


def common_args(
    recipe: Recipe, run_dir: Path, device: str, total_steps: int, eval_batch: int = EVAL_BATCH
) -> dict[str, Any]:
    """The transformers.TrainingArguments both trainers (DPO, SFT) take from a recipe. `eval_batch`: pairs per
    process per held-out batch (training/reference.py's eval_batch_size under several processes)."""
    t = recipe.train
    if t.report_to == "tensorboard":  # transformers 5 reads the folder from here (else checkpoints/runs/<time>)
        os.environ["TENSORBOARD_LOGGING_DIR"] = str(run_dir / "tensorboard")
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
        max_steps=t.max_steps,
        per_device_train_batch_size=t.batch_size,
        per_device_eval_batch_size=eval_batch,
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
        save_total_limit=None,  # training/guard.py prunes, after a checkpoint is marked complete
        logging_nan_inf_filter=False,  # a NaN loss must be seen, not averaged away
        train_sampling_strategy="sequential" if t.group_by_length else "random",
        prediction_loss_only=True,  # else TRL reruns a full-logits forward per eval batch for compute_metrics
        seed=t.seed,
        data_seed=t.seed,
        bf16=autocast == "bf16",
        fp16=autocast == "fp16",
        use_cpu=not on_gpu,
        report_to=t.report_to,  # transformers' integrations log on the main process only
        # LoRA leaves the frozen base's parameters out of the graph: DDP must not wait for their gradients (peft#313)
        ddp_find_unused_parameters=False,
        disable_tqdm=True,
        dataloader_num_workers=0,
    )


def dpo_args(
    recipe: Recipe, run_dir: Path, device: str, total_steps: int, eval_batch: int = EVAL_BATCH, evaluate: bool = True
):
    """The recipe as trl.DPOConfig; `evaluate=False`: no periodic held-out evaluation (`train --no-eval`)."""
    from trl import DPOConfig

    common = common_args(recipe, run_dir, device, total_steps, eval_batch)
    if not evaluate:
        common.update(eval_strategy="no", eval_steps=None)
    return DPOConfig(
        **common,
        beta=recipe.train.beta,
        loss_type=[recipe.train.loss_type],
        precompute_ref_log_probs=False,  # training/reference.py does it, cached on disk, then switches TRL to it
    )


def sft_args(recipe: Recipe, run_dir: Path, device: str, total_steps: int):
    """The recipe as trl.SFTConfig: the loss on the answer tokens only."""
    from trl import SFTConfig

    return SFTConfig(**common_args(recipe, run_dir, device, total_steps), completion_only_loss=True)


def global_batch(recipe: Recipe) -> int:
    """Pairs per optimizer step over all processes: batch_size (per process) x grad_accum x processes."""
    return recipe.train.batch_size * recipe.train.grad_accum * distributed.world_size()


def planned_steps(recipe: Recipe, n_rows: int) -> int:
    """Optimizer steps the run will take: train.max_steps, or the epochs over `n_rows` rows."""
    t = recipe.train
    if t.max_steps > 0:
        return t.max_steps
    per_epoch = math.ceil(math.ceil(n_rows / (t.batch_size * distributed.world_size())) / t.grad_accum)
    return max(1, math.ceil(per_epoch * t.epochs))


def rows_seen(recipe: Recipe, steps: int, n_rows: int) -> int:
    """Pairs (DPO) or examples (SFT) trained on in `steps` optimizer steps; an epoch's last batch may be short."""
    t = recipe.train
    seen = steps * global_batch(recipe)
    if t.max_steps <= 0:
        seen = min(seen, math.ceil(n_rows * t.epochs))
    return seen


def count_parameters(model) -> tuple[int, int]:
    """(trainable, total) parameters; PEFT counts 4-bit packed weights correctly."""
    if hasattr(model, "get_nb_trainable_parameters"):
        trainable, total = model.get_nb_trainable_parameters()
        return int(trainable), int(total)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return trainable, total
