"""Linear layers that keep one low-precision copy of each input for the backward pass, and no weight copy.

Under autocast (bf16 on a CPU with native bf16, or CUDA) each `nn.Linear` casts its float32 input and weight to
bf16 and autograd keeps both casts until the backward pass. In a LoRA decoder layer that is, per token, six bf16
copies of the attention input (q, k and v, each base layer and each LoRA A), four of the MLP input, two of the
attention and MLP outputs, and per step a bf16 copy of every frozen weight (135M model: 0.2 GB), all alive until
their layer's backward. Here every linear in the decoder layers runs through `_LeanLinear`: the input's cast is
made once and shared by every layer that reads the same tensor, the weight is cast for the matmul and dropped, and
the backward casts it again (one cast per layer, cheap beside the matmuls); a frozen layer keeps no input at all
(only its weight's gradient would read it), so a LoRA layer's input is kept once, by LoRA A. PEFT's LoRA layer
upcasts a bf16 input (the o and down projections read the attention's and the MLP's bf16 outputs) to the
adapter's float32 before LoRA A, and autocast casts it straight back: LoRA A would keep that second bf16 copy, not
the tensor the attention keeps anyway (o) or the MLP recomputes (down, below). That upcast is switched off. The
forward computes the same bf16 matmuls, the backward the same products (tests/test_lean_linear.py: the same loss
and gradients, bit for bit; fewer bytes kept).

Off without autocast (float32 runs save the float32 input, which the three projections already share, and the
parameter itself), under no_grad (nothing is kept), and for quantised layers (bitsandbytes' own classes).

The gated MLP of the Llama family (Llama, Qwen, Mistral, SmolLM: `down(silu(gate(x)) * up(x))`) keeps four
intermediate-sized tensors per token for the backward: silu's input, both factors of the product, and the
product (the down projection's input, kept by its LoRA A). `_SwiGLU` keeps the gate and up outputs only: silu(gate)
is recomputed in its backward and the product in LoRA A's (the product carries its factors, `PRODUCT`), two
elementwise passes. Two intermediate-sized tensors less per token and layer (1,024 tokens x 4 pairs on SmolLM2,
measured: peak 9.46 -> 8.92 GB for the first), the same gradients (the same kernels on the same bf16 values). An
MLP is switched only after it gives the same output on a probe input, so a family whose MLP differs keeps its own.
"""

from __future__ import annotations

import types

import torch
import torch.nn.functional as F

from pipeline.model import adapters
from pipeline.training import compiled, held_weights

CAST = "_twin_dpo_cast"  # the input tensor's attribute: (version, dtype, its cast), shared by its readers
LEAN = "_twin_dpo_lean"  # set on a model whose linears were replaced
PRODUCT = "_twin_dpo_swiglu"  # a SwiGLU product's attribute: its factors (gate, up), detached


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
    def forward(ctx, x, low, weight, bias, gate, up):
        dtype = low.dtype
        out = F.linear(low, weight.to(dtype), None if bias is None else bias.to(dtype))
        # the input is kept only for the weight's gradient (a frozen weight needs none), and a SwiGLU product is
        # not kept at all: its factors are (the MLP's backward keeps them), and it is recomputed from them
        keep = () if not ctx.needs_input_grad[2] else (gate, up) if gate is not None else (low,)
        ctx.save_for_backward(weight, *keep)
        ctx.x_dtype, ctx.has_bias = x.dtype, bias is not None
        ctx.bias_dtype = None if bias is None else bias.dtype
        return out

    @staticmethod
    def backward(ctx, grad):
        weight, *keep = ctx.saved_tensors
        need_x, _, need_w, need_b = ctx.needs_input_grad[:4]
        grad_x = (grad @ weight.to(grad.dtype)).to(ctx.x_dtype) if need_x else None
        flat = grad.reshape(-1, grad.shape[-1])
        grad_w = None
        if need_w:
            low = F.silu(keep[0]) * keep[1] if len(keep) == 2 else keep[0]
            grad_w = (flat.t() @ low.reshape(-1, low.shape[-1])).to(weight.dtype)
        grad_b = flat.sum(0).to(ctx.bias_dtype) if (need_b and ctx.has_bias) else None
        return grad_x, None, grad_w, grad_b, None, None


def _forward(self, x):
    device = x.device.type
    if not (torch.is_grad_enabled() and torch.is_autocast_enabled(device)) or not x.is_floating_point():
        weight = self.weight
        if weight.dtype != x.dtype and x.dtype == torch.float32 and not torch.is_autocast_enabled(device):
            weight = held_weights.float32_weight(weight)  # held in bf16 for training: its float32 values
        return F.linear(x, weight, self.bias)
    low = _cast(x, torch.get_autocast_dtype(device))
    gate, up = getattr(x, PRODUCT, (None, None)) if low.dtype == x.dtype else (None, None)
    return _LeanLinear.apply(x, low, self.weight, self.bias, gate, up)


class _SwiGLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gate, up):
        ctx.save_for_backward(gate, up)
        return F.silu(gate) * up

    @staticmethod
    def backward(ctx, grad):
        gate, up = ctx.saved_tensors
        need_gate, need_up = ctx.needs_input_grad
        grad_gate = torch.ops.aten.silu_backward(grad * up, gate).to(gate.dtype) if need_gate else None
        grad_up = (grad * F.silu(gate)).to(up.dtype) if need_up else None
        return grad_gate, grad_up


def _mlp_forward(self, x):
    if not torch.is_grad_enabled():
        return self._twin_dpo_mlp_forward(x)
    gate, up = self.gate_proj(x), self.up_proj(x)
    product = _SwiGLU.apply(gate, up)
    setattr(product, PRODUCT, (gate.detach(), up.detach()))  # LoRA A of the down projection recomputes it
    return self.down_proj(product)


def _is_silu(module) -> bool:
    return isinstance(module, torch.nn.SiLU) or type(module).__name__ == "SiLUActivation"


def _switch(mlp, gate) -> bool:
    """Give `mlp` the lean forward if it computes what its own does on a probe input (float32, no autocast; a
    generator of its own, so the run's random stream is untouched); else leave it as it was."""
    own = mlp.forward
    weight = next((p for p in gate.parameters() if p.is_floating_point()), None)
    if weight is None or not hasattr(gate, "in_features"):
        return False
    probe = torch.randn(2, gate.in_features, generator=torch.Generator().manual_seed(0), dtype=weight.dtype).to(
        weight.device
    )
    mlp._twin_dpo_mlp_forward = own
    mlp.forward = types.MethodType(_mlp_forward, mlp)
    try:
        with torch.autocast(weight.device.type, enabled=False):
            with torch.no_grad():
                expected = own(probe)
            with torch.enable_grad():
                same = torch.equal(mlp(probe), expected)
    except RuntimeError:
        same = False
    if not same:
        mlp.forward = own
        del mlp._twin_dpo_mlp_forward
    return same


def install_mlps(model) -> int:
    """Replace the forward of every gated SiLU MLP in the decoder layers of `model` (module docstring) whose
    output on a probe input is that of its own forward; returns how many."""
    base = adapters.transformers_model(model)
    count = 0
    for layer in compiled.decoder_layers(base) or []:
        mlp = getattr(layer, "mlp", None)
        parts = [getattr(mlp, name, None) for name in ("gate_proj", "up_proj", "down_proj")]
        if mlp is None or None in parts or not _is_silu(getattr(mlp, "act_fn", None)):
            continue
        if getattr(mlp, "_twin_dpo_mlp_forward", None) is None and not _switch(mlp, parts[0]):
            continue
        count += 1
    return count


def decoder_modules(model):
    """Every module inside the decoder layers of `model` (PEFT or transformers): where the lean layers go."""
    for layer in compiled.decoder_layers(adapters.transformers_model(model)) or []:
        yield from layer.modules()


def linears(model) -> list[torch.nn.Linear]:
    """The plain `nn.Linear` layers in the decoder layers of `model` (PEFT or transformers): base layers and LoRA
    A / B, what `install` switches (and training/held_weights.py holds the frozen weights of)."""
    return [m for m in decoder_modules(model) if type(m) is torch.nn.Linear]


def install(model) -> int:
    """Replace the forward of every plain `nn.Linear` in the decoder layers of `model` (`linears`); returns how
    many. The LM head is left alone (training/fast_head.py casts it a block of words at a time)."""
    base = adapters.transformers_model(model)
    if getattr(base, LEAN, 0):
        return getattr(base, LEAN)
    switched = linears(model)
    for module in switched:
        module.forward = types.MethodType(_forward, module)
    for module in decoder_modules(model):
        adapters_a = getattr(module, "lora_A", None)
        if isinstance(adapters_a, torch.nn.ModuleDict) and all(type(a) is torch.nn.Linear for a in adapters_a.values()):
            # PEFT upcasts a bf16 input (the o and down projections') to the adapter's float32 for LoRA A,
            # which autocast casts straight back: a second bf16 copy kept for the backward. Off: both read it.
            module.cast_input_dtype_enabled = False
    count = len(switched)
    setattr(base, LEAN, count)
    return count
