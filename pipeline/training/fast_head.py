"""Doing less work per DPO step, without changing what is learned.

TRL 1.16 patches the model with a "fused LM head" that returns per-token
log-probabilities instead of logits. On CUDA it scores only the positions that
have a label; elsewhere (this CPU) it scores every position - prompt and
padding included - through the whole 49k-word vocabulary, and folds four
logging statistics into that pass. `install_completion_head` replaces that
forward with one that projects only the completion positions (the only ones
the DPO loss reads), a slice of positions at a time, and computes the logging
statistics from the same logits without gradient, in one max and one exp pass
per slice. The softmax is kept for the backward pass up to KEEP_BYTES (the
backward is then one matmul per slice); past that only the log-normaliser is
kept and each slice's logits are recomputed (memory: one slice). The head's weight is cast to bf16 a block of
words at a time and the exp runs a block of rows at a time, so no full-size copy of either sits beside the slice:
at 256 tokens x 1 pair that keeps our peak under TRL's. Same outputs, same gradients
(tests/test_fast.py checks both against TRL's head); a fraction of the work on CPU.
"""

from __future__ import annotations

import types

import torch
import torch.nn.functional as F

from pipeline.model import adapters
from pipeline.training import packing as packing_mod
from pipeline.training import trl_compat, work


def decline_reason(model) -> str | None:
    """Why the completion-only head cannot stand in for this model's own head, or None when it can: it computes
    plain `hidden @ W.T (+ b)` log-probs, with no logit soft-capping or scaling and no MoE router loss."""
    text = model.config.get_text_config()
    special = ("final_logit_softcapping", "logit_scale", "output_multiplier", "lm_head_multiplier", "logits_scaling")
    for name in special:
        if getattr(text, name, None) not in (None, 1.0):
            return f"the model scales or soft-caps its logits ({name}={getattr(text, name)})"
    if hasattr(text, "output_router_logits"):
        return "the model is a mixture of experts whose router load-balancing loss TRL adds from the model's own output"
    return None


CHUNK = 256  # completion positions per slice of the LM head: [256 x 49k] fp32 logits is 50 MB
KEEP_BYTES = 128 << 20  # softmax kept for the backward pass up to this size; above it, recomputed slice by slice
VOCAB_BLOCK = 8192  # LM-head rows cast to bf16 at a time (the whole head's cast copy would be 57 MB at 49k words)
EXP_ROWS = 64  # rows per exp block within a slice: its temporary is [64 x vocab] instead of a second slice


def _mm_dtype(device_type: str, default: torch.dtype) -> torch.dtype:
    return torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else default


def _project(h, weight, bias, dtype, out):
    """out (float32 [rows, vocab]) = h @ weight.T (+ bias), the weight cast to the matmul dtype one block of
    VOCAB_BLOCK words at a time: no full-size cast copy of the LM head and no [rows, vocab] bf16 intermediate."""
    h = h.to(dtype)
    for v in range(0, weight.shape[0], VOCAB_BLOCK):
        cols = slice(v, v + VOCAB_BLOCK)
        out[:, cols] = F.linear(h, weight[cols].to(dtype), None if bias is None else bias[cols].to(dtype))
    return out


def _slice_stats(logits, targets, out, rows, softmax: bool):
    """Fill out[...][rows] for one slice of fp32 logits (overwritten); returns its softmax (in the logits' own
    storage) if `softmax`, else None.

    One max pass (which also gives the top-1), then EXP_ROWS rows at a time one exp and dot products instead of
    full-slice temporaries: with s = sum(exp(l - m)), log Z = m + log s, entropy = log s - sum(e * (l - m)) / s.
    """
    if "mean_logits" in out:
        out["mean_logits"][rows] = logits.mean(-1)
    target_logit = logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    top, index = logits.max(-1)
    if "is_top1" in out:
        out["is_top1"][rows] = index == targets
    shifted = logits.sub_(top.unsqueeze(-1))
    s = shifted.new_empty(shifted.shape[0])
    dot = shifted.new_empty(shifted.shape[0]) if "entropy" in out else None
    sq = shifted.new_empty(shifted.shape[0]) if "log_sum_sq_probs" in out else None
    for start in range(0, shifted.shape[0], EXP_ROWS):
        block = slice(start, start + EXP_ROWS)
        e = shifted[block].exp()
        s[block] = e.sum(-1)
        if dot is not None:
            dot[block] = torch.linalg.vecdot(e, shifted[block])
        if sq is not None:
            sq[block] = torch.linalg.vecdot(e, e)
        if softmax:  # the statistics above have read this block's shifted logits: overwrite them in place
            shifted[block] = e.div_(s[block].unsqueeze(-1))
    log_s = s.log()
    out["log_z"][rows] = top + log_s
    out["log_probs"][rows] = target_logit - top - log_s
    if dot is not None:
        out["entropy"][rows] = log_s - dot / s
    if sq is not None:
        out["log_sum_sq_probs"][rows] = sq.log() - 2 * log_s
    return shifted if softmax else None


class _ChunkedLogProb(torch.autograd.Function):
    """log p(target) for each row of `hidden @ weight.T + bias`, a slice of rows at a time.

    The forward pass keeps each slice's softmax for the backward pass while they fit in KEEP_BYTES (the
    backward is then one matmul per slice); beyond that it keeps only the per-row log-normaliser and the
    backward recomputes each slice's logits, so memory stays at one [CHUNK x vocab] slice. The logging
    statistics (entropy, mean logit, top-1) come from the same slices, without gradient.
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, want: tuple[str, ...], backward: bool):
        dtype = _mm_dtype(hidden.device.type, hidden.dtype)
        n = hidden.shape[0]
        names = ("log_z", "log_probs") + tuple(k for k in ("entropy", "log_sum_sq_probs", "mean_logits") if k in want)
        out = {name: hidden.new_empty(n, dtype=torch.float32) for name in names}
        if "is_top1" in want:
            out["is_top1"] = hidden.new_empty(n, dtype=torch.bool)
        keep = backward and n * weight.shape[0] * 4 <= KEEP_BYTES
        kept, buffer = [], None
        for start in range(0, n, CHUNK):
            rows = slice(start, start + CHUNK)
            h = hidden[rows]
            if keep or buffer is None or buffer.shape[0] != h.shape[0]:  # a kept slice's softmax lives in its buffer
                buffer = hidden.new_empty(h.shape[0], weight.shape[0], dtype=torch.float32)
            probs = _slice_stats(_project(h, weight, bias, dtype, buffer), targets[rows], out, rows, keep)
            if keep:
                kept.append(probs)
        ctx.save_for_backward(hidden, weight, bias if bias is not None else torch.empty(0), targets, out["log_z"])
        ctx.has_bias, ctx.dtype, ctx.kept = bias is not None, dtype, kept if keep else None
        stats = [out.get(k) for k in ("entropy", "log_sum_sq_probs", "mean_logits", "is_top1")]
        ctx.mark_non_differentiable(*[s for s in stats if s is not None])
        return (out["log_probs"], *stats)

    @staticmethod
    def backward(ctx, grad_log_probs, *_unused):  # no gradient flows into the statistics
        hidden, weight, bias, targets, log_z = ctx.saved_tensors
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        dtype = ctx.dtype
        kept, ctx.kept = ctx.kept, None  # used up: a second backward through this graph recomputes
        grad_h = torch.zeros_like(hidden, dtype=torch.float32) if need_h else None
        grad_w = torch.zeros_like(weight, dtype=torch.float32) if need_w else None
        grad_b = (
            torch.zeros(weight.shape[0], dtype=torch.float32, device=weight.device)
            if (need_b and ctx.has_bias)
            else None
        )
        buffer = None
        for i, start in enumerate(range(0, hidden.shape[0], CHUNK)):
            rows = slice(start, start + CHUNK)
            h = hidden[rows].to(dtype)
            if kept is not None:
                probs = kept[i]
            else:
                if buffer is None or buffer.shape[0] != h.shape[0]:
                    buffer = hidden.new_empty(h.shape[0], weight.shape[0], dtype=torch.float32)
                logits = _project(h, weight, bias if ctx.has_bias else None, dtype, buffer)
                probs = logits.sub_(log_z[rows].unsqueeze(-1)).exp_()
            # d log p(t) / d logits = onehot(t) - softmax, times the incoming gradient
            g = grad_log_probs[rows].unsqueeze(-1)
            d = probs.mul_(-g)
            d.scatter_add_(-1, targets[rows].unsqueeze(-1), g)
            for v in range(0, weight.shape[0], VOCAB_BLOCK):  # the head's weight cast a block at a time, as forward
                cols = slice(v, v + VOCAB_BLOCK)
                d_cols = d[:, cols].to(dtype)
                if grad_h is not None:
                    grad_h[rows] += (d_cols @ weight[cols].to(dtype)).float()
                if grad_w is not None:
                    grad_w[cols] += (d_cols.t() @ h).float()
            if grad_b is not None:
                grad_b += d.sum(0)
        return (
            None if grad_h is None else grad_h.to(hidden.dtype),
            None if grad_w is None else grad_w.to(weight.dtype),
            None if grad_b is None else grad_b.to(bias.dtype),
            None,
            None,
            None,
        )


def completion_log_probs(
    hidden: torch.Tensor, weight: torch.Tensor, bias, targets: torch.Tensor, outputs: tuple[str, ...]
):
    """Log-probability of each target under `hidden @ weight.T (+ bias)`, plus the requested statistics.

    hidden: [n, H] (completion positions only); targets: [n]. Returns (log_probs, entropy, log_sum_sq_probs,
    mean_logits, is_top1); statistics not in `outputs` are None. Only log_probs carries a gradient.
    """
    backward = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (hidden, weight, bias))
    return _ChunkedLogProb.apply(hidden, weight, bias, targets, tuple(outputs), backward)


def install_completion_head(
    model, outputs: tuple[str, ...] = ("log_probs", "entropy", "mean_logits", "is_top1"), packing: bool | None = None
) -> bool:
    """Replace TRL's fused LM head on `model` (a transformers model, not the PEFT wrapper) by the completion-only one.

    `packing`: None runs TRL's padded rows; False packs each pair as [prompt + chosen | prompt + rejected]; True
    as [prompt | chosen | rejected] with the prompt computed once (training/packing.py).

    Returns False, leaving TRL's head in place, where ours does not apply: CUDA (TRL's Triton path already scores
    only labelled positions), logit scaling or soft-capping, MoE router losses, or a TRL without the fused head.
    """
    FusedCausalLMOutput = trl_compat.fused_output_class()
    if FusedCausalLMOutput is None:
        return False
    if decline_reason(model) is not None or next(model.parameters()).device.type == "cuda":
        return False
    original = types.MethodType(type(model).forward, model)
    window = packing_mod.attention_window(model.config)

    def forward(self, *args, fused_lm_head=False, labels=None, shift_labels=None, num_items_in_batch=None, **kwargs):
        if not fused_lm_head:
            for name, value in (
                ("labels", labels),
                ("shift_labels", shift_labels),
                ("num_items_in_batch", num_items_in_batch),
            ):
                if value is not None:
                    kwargs[name] = value
            return original(*args, **kwargs)
        kwargs["use_cache"] = False
        packed = None
        plain = ("input_ids", "attention_mask", "use_cache", "return_dict")  # PEFT adds the rest as None
        if packing is not None and not args and all(not v for k, v in kwargs.items() if k not in plain):
            implementation = self.config._attn_implementation
            packed = packing_mod.plan(
                kwargs["input_ids"], kwargs.get("attention_mask"), labels, packing, implementation, self.dtype, window
            )
        if packed is None:
            hidden = self.base_model(*args, **kwargs).last_hidden_state
        else:
            self._twin_dpo_packed_tokens = packed.tokens  # real tokens in the packed rows (tests read it)
            hidden = self.base_model(
                input_ids=packed.input_ids,
                position_ids=packed.position_ids,
                attention_mask=packed.attention_mask,
                use_cache=False,
            ).last_hidden_state
            hidden = packing_mod.unpack(hidden, packed)
        if shift_labels is None:
            hidden, shift_labels = hidden[:, :-1], labels[:, 1:]
        mask = shift_labels != -100
        work.count_head(self, mask.sum())
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
    model._twin_dpo_head_forward = model.forward  # training/exact_eval.py tells it from accelerate's wrapper
    layout = {None: "padded rows", False: "packed pairs", True: "packed pairs, shared prompt"}[packing]
    model._twin_dpo_head = f"completion-only, {CHUNK} rows per slice, {layout}"  # part of the reference cache key
    return True


def install_on_trainer(trainer, packing: bool | None = None) -> bool:
    """Install the completion-only head on the trainer's policy and, if separate, its reference model."""
    policy = adapters.transformers_model(trainer.model)
    weighting = ("log_sum_sq_probs",) if trl_compat.uses_weighting(trainer) else ()
    outputs = ("log_probs", "entropy", "mean_logits", "is_top1") + weighting
    installed = install_completion_head(policy, outputs, packing)
    if installed and trainer.ref_model is not None:
        install_completion_head(trainer.accelerator.unwrap_model(trainer.ref_model), ("log_probs",), packing)
    return installed
