"""RMSNorm layers that keep their input for the backward pass in the autocast dtype, not in float32.

Under bf16 autocast the residual stream of a Llama-family model stays float32 (the embeddings are float32 and each
residual add promotes), and each decoder layer's two RMSNorms keep their float32 input for the backward: per token
and layer 2 x hidden x 4 bytes, a quarter of what a LoRA step keeps at long sequences (SmolLM2, 1,024 tokens: 237
MB of the ~960 MB a pair keeps; the bf16 copy halves it). `_RMSNorm` computes the forward the module computes, op
for op (the same output, bit for bit), and keeps a bf16 copy of the input and the float32 reciprocal RMS (one
number per token); its backward is RMSNorm's closed-form gradient in float32 from that copy. The gradient then
carries the bf16 rounding of the input (relative 2^-9), as every product of the autocast matmuls around it already
does; it is not autograd's gradient bit for bit, which is why this is a lever of its own (`TWIN_DPO_NORM_BF16=0`
keeps the float32 input; `make bench` measures it). tests/test_lean_norm.py checks the forward bit for bit, the
backward against autograd's, and the bytes kept.

Switched only where a probe input gives the module's own output (Llama, Qwen, Mistral, SmolLM:
`weight * (x * rsqrt(mean(x^2) + eps)).to(x.dtype)`; Gemma's `1 + weight` keeps its own), only in the decoder
layers, and only while gradients are taken under autocast: evaluation and float32 runs use the module's forward.
"""

from __future__ import annotations

import os
import types

import torch

from pipeline.training import lean_linear


def _norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(RMSNorm of `x`, the reciprocal RMS per token): the Llama family's forward, op for op."""
    h = x.to(torch.float32)
    rstd = torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * (h * rstd).to(x.dtype), rstd


class _RMSNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, eps: float, low_dtype: torch.dtype):
        out, rstd = _norm(x, weight, eps)
        ctx.save_for_backward(x.to(low_dtype), rstd, weight)
        ctx.x_dtype = x.dtype
        return out

    @staticmethod
    def backward(ctx, grad):
        low, rstd, weight = ctx.saved_tensors
        need_x, need_w = ctx.needs_input_grad[:2]
        normed = low.to(torch.float32) * rstd
        grad_x = grad_w = None
        if need_x:
            g = grad.to(torch.float32) * weight.to(torch.float32)
            grad_x = (rstd * (g - normed * (g * normed).mean(-1, keepdim=True))).to(ctx.x_dtype)
        if need_w:
            grad_w = (grad * normed.to(ctx.x_dtype)).reshape(-1, grad.shape[-1]).sum(0).to(weight.dtype)
        return grad_x, grad_w, None, None


def _eps(module) -> float | None:
    for name in ("variance_epsilon", "eps"):
        value = getattr(module, name, None)
        if isinstance(value, float):
            return value
    return None


def _forward(self, x):
    device = x.device.type
    if not (torch.is_grad_enabled() and torch.is_autocast_enabled(device)):
        return self._twin_dpo_norm_forward(x)
    low = torch.get_autocast_dtype(device)
    if x.element_size() <= torch.finfo(low).bits // 8:  # already as narrow: nothing to save
        return self._twin_dpo_norm_forward(x)
    return _RMSNorm.apply(x, self.weight, self._twin_dpo_eps, low)


def _switch(norm) -> bool:
    """Give `norm` the lean forward if it computes what its own does on a probe input (float32, no autocast, a
    generator of its own so the run's random stream is untouched); else leave it as it was."""
    weight, eps = getattr(norm, "weight", None), _eps(norm)
    if not isinstance(weight, torch.nn.Parameter) or weight.dim() != 1 or eps is None:
        return False
    probe = torch.randn(3, weight.shape[0], generator=torch.Generator().manual_seed(0)).to(weight.device)
    own = norm.forward
    with torch.no_grad(), torch.autocast(weight.device.type, enabled=False):
        try:
            expected = own(probe)
            same = torch.equal(_norm(probe, weight, eps)[0], expected)
        except RuntimeError:
            same = False
    if same:
        norm._twin_dpo_norm_forward, norm._twin_dpo_eps = own, eps
        norm.forward = types.MethodType(_forward, norm)
    return same


def enabled() -> bool:
    return os.environ.get("TWIN_DPO_NORM_BF16", "1").strip() != "0"


def install(model) -> int:
    """Switch every RMSNorm in the decoder layers of `model` that passes the probe (module docstring); returns
    how many (0 with TWIN_DPO_NORM_BF16=0)."""
    if not enabled():
        return 0
    count = 0
    for module in lean_linear.decoder_modules(model):
        if not type(module).__name__.endswith("RMSNorm"):
            continue
        if getattr(module, "_twin_dpo_norm_forward", None) is not None or _switch(module):
            count += 1
    return count
