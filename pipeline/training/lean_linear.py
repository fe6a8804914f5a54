"""Linear layers that keep one low-precision copy of each input for the backward pass, and no weight copy.

Under autocast (bf16 on a CPU with native bf16, or CUDA) each `nn.Linear` casts its float32 input and weight to
bf16 and autograd keeps both casts until the backward pass. In a LoRA decoder layer that is, per token, six bf16
copies of the attention input (q, k and v, each base layer and each LoRA A), four of the MLP input, two of the
attention and MLP outputs, and per step a bf16 copy of every frozen weight (135M model: 0.2 GB), all alive until
their layer's backward. Here every linear in the decoder layers runs through `_LeanLinear`: the input's cast is
made once and shared by every layer that reads the same tensor, the weight is cast for the matmul and dropped, and
the backward casts it again (one cast per layer, cheap beside the matmuls). The forward computes the same bf16
matmuls; the backward the same products, each input gradient cast to float32 before autograd sums them, as
autocast's own cast does (tests/test_lean_linear.py: same loss and gradients; fewer bytes kept).

Off without autocast (float32 runs save the float32 input, which the three projections already share, and the
parameter itself), under no_grad (nothing is kept), and for quantised layers (bitsandbytes' own classes).
"""

from __future__ import annotations

import types

import torch
import torch.nn.functional as F

from pipeline.model import adapters
from pipeline.training import compiled, held_weights

CAST = "_twin_dpo_cast"  # the input tensor's attribute: (version, dtype, its cast), shared by its readers
LEAN = "_twin_dpo_lean"  # set on a model whose linears were replaced


def _cast(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """`x` in `dtype`, cast once per tensor (while it is not modified in place) however many layers read it."""
    if x.dtype == dtype:
        return x.detach()
    cached = getattr(x, CAST, None)
    if cached is not None and cached[0] == x._version and cached[1] == dtype:
        return cached[2]
    with torch.no_grad():
        low = x.to(dtype)
    setattr(x, CAST, (x._version, dtype, low))
    return low


class _LeanLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, low, weight, bias):
        dtype = low.dtype
        out = F.linear(low, weight.to(dtype), None if bias is None else bias.to(dtype))
        ctx.save_for_backward(low, weight)
        ctx.x_dtype, ctx.has_bias = x.dtype, bias is not None
        ctx.bias_dtype = None if bias is None else bias.dtype
        return out

    @staticmethod
    def backward(ctx, grad):
        low, weight = ctx.saved_tensors
        need_x, _, need_w, need_b = ctx.needs_input_grad
        grad_x = (grad @ weight.to(low.dtype)).to(ctx.x_dtype) if need_x else None
        flat = grad.reshape(-1, grad.shape[-1])
        grad_w = (flat.t() @ low.reshape(-1, low.shape[-1])).to(weight.dtype) if need_w else None
        grad_b = flat.sum(0).to(ctx.bias_dtype) if (need_b and ctx.has_bias) else None
        return grad_x, None, grad_w, grad_b


def _forward(self, x):
    device = x.device.type
    if not (torch.is_grad_enabled() and torch.is_autocast_enabled(device)) or not x.is_floating_point():
        weight = self.weight
        if weight.dtype != x.dtype and x.dtype == torch.float32 and not torch.is_autocast_enabled(device):
            weight = held_weights.float32_weight(weight)  # held in bf16 for training: its float32 values
        return F.linear(x, weight, self.bias)
    return _LeanLinear.apply(x, _cast(x, torch.get_autocast_dtype(device)), self.weight, self.bias)


def install(model) -> int:
    """Replace the forward of every plain `nn.Linear` in the decoder layers of `model` (PEFT or transformers):
    base layers and LoRA A / B; returns how many. The LM head is left alone (training/fast_head.py casts it a block
    of words at a time)."""
    base = adapters.transformers_model(model)
    if getattr(base, LEAN, 0):
        return getattr(base, LEAN)
    count = 0
    for layer in compiled.decoder_layers(base) or []:
        for module in layer.modules():
            if type(module) is torch.nn.Linear:
                module.forward = types.MethodType(_forward, module)
                count += 1
    setattr(base, LEAN, count)
    return count
