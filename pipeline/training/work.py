"""What the model really computed in a run, for honest utilisation (the bench's MFU).

A forward pre-hook on the transformer body counts, per phase, the token positions the transformer body ran (padding
included where a batch is padded; the packed rows where training/packing.py packed them) and the positions the
LM head projected (ours: the completion positions; TRL's head on a CPU: every position). Phases:

- `train`: forwards with gradient in training mode (the policy; each one also runs a backward pass);
- `reference`: reference forwards: TRL's at every step (no gradient, training mode), or our one-off pass;
- held-out evaluation is not counted (it is not in the training time the MFU divides by).

The bench turns these counts into FLOPs (experiments/bench_report.py `model_flops`).
"""

from __future__ import annotations

import contextlib

import torch

from pipeline.model import adapters

ATTR = "_twin_dpo_work"
_in_reference_pass = False


@contextlib.contextmanager
def reference_pass():
    """Count forwards inside as reference work even though the model is in eval mode (training/reference.py)."""
    global _in_reference_pass
    previous, _in_reference_pass = _in_reference_pass, True
    try:
        yield
    finally:
        _in_reference_pass = previous


def _empty() -> dict[str, dict[str, int]]:
    return {phase: {"body_tokens": 0, "head_rows": 0, "forwards": 0} for phase in ("train", "reference")}


def _phase(module) -> str | None:
    if _in_reference_pass:
        return "reference"
    if not module.training:
        return None  # held-out evaluation
    return "train" if torch.is_grad_enabled() else "reference"


def install(model) -> dict[str, dict[str, int]]:
    """Start counting on `model` (the transformers causal LM, not the PEFT wrapper); returns the live counts.

    The hook sits on the transformer body (`model.base_model`), which every path calls as a module (PEFT calls the
    causal LM's `forward` directly, past any hook there). The LM head's rows: training/fast_head.py adds the
    completion positions it projects (`count_head`); TRL's head is counted as every position the body ran (its
    CPU path; on CUDA it scores the labelled positions only, so there this overcounts the baseline's head).
    """
    if hasattr(model, ATTR):
        return getattr(model, ATTR)
    counts = _empty()

    def before(module, args, kwargs):
        phase = _phase(module)
        ids = kwargs.get("input_ids", args[0] if args else None)
        if phase is None or ids is None:
            return
        c = counts[phase]
        c["body_tokens"] += ids.numel()  # the packed rows where fast_head packed them: what really ran
        c["forwards"] += 1
        if not getattr(model, "_twin_dpo_head", None):
            c["head_rows"] += ids.numel()

    model.base_model.register_forward_pre_hook(before, with_kwargs=True)
    setattr(model, ATTR, counts)
    return counts


def count_head(model, rows: int) -> None:
    """Our LM head projected `rows` positions in this forward (no-op unless counting is on)."""
    counts = getattr(model, ATTR, None)
    phase = _phase(model) if counts is not None else None
    if phase is not None:
        counts[phase]["head_rows"] += int(rows)


def install_on_trainer(trainer) -> list[dict[str, dict[str, int]]]:
    """Count on the trainer's policy and, if separate, its reference model; read with `total`."""
    policy = adapters.transformers_model(trainer.model)
    models = [policy] + ([trainer.accelerator.unwrap_model(trainer.ref_model)] if trainer.ref_model is not None else [])
    return [install(m) for m in models]


def total(counted: list[dict[str, dict[str, int]]]) -> dict[str, dict[str, int]]:
    out = _empty()
    for counts in counted:
        for phase, c in counts.items():
            for k, v in c.items():
                out[phase][k] += v
    return out
