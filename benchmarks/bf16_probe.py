"""Where does bf16 autocast lose a small LoRA update? A probe on the embedded model (or any model folder).

Puts a LoRA adapter (r 32 on all seven projections) on the model with lora_B drawn at a given scale (the size a
few optimizer steps at a low learning rate give it), then computes per-sequence completion log-prob sums of
held-out chosen and rejected answers with the adapter on (policy) and off (reference), under:

  fp32                  no autocast: the truth
  bf16                  CPU bf16 autocast as PEFT and the LM head run it today
  bf16 + fp32 branch    the adapter branch and its sum in fp32 (install_fp32_branch below)
  bf16 + fp32 head      the LM head and log-softmax in fp32
  bf16 + both

and reports, per scale, how far each policy-minus-reference delta is from fp32's, and how often the DPO
comparison (delta_chosen - delta_rejected > 0) agrees with fp32's.

    .venv/bin/python benchmarks/bf16_probe.py [--model DIR] [--pairs 16] [--scales 1e-5,1e-4,1e-3]
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import types

import torch
import torch.nn.functional as F


def completion_logps(model, batch, fp32_head: bool) -> torch.Tensor:
    """Sum of log p(completion token) per row; batch = (input_ids, attention_mask, completion_mask)."""
    ids, attn, comp = batch
    base = model.get_base_model()
    hidden = base.model(input_ids=ids, attention_mask=attn).last_hidden_state[:, :-1]
    head = base.get_output_embeddings()
    if fp32_head:
        with torch.autocast("cpu", enabled=False):
            logits = F.linear(hidden.float(), head.weight.float())
    else:
        logits = head(hidden).float()
    logp = logits.log_softmax(-1).gather(-1, ids[:, 1:].unsqueeze(-1)).squeeze(-1)
    return (logp * comp[:, 1:]).sum(-1)


def encode(tokenizer, rows, side: str):
    seqs, masks = [], []
    for row in rows:
        p = tokenizer(row["prompt"], add_special_tokens=True)["input_ids"]
        c = tokenizer(row[side], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        seqs.append(p + c)
        masks.append([0] * len(p) + [1] * len(c))
    width = max(map(len, seqs))
    pad = tokenizer.pad_token_id
    ids = torch.tensor([s + [pad] * (width - len(s)) for s in seqs])
    attn = torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in seqs])
    comp = torch.tensor([m + [0] * (width - len(m)) for m in masks])
    return ids, attn, comp


def main() -> None:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from pipeline import data as data_mod
    from pipeline.model import paths, runtime
    from pipeline.recipe import ALL_LINEAR, DataConfig

    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=None, help="model folder (default: the embedded SmolLM2-135M-Instruct)")
    ap.add_argument("--pairs", type=int, default=16)
    ap.add_argument("--scales", default="1e-5,1e-4,1e-3")
    args = ap.parse_args()
    runtime.quiet_libraries()
    folder = args.model or str(paths.embedded_model_dir())
    tokenizer = AutoTokenizer.from_pretrained(folder)
    _, held = data_mod.load_splits(DataConfig())
    rows = data_mod.templated(tokenizer, held[: args.pairs], None)
    batches = {side: encode(tokenizer, rows, side) for side in ("chosen", "rejected")}
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    model = get_peft_model(model, LoraConfig(r=32, lora_alpha=32, target_modules=list(ALL_LINEAR)))
    modes = {
        "fp32": (False, False, False),
        "bf16": (True, False, False),
        "bf16 + fp32 branch": (True, True, False),
        "bf16 + fp32 head": (True, False, True),
        "bf16 + both": (True, True, True),
    }
    print(f"model {folder}; {len(rows)} held-out pairs; tokens per row up to {batches['chosen'][0].shape[1]}")
    for scale in [float(s) for s in args.scales.split(",")]:
        gen = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for name, param in model.named_parameters():
                if "lora_B" in name:
                    param.copy_(torch.randn(param.shape, generator=gen) * scale)
        deltas = {}
        for mode, (bf16, branch, head32) in modes.items():
            if branch and not fp32_branch_installed(model):
                install_fp32_branch(model)
            out = {}
            for side, batch in batches.items():
                with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                    if not branch:  # the probe's own switch: the hooks are on, so skip them by swapping the flag
                        ctx = _without_branch(model)
                    else:
                        ctx = contextlib.nullcontext()
                    with ctx:
                        pol = completion_logps(model, batch, head32)
                        with model.disable_adapter():
                            ref = completion_logps(model, batch, head32)
                out[side] = pol - ref
            deltas[mode] = out
        truth = deltas["fp32"]
        true_margin = truth["chosen"] - truth["rejected"]
        print(
            f"\nlora_B scale {scale:g}: fp32 |policy - reference| per sequence, median "
            f"{statistics.median(truth['chosen'].abs().tolist()):.4g} nats"
        )
        print(f"  {'mode':<20} {'median |error| (nats)':>22} {'error / |delta|':>16} {'DPO sign agrees':>16}")
        for mode, out in deltas.items():
            err = torch.cat([out[s] - truth[s] for s in out]).abs()
            rel = err.median() / torch.cat([truth[s] for s in truth]).abs().median()
            margin = out["chosen"] - out["rejected"]
            agree = ((margin > 0) == (true_margin > 0)).float().mean()
            print(f"  {mode:<20} {err.median().item():>22.4g} {rel.item():>16.3f} {agree.item():>16.2f}")


@contextlib.contextmanager
def _without_branch(model):
    """Run the model as PEFT does (bf16 branch) although the fp32 branch is installed: undo its two changes."""
    if not fp32_branch_installed(model):
        yield
        return
    saved = []
    for module in model.modules():
        if getattr(module, MARK, False) and "forward" in module.__dict__:
            saved.append((module, module.__dict__.pop("forward")))
    hooks = []
    for module in model.modules():
        for key, hook in list(module._forward_hooks.items()):
            if hook is _widen:
                hooks.append((module, key, module._forward_hooks.pop(key)))
    try:
        yield
    finally:
        for module, forward in saved:
            module.forward = forward
        for module, key, hook in hooks:
            module._forward_hooks[key] = hook


# The fp32 adapter branch, tried as the fix and kept here as the experiment: it keeps the base matmul in bf16,
# widens its output to fp32 and runs the adapter's two small matmuls in fp32, so the sum does not round a small
# update away. Measured above: it does not make the bf16 policy-minus-reference difference right, because every
# later bf16 matmul rounds the (now exact) residual stream again.
MARK = "_twin_dpo_fp32_branch"


def _widen(_module, _inputs, output):
    """Forward hook on the frozen base layer: its autocast output in fp32 (the LoRA sum then happens in fp32)."""
    if (
        isinstance(output, torch.Tensor)
        and output.dtype != torch.float32
        and torch.is_autocast_enabled(output.device.type)
    ):
        return output.float()
    return output


def _fp32_linear(self, x):
    """An adapter matrix (lora_A / lora_B) in fp32 even under autocast: r is small, so this costs little."""
    if not torch.is_autocast_enabled(x.device.type):
        return F.linear(x, self.weight, self.bias)
    with torch.autocast(x.device.type, enabled=False):
        bias = None if self.bias is None else self.bias.float()
        return F.linear(x.float(), self.weight.float(), bias)


def install_fp32_branch(model) -> int:
    """Put every LoRA layer of `model` (a PEFT model, any adapters it holds now) on the fp32 branch; returns how
    many layers. Idempotent; adapters added later need another call."""
    from peft.tuners.lora import LoraLayer

    layers = 0
    for module in model.modules():
        if not isinstance(module, LoraLayer) or not isinstance(getattr(module, "base_layer", None), torch.nn.Module):
            continue
        if not getattr(module, MARK, False):
            module.base_layer.register_forward_hook(_widen)
            setattr(module, MARK, True)
        for table in (module.lora_A, module.lora_B):
            for linear in table.values():
                if isinstance(linear, torch.nn.Linear) and not getattr(linear, MARK, False):
                    linear.forward = types.MethodType(_fp32_linear, linear)
                    setattr(linear, MARK, True)
        layers += 1
    return layers


def fp32_branch_installed(model) -> bool:
    return any(getattr(m, MARK, False) for m in model.modules())


if __name__ == "__main__":
    main()
