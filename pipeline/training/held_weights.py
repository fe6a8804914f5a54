"""Frozen decoder weights held in bf16 while training computes in bf16: no per-step casts, half their memory.

On a CPU the weights load in float32 (the optimizer needs float32 for what trains) and bf16 autocast casts each
frozen linear weight to bf16 for every matmul: twice a step, as the lean linears (training/lean_linear.py) keep
no copy between the forward and the backward. On SmolLM2-135M those casts of the 106M decoder weights cost about
0.1 s a step (6% of a warm step, 10% of a 128-token one) and their float32 copies hold 0.42 GB.

Here, for the run, each frozen weight of a lean linear is held as the very tensor autocast's cast makes (bf16,
round to nearest even), so the matmuls read the same numbers without casting. Its float32 values go to a
temporary file in the run folder, unlinked at once (the system frees it however the process ends; nothing is
written for a weight bf16 holds exactly, as in a bf16 checkpoint). A pass that computes in float32 (held-out
evaluation and its reference log-probs: training/exact_eval.py) reads each layer's float32 weight back as it
comes to it and drops it after, so it needs one layer's float32 weight at a time, not the model's. The end of
training puts the float32 weights back for good. So every figure is the one the float32 weights give
(tests/test_held_weights.py: the same losses, gradients and held-out numbers, bit for bit).

A model loaded from safetensors keeps its weights in one private mapping of the file, so swapping a weight's
tensor frees nothing by itself: the pages of the float32 weights are handed back to the system explicitly.

Only under autocast, in a single process (DDP, FSDP and DeepSpeed wrap the parameters as they find them), for
frozen float32 weights on the CPU; not with torch.compile or Unsloth, where the lean linears are not installed.
If the file cannot be written (a full disk) the weights stay float32, as before, and the run says so.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch

from pipeline.model import runtime

SLOT = "_twin_dpo_held"  # a held weight's attribute: (its Held, its index there)


class Held:
    def __init__(self, params: list[torch.nn.Parameter], offsets: list[int | None], dtype: torch.dtype, spill):
        self.params, self.offsets, self.dtype, self.spill = params, offsets, dtype, spill
        self.restored = False

    def describe(self) -> str:
        exact = sum(o is None for o in self.offsets)
        return (
            f"{len(self.params)} frozen decoder weights held in {str(self.dtype).removeprefix('torch.')} for "
            f"training ({exact} of them exactly; float32 passes read the others' float32 values from a "
            "temporary file)"
        )

    def float32(self, index: int) -> torch.Tensor:
        """Weight `index` in float32: the values it had before it was held."""
        p, offset = self.params[index], self.offsets[index]
        if offset is None:
            return p.detach().to(torch.float32)
        full = torch.empty(p.shape, dtype=torch.float32)
        self.spill.seek(offset)
        if self.spill.readinto(memoryview(full.numpy()).cast("B")) != full.numel() * 4:
            raise OSError(f"the temporary float32 copy of the frozen weights ({self.spill.name}) came back short")
        return full

    def restore(self) -> None:
        """The float32 weights back for good (after training); closing the file frees its disk space."""
        if self.restored:
            return
        for i, p in enumerate(self.params):
            p.data = self.float32(i)
            delattr(p, SLOT)
        self.restored = True
        if self.spill is not None:
            self.spill.close()


def float32_weight(weight: torch.Tensor) -> torch.Tensor:
    """`weight` for a float32 pass: its float32 values if it is held, else it as it is (cast if need be)."""
    slot = getattr(weight, SLOT, None)
    return slot[0].float32(slot[1]) if slot is not None else weight.to(torch.float32)


def float32_view(model):
    """A function giving, for a tensor of `model`'s state dict, its float32 values if its weight is held, else the
    tensor itself: what the reference cache's key hashes, so the key is the same with the weights held or not."""
    held = {p.data_ptr(): p for p in model.parameters() if hasattr(p, SLOT)}

    def view(tensor: torch.Tensor) -> torch.Tensor:
        weight = held.get(tensor.data_ptr())
        return float32_weight(weight) if weight is not None and weight.dtype == tensor.dtype else tensor

    return view


def hold(linears: list[torch.nn.Linear], autocast: str, directory: Path) -> Held | None:
    """Hold the frozen float32 CPU weights of `linears` (training/lean_linear.py's `linears`) in the `autocast`
    dtype, bf16 or fp16 (module docstring); None if there are none or their float32 copy cannot be written to
    `directory` (nothing changed)."""
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[autocast]
    params = [
        m.weight
        for m in linears
        if not m.weight.requires_grad and m.weight.dtype == torch.float32 and m.weight.device.type == "cpu"
    ]
    if not params:
        return None
    offsets: list[int | None] = []
    spill = None
    try:
        for p in params:
            if torch.equal(p.detach().to(dtype).to(torch.float32), p.detach()):
                offsets.append(None)
                continue
            if spill is None:
                spill = tempfile.TemporaryFile(prefix=".twin-dpo-float32-", dir=directory)
            offsets.append(spill.tell())
            spill.write(memoryview(p.detach().numpy()).cast("B"))
        if spill is not None:
            spill.flush()
    except OSError as err:
        if spill is not None:
            spill.close()
        print(
            f"[twin-dpo] frozen weights stay float32 (each step casts them): no room for their temporary copy in "
            f"{directory} ({err.strerror or err})",
            flush=True,
        )
        return None
    held = Held(params, offsets, dtype, spill)
    for i, p in enumerate(params):
        original = p.data
        p.data = original.to(dtype)  # the cast autocast makes: round to nearest even
        setattr(p, SLOT, (held, i))
        runtime.release_pages(original)  # its values are in bf16 or in the file; nothing reads it again
        del original
    return held
