"""Doing less work per DPO step, without changing what is learned.

TRL 1.16 patches the model with a "fused LM head" that returns per-token
log-probabilities instead of logits. On CUDA it scores only the positions that
have a label; elsewhere (this CPU) it scores every position - prompt and
padding included - through the whole 49k-word vocabulary, and folds four
logging statistics into that pass. `install_completion_head` replaces that
forward with one that projects only the completion positions (the only ones
the DPO loss reads) and computes the logging statistics from the same logits
without gradient. Same outputs, same gradients (tests/test_fast.py checks both
against TRL's head); a fraction of the work on CPU.
"""

from __future__ import annotations

import types

import torch
import torch.nn.functional as F


def _supported(model) -> bool:
    text = model.config.get_text_config()
    special = ("final_logit_softcapping", "logit_scale", "output_multiplier", "lm_head_multiplier", "logits_scaling")
    return not any(getattr(text, name, None) not in (None, 1.0) for name in special) and not getattr(
        text, "output_router_logits", False
    )


def completion_log_probs(hidden: torch.Tensor, weight: torch.Tensor, bias, targets: torch.Tensor, outputs: tuple[str, ...]):
    """Log-probability of each target under `hidden @ weight.T (+ bias)`, plus the requested statistics.

    hidden: [n, H] (completion positions only); targets: [n]. Returns (log_probs, entropy, log_sum_sq_probs,
    mean_logits, is_top1); statistics not in `outputs` are None. Only log_probs carries a gradient.
    """
    logits = F.linear(hidden, weight, bias).float()
    log_z = torch.logsumexp(logits, dim=-1)
    log_probs = logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - log_z
    entropy = log_sum_sq = mean_logits = is_top1 = None
    with torch.no_grad():
        if "entropy" in outputs or "log_sum_sq_probs" in outputs:
            log_p = logits - log_z.unsqueeze(-1)
            p = log_p.exp()
            if "entropy" in outputs:
                entropy = -(p * log_p).sum(-1)
            if "log_sum_sq_probs" in outputs:
                log_sum_sq = torch.log((p * p).sum(-1))
        if "mean_logits" in outputs:
            mean_logits = logits.mean(-1)
        if "is_top1" in outputs:
            is_top1 = logits.argmax(-1) == targets
    return log_probs, entropy, log_sum_sq, mean_logits, is_top1


def install_completion_head(model, outputs: tuple[str, ...] = ("log_probs", "entropy", "mean_logits", "is_top1")) -> bool:
    """Replace TRL's fused LM head on `model` (a transformers model, not the PEFT wrapper) by the completion-only one.

    Returns False, leaving TRL's head in place, where ours does not apply: CUDA (TRL's Triton path already scores
    only labelled positions), logit scaling or soft-capping, MoE router losses, or a TRL without the fused head.
    """
    try:
        from trl.trainer.utils import FusedCausalLMOutput
    except ImportError:
        return False
    if not _supported(model) or next(model.parameters()).device.type == "cuda":
        return False
    original = types.MethodType(type(model).forward, model)

    def forward(self, *args, fused_lm_head=False, labels=None, shift_labels=None, num_items_in_batch=None, **kwargs):
        if not fused_lm_head:
            for name, value in (("labels", labels), ("shift_labels", shift_labels), ("num_items_in_batch", num_items_in_batch)):
                if value is not None:
                    kwargs[name] = value
            return original(*args, **kwargs)
        kwargs["use_cache"] = False
        hidden = self.base_model(*args, **kwargs).last_hidden_state
        if shift_labels is None:
            hidden, shift_labels = hidden[:, :-1], labels[:, 1:]
        mask = shift_labels != -100
        head = self.get_output_embeddings()
        fields = completion_log_probs(hidden[mask], head.weight, head.bias, shift_labels[mask], outputs)
        # masked_scatter keeps the result attached to the graph even when no position is labelled
        full = [None if x is None else x.new_zeros(mask.shape).masked_scatter(mask, x) for x in fields]
        log_probs = full[0]
        denominator = mask.sum().clamp(min=1) if num_items_in_batch is None else num_items_in_batch
        return FusedCausalLMOutput(
            loss=-log_probs.sum() / denominator,
            log_probs=log_probs,
            entropy=full[1],
            log_sum_sq_probs=full[2],
            mean_logits=full[3],
            is_top1=full[4],
            label_mask=mask,
            aux_loss=None,
        )

    model.forward = types.MethodType(forward, model)
    return True


def install_on_trainer(trainer) -> bool:
    """Install the completion-only head on the trainer's policy and, if separate, its reference model."""
    from accelerate.utils import is_peft_model

    policy = trainer.model.get_base_model() if is_peft_model(trainer.model) else trainer.model
    outputs = ("log_probs", "entropy", "mean_logits", "is_top1") + (("log_sum_sq_probs",) if trainer.use_weighting else ())
    installed = install_completion_head(policy, outputs)
    if installed and trainer.ref_model is not None:
        install_completion_head(trainer.accelerator.unwrap_model(trainer.ref_model), ("log_probs",))
    return installed
