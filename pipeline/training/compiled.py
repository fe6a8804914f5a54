"""`train.compile`: torch.compile (inductor) on each transformer block, the "regional" way.

The model's decoder layers are all one class running one code object, so dynamo traces and inductor compiles
that block once (the adapter's LoRA products inside it, shapes marked dynamic so the packed rows' varying
length does not recompile at every step) and every layer reuses it; the embedding, our LM head and TRL's loss
stay eager. Compiling the whole model instead costs minutes on a 2-core CPU and recompiles with each row length.

A few variants are compiled once each, on first use: the training forward and its backward, the no-grad
reference pass with the adapter switched off, and the float32 held-out evaluation (its own autocast state).
Inductor on a CPU needs a C++ compiler; the check before any weight is loaded says so where none is found.
The time it all takes is inside the run's own timings: a lever that does not win including its compile time
does not win (README, "Faster where users feel it").
"""

from __future__ import annotations

import os
import shutil

import torch

from pipeline.errors import UserError
from pipeline.model import adapters
from pipeline.training.reference import COMPILED


def check(recipe, device: str) -> None:
    """Before a weight is loaded: inductor on a CPU compiles C++; without a compiler every step would fail."""
    if not recipe.train.compile or device != "cpu":
        return
    if not any(shutil.which(c) for c in filter(None, (os.environ.get("CXX"), "g++", "c++", "clang++"))):
        raise UserError(
            "train.compile=true: torch.compile on a CPU builds C++ code and no C++ compiler (g++, clang++, or $CXX) "
            "was found on PATH; install one (Debian: apt install g++) or set train.compile=false"
        )


def decoder_layers(model) -> list[torch.nn.Module] | None:
    """The model's repeated transformer blocks: the ModuleList of num_hidden_layers modules of one class."""
    config = getattr(model, "config", None)
    text = config.get_text_config() if config is not None and hasattr(config, "get_text_config") else config
    n = getattr(text, "num_hidden_layers", None)
    for module in model.modules():
        if isinstance(module, torch.nn.ModuleList) and n and len(module) == n:
            if len({type(layer) for layer in module}) == 1:
                return list(module)
    return None


def install(model) -> str:
    """Compile each decoder layer of `model` (a PEFT or transformers model) in place; returns what was done, for
    the run's summary and its first lines."""
    base = adapters.transformers_model(model)
    layers = decoder_layers(base)
    if layers is None:
        return "off (no repeated decoder layers found to compile)"
    # one variant per (grad mode, first layer's input needing grad or not, adapter on/off, autocast): past the
    # default limit of 8 dynamo would run the remaining layers eagerly with a warning
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 16)
    for layer in layers:
        layer.compile(dynamic=True)
    setattr(base, COMPILED, True)  # the reference cache key tells compiled numbers from eager ones
    return f"inductor, each of the {len(layers)} {type(layers[0]).__name__} blocks (compiled on first use)"
