"""Held-out DPO numbers in fp32 while training runs under CPU bf16 autocast.

DPO's held-out reward is a difference of two forwards: the policy's log-prob of an answer minus the reference's.
Under bf16 autocast each forward carries rounding error of about 0.2 nats per answer on SmolLM2-135M, and a small
change to the weights flips roundings all through the 30 layers, so the difference of two bf16 forwards is noise
of that size whatever the true difference is (`benchmarks/bf16_probe.py`: with the adapter moved by 1e-3, the
bf16 difference is 7x off and its DPO sign agrees with fp32's on 75% of pairs; keeping the adapter branch or the
LM head in fp32 does not change that, the rounding is in every matmul downstream). Early in a run, at a low
learning rate, the true held-out margin is far smaller than that, so bf16 evaluation reported noise (0.325
accuracy after 2 steps).

The gradients are not the problem: they are computed at the bf16 point, with bf16's small relative error, and
move the fp32 weights as in an fp32 run (measured: README, Defaults). So training keeps bf16 speed, and only the
measurement is exact: the held-out reference log-probs and every held-out evaluation run with autocast off and
fp32 weights (a 4-bit base computes in fp32 too). An untouched policy then scores rewards of exactly 0, and a
moved one its true margin.
"""

from __future__ import annotations

import contextlib
import functools

import torch

from pipeline.model import adapters

FLAG = "_twin_dpo_fp32_now"
HEAD = "_twin_dpo_head_forward"  # set by training/fast_head.py: the forward it installed


def applies(trainer) -> bool:
    """Only where a run computes under autocast with fp32 weights: the CPU bf16 / fp16 path."""
    model = _inner(trainer)
    weights = next(model.parameters())
    return bool(trainer.args.bf16 or trainer.args.fp16) and weights.device.type == "cpu"


def _inner(trainer):
    return adapters.transformers_model(trainer.accelerator.unwrap_model(trainer.model))


def _models(trainer) -> list:
    """The transformers models a held-out evaluation runs: the policy's, and a separate reference if there is one."""
    models = [_inner(trainer)]
    if trainer.ref_model is not None:
        models.append(trainer.accelerator.unwrap_model(trainer.ref_model))
    return models


def install(trainer) -> bool:
    """Wrap the model's forward so `full_precision` can switch autocast off inside accelerate's autocast wrapper,
    and make `trainer.evaluate` run in full precision. Returns whether it applies to this run."""
    if not applies(trainer):
        return False
    models = _models(trainer)
    for model in models:
        if getattr(model, "_twin_dpo_exact_eval", False):
            continue
        current = model.forward
        # TRL prepares a separate reference model with accelerate at once, which wraps its forward in autocast and
        # keeps the unwrapped one as `_original_forward`; switching autocast off outside that wrapper would not
        # hold inside it, so full precision calls the unwrapped forward (unless our LM head replaced the wrapper).
        plain = current
        if getattr(model, "_original_forward", None) is not None and current is not getattr(model, HEAD, None):
            plain = model._original_forward
        device_type = next(model.parameters()).device.type

        def forward(*args, _current=current, _plain=plain, _model=model, _device=device_type, **kwargs):
            if getattr(_model, FLAG, False):
                with torch.autocast(_device, enabled=False):
                    return _plain(*args, **kwargs)
            return _current(*args, **kwargs)

        model.forward = forward
        model._twin_dpo_exact_eval = True
    evaluate = trainer.evaluate

    @functools.wraps(evaluate)
    def evaluate_fp32(*args, **kwargs):
        with full_precision(trainer):
            return evaluate(*args, **kwargs)

    trainer.evaluate = evaluate_fp32
    return True


@contextlib.contextmanager
def full_precision(trainer):
    """Inside: the trainer's models compute in fp32 (autocast off, a 4-bit base dequantized to fp32)."""
    if not getattr(_inner(trainer), "_twin_dpo_exact_eval", False):
        yield
        return
    models = _models(trainer)
    four_bit = [
        m for model in models for m in model.modules() if hasattr(m, "compute_dtype") and hasattr(m, "quant_state")
    ]
    saved = [m.compute_dtype for m in four_bit]
    for model in models:
        setattr(model, FLAG, True)
    for m in four_bit:
        m.compute_dtype = torch.float32
    try:
        yield
    finally:
        for model in models:
            setattr(model, FLAG, False)
        for m, dtype in zip(four_bit, saved, strict=True):
            m.compute_dtype = dtype
