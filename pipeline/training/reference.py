"""Reference log-probabilities: computed once, cached on disk, reused by every run.

The DPO reference is frozen, so its log-probability of each chosen and
rejected answer is the same at every step, in every epoch, and in every run
that shares (reference weights, tokenized data, max length). We compute it
with TRL's own `compute_ref_log_probs` (through the completion-only head and,
where on, padding-free rows), store it under `<cache>/reference/<key>.safetensors`,
and hand it to TRL as the `ref_chosen_logps` / `ref_rejected_logps` columns
its precompute mode reads. The key hashes the reference weights, the token ids,
the max length and the numerics (autocast dtype, device, torch version,
batching, head), so a change to any of them (model, adapter, data, chat
template, precision) misses the cache.

Only what the run will read is computed: the held-out set, and the train pairs
of the steps it will take (a `--max-steps 2` run: its first 2 global batches,
when the order is the fixed length-grouped one). The train pairs are cut into
fixed batches: the training steps' own batches (their pairs have similar
lengths), or, under a random sampler, batches sorted by length of up to TOKENS
tokens each. A run computes the batches that hold a pair it needs and no
others, and the cache file grows by batch, so each pair's numbers are those a
full pass computes, whichever runs came first.
"""

from __future__ import annotations

import contextlib
import os
import time
from pathlib import Path
from typing import Any

import torch

from pipeline.errors import UserError
from pipeline.model import adapters
from pipeline.storage import cache_root, hasher
from pipeline.training import distributed, exact_eval, trl_compat, work

BATCH = 8  # pairs per held-out evaluation batch (and per batch of its reference pass, which must match it)
COMPILED = "_twin_dpo_compiled"  # set by training/compiled.py on the model whose blocks it compiled
TOKENS = 2048  # tokens (prompt + both answers) per reference forward when the train order is random


def reference_tensors(trainer) -> list[tuple[str, torch.Tensor]]:
    """The weights that define the reference: a separate model, or the base (+ a frozen `ref` adapter)."""
    from accelerate.utils import is_peft_model

    if trainer.ref_model is not None:
        model = trainer.accelerator.unwrap_model(trainer.ref_model)
        return sorted(model.state_dict().items())
    model = trainer.accelerator.unwrap_model(trainer.model)
    if not is_peft_model(model):
        return sorted(model.state_dict().items())
    has_ref_adapter = "ref" in model.peft_config
    keep = []
    for name, tensor in model.state_dict().items():
        if "lora_" in name and not (has_ref_adapter and ".ref." in name):
            continue  # the policy adapter is not part of the reference
        keep.append((name, tensor))
    return sorted(keep)


def _head(trainer) -> str:
    """Which LM-head implementation computes the log-probs, and whether inductor compiled the blocks (each differs
    in float rounding)."""
    model = trainer.ref_model if trainer.ref_model is not None else trainer.model
    model = trainer.accelerator.unwrap_model(model)
    model = adapters.transformers_model(model)
    return getattr(model, "_twin_dpo_head", "trl") + (";compiled" if getattr(model, COMPILED, False) else "")


def cache_key(trainer, datasets: list[Any], max_length: int | None) -> str:
    eval_batch = trainer.args.per_device_eval_batch_size
    fixed, _ = train_batching(trainer)
    batching = fixed or f"tokens:{TOKENS}"
    from pipeline.training import held_weights  # it imports compiled, which imports this module

    float32 = held_weights.float32_view(trainer.accelerator.unwrap_model(trainer.model))
    h = hasher()
    for name, tensor in reference_tensors(trainer):
        tensor = float32(tensor)  # a weight held in bf16 for training: its float32 values (held_weights.py)
        h.update(name.encode())
        h.update(str(tensor.dtype).encode())
        t = tensor.detach().cpu()
        if t.dtype in (torch.bfloat16, torch.float8_e4m3fn, torch.float8_e5m2):
            t = t.float()
        h.update(memoryview(t.contiguous().numpy()).cast("B"))  # the same bytes, without tobytes()'s copy (113 MB)
    args = trainer.args
    # numerics: the same weights give other log-probs under another autocast dtype, device or torch build
    h.update(
        f"max_length={max_length};truncation={args.truncation_mode};ld_alpha={trl_compat.ld_alpha(trainer)};"
        f"bf16={args.bf16};fp16={args.fp16};device={trainer.accelerator.device.type};torch={torch.__version__};"
        f"batch={batching};eval_batch={eval_batch};head={_head(trainer)};eval_fp32={exact_eval.applies(trainer)}".encode()
    )
    for dataset in datasets:
        for column in ("prompt_ids", "chosen_ids", "rejected_ids"):
            for ids in dataset[column]:
                h.update(len(ids).to_bytes(4, "little"))
                h.update(torch.tensor(ids, dtype=torch.int64).numpy().tobytes())
    return h.hexdigest()


def eval_batch_size(n_rows: int) -> int:
    """Pairs per process in one held-out evaluation batch (and in the eval reference pass, which reads the same
    batches). One process: BATCH. N processes: each global batch is N consecutive runs of this size, so the global
    batches hold the same pairs as one process's; the largest size <= BATCH / N that divides the held-out set into
    whole global batches (else accelerate would pad the last one with repeated pairs, counted twice)."""
    world = distributed.world_size()
    if world == 1:
        return BATCH
    top = max(1, BATCH // world)
    return next((b for b in range(top, 0, -1) if n_rows % (b * world) == 0), top)


def batches(dataset, sort: bool, size: int | None) -> list[list[int]]:
    """The fixed batches of a reference pass: `size` pairs each (the held-out set: its evaluation batches, in its
    own order), or consecutive pairs in length order up to TOKENS tokens each (at least one pair)."""
    order = list(range(len(dataset)))
    pair_tokens = [
        len(p) + len(c) + len(r)
        for p, c, r in zip(dataset["prompt_ids"], dataset["chosen_ids"], dataset["rejected_ids"], strict=True)
    ]
    if sort:
        order.sort(key=lambda i: pair_tokens[i])
    if size is not None:
        return [order[start : start + size] for start in range(0, len(order), size)]
    out: list[list[int]] = [[]]
    used = 0
    for i in order:
        if out[-1] and used + pair_tokens[i] > TOKENS:
            out.append([])
            used = 0
        out[-1].append(i)
        used += pair_tokens[i]
    return [b for b in out if b]


def rows_per_step(trainer) -> int | None:
    """Train rows per optimizer step when the sampler reads the rows in their order (length grouping: the order
    is drawn once, each step's pairs have similar lengths), else None (a random sampler may read any row)."""
    args = trainer.args
    if getattr(args, "train_sampling_strategy", "random") != "sequential":
        return None
    return args.per_device_train_batch_size * args.gradient_accumulation_steps * distributed.world_size()


def train_batching(trainer) -> tuple[int | None, bool]:
    """How the train pairs are cut into reference forwards: (pairs per forward, or None for batches of up to TOKENS
    tokens; whether to sort by length first). The training steps' own batches where the order is fixed, else
    length-sorted token batches. TWIN_DPO_REFERENCE_PAIRS=N (the bench's lever table) forces N pairs per forward
    in the training order."""
    forced = os.environ.get("TWIN_DPO_REFERENCE_PAIRS", "")
    if forced:
        if not forced.isdigit() or int(forced) < 1:
            raise UserError(f"TWIN_DPO_REFERENCE_PAIRS={forced!r}: give a whole number of pairs >= 1, or unset it")
        return int(forced), False
    fixed = rows_per_step(trainer)
    return fixed, fixed is None


def needed_train_rows(trainer, n_rows: int) -> int:
    """How many leading train rows the run reads: the first max_steps steps' rows when the sampler reads the rows
    in their order, else all of them."""
    per_step = rows_per_step(trainer)
    if trainer.args.max_steps <= 0 or per_step is None:
        return n_rows
    return min(n_rows, trainer.args.max_steps * per_step)


def _compute(
    trainer, dataset, todo: list[list[int]], progress_desc: str, counted: bool
) -> dict[int, tuple[float, float]]:
    """Reference log-probs of the rows in the batches `todo` of a TRL-tokenized dataset: {row: (chosen, rejected)}.
    `counted`: count the forwards as the run's reference work (training/work.py); the held-out pairs' are not.

    The held-out set's batches are exactly the evaluation's batches, computed in the evaluation's precision
    (training/exact_eval.py: fp32 where training runs under CPU autocast), so an untouched policy scores rewards
    of exactly zero. With N processes each computes every N-th batch (the same batches, so the same numbers) and
    all gather.
    """
    from tqdm.auto import tqdm

    mine = todo[distributed.rank() :: distributed.world_size()]
    done: list[tuple[list[int], list[float], list[float]]] = []
    model = trainer.ref_model if trainer.ref_model is not None else trainer.model
    was_training = trainer.model.training
    trainer.model.eval()
    columns = ("prompt_ids", "chosen_ids", "rejected_ids")
    try:
        bar = tqdm(mine, desc=progress_desc, unit="batch", dynamic_ncols=True, disable=not distributed.is_main())
        for idx in bar:
            rows = dataset.select(idx)
            examples = [{c: rows[c][k] for c in columns} for k in range(len(idx))]
            batch_in = trl_compat.prepare_inputs(trainer, trainer.data_collator(examples))
            with work.reference_pass() if counted else contextlib.nullcontext():
                c, r = trainer.compute_ref_log_probs(model, batch_in)
            done.append((idx, c.float().cpu().tolist(), r.float().cpu().tolist()))
    finally:
        trainer.model.train(was_training)
    values = {}
    for part in distributed.gather(done):
        for idx, c, r in part:
            values.update({i: (a, b) for i, a, b in zip(idx, c, r, strict=True)})
    return values


def attach(trainer, cache_dir: Path | None) -> dict[str, Any]:
    """Give the trainer reference log-probs for its train and eval sets, from the cache or computed now.

    Afterwards the trainer reads them from each batch (TRL's precompute mode) and never runs the reference
    model during training or evaluation. Rows the run will not read stay NaN (and a batch holding one is refused
    outright, never trained on). Returns what happened, for the run summary.
    """
    start = time.perf_counter()
    names = ["train"] + (["eval"] if trainer.eval_dataset is not None else [])
    datasets = {"train": trainer.train_dataset, "eval": trainer.eval_dataset}
    key = cache_key(trainer, [datasets[n] for n in names], trainer.args.max_length)
    path = (cache_dir / f"{key}.safetensors") if cache_dir else None
    from safetensors.torch import load_file, save_file

    # rank 0 decides and reads (on several machines only its disk is sure to hold the cache); the others get a copy
    cached = distributed.broadcast(load_file(str(path)) if distributed.is_main() and path and path.is_file() else None)
    tensors = dict(cached or {})
    computed: dict[str, int] = {}
    eval_seconds = 0.0  # the held-out pairs' share: evaluation work, counted as such in the run's timings
    for name in names:
        ds = datasets[name]
        n = len(ds)
        if f"{name}.chosen" not in tensors:
            tensors[f"{name}.chosen"] = torch.full((n,), float("nan"))
            tensors[f"{name}.rejected"] = torch.full((n,), float("nan"))
        done = tensors.get(f"{name}.done", ~tensors[f"{name}.chosen"].isnan()).bool()
        want = needed_train_rows(trainer, n) if name == "train" else n
        if name == "train":  # the training steps' own batches (similar lengths, so little padding), else sorted
            fixed, sort = train_batching(trainer)
        else:
            fixed, sort = trainer.args.per_device_eval_batch_size, False
        todo = [b for b in batches(ds, sort, fixed) if any(i < want and not done[i] for i in b)]
        if todo:
            exact = exact_eval.full_precision(trainer) if name == "eval" else contextlib.nullcontext()
            split_start = time.perf_counter()
            with exact:
                values = _compute(trainer, ds, todo, f"reference log-probs ({name})", counted=name == "train")
            if name == "eval":
                eval_seconds = time.perf_counter() - split_start
            for i, (c, r) in values.items():
                tensors[f"{name}.chosen"][i], tensors[f"{name}.rejected"][i] = c, r
                done[i] = True
            computed[name] = len(values)
        tensors[f"{name}.done"] = done.to(torch.uint8)
    if computed and path is not None and distributed.is_main():
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        save_file(tensors, str(tmp))
        os.replace(tmp, path)
    for name in names:
        ds = datasets[name]
        for side in ("chosen", "rejected"):
            column = f"ref_{side}_logps"
            if column in ds.column_names:
                ds = ds.remove_columns(column)
            ds = ds.add_column(column, tensors[f"{name}.{side}"].tolist())
        datasets[name] = ds
    trainer.train_dataset = datasets["train"]
    if trainer.eval_dataset is not None:
        trainer.eval_dataset = datasets["eval"]
    # TRL's precompute mode: _compute_loss reads ref_*_logps from the batch instead of running the reference
    trl_compat.use_precomputed_reference(trainer)
    _refuse_missing(trainer)
    train_done = int(tensors["train.done"].sum())
    return {
        "reference_cache": str(path) if path else None,
        "reference_reused": not computed,
        "reference_forward_passes": len(computed),  # datasets (train, held-out) that ran through the reference
        "reference_pairs_computed": sum(computed.values()),
        "reference_train_pairs_cached": train_done,  # of len(train): a short run leaves the rest for later runs
        "reference_seconds": round(time.perf_counter() - start, 2),
        "reference_eval_seconds": round(eval_seconds, 2),
    }


def _refuse_missing(trainer) -> None:
    """Make the trainer refuse to compute a loss on a batch whose reference log-probs were never computed (NaN):
    a wrong guess of which pairs the run reads must stop the run, not train on NaN. (Not in the collator:
    accelerate's loader collates one batch ahead, past the last step.)"""
    compute_loss = trainer.compute_loss
    if getattr(compute_loss, "_twin_dpo_checked", False):
        return

    def checked(model, inputs, *args, **kwargs):
        for column in ("ref_chosen_logps", "ref_rejected_logps"):
            value = inputs.get(column)
            if value is not None and torch.isnan(value).any():
                raise RuntimeError(f"{column} of a batch was never computed (training/reference.py needed_train_rows)")
        return compute_loss(model, inputs, *args, **kwargs)

    checked._twin_dpo_checked = True
    trainer.compute_loss = checked


def default_cache_dir() -> Path:
    return cache_root() / "reference"
