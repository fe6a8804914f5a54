"""The twin as a LoRA adapter: find it, check it fits the base, and set up policy + frozen reference copies.

The memory trick from seeds/000: load the base once; the twin's adapter is
loaded as the trainable policy (`default`) and copied into a frozen `ref`
adapter. The reference forward is the base with `ref` switched on, the policy
forward the base with `default`: one base, two small adapters. (TRL 1.15 and
1.16 both make the `ref` copy when handed a PeftModel without a ref_model;
`ensure_reference_copy` checks it happened, makes it if not, and freezes it.)
"""

from __future__ import annotations

import json
from pathlib import Path

from pipeline import run_folder
from pipeline.errors import UserError

REF = "ref"


def transformers_model(model):
    """The transformers model inside a PEFT wrapper, or `model` itself when it is not wrapped: where the training
    levers (completion head, lean linears, compiled layers) and the FLOP counter install."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def resolve(spec: str, key: str = "model.adapter") -> Path:
    """An adapter folder, a run folder holding adapter/, or `runs:<recipe>` = that recipe's newest finished run."""
    if spec.startswith("runs:"):
        name = spec.split(":", 1)[1]
        candidates = run_folder.find_runs(name, needs="adapter")
        if not candidates:
            raise UserError(
                f"{key}={spec}: no finished {name} run with an adapter in {run_folder.RUNS}/; "
                "train the twin first (make sft)"
            )
        spec = str(candidates[-1])
    path = Path(spec).expanduser()
    if (path / "adapter" / "adapter_config.json").is_file():
        path = path / "adapter"
    if not (path / "adapter_config.json").is_file():
        raise UserError(f"{key}: {spec} is not a LoRA adapter (no adapter_config.json) and not a run folder with one")
    return path


def check_fits(adapter_dir: Path, model_config: dict, model_path: str, key: str = "model.adapter") -> None:
    """One line naming both sides when the adapter was made for another base (shapes or architecture)."""
    from safetensors import safe_open

    config = json.loads((adapter_dir / "adapter_config.json").read_text())
    made_for = config.get("base_model_name_or_path") or "an unknown base"
    files = list(adapter_dir.glob("adapter_model.safetensors"))
    if not files:
        raise UserError(f"{key}: {adapter_dir} has no adapter_model.safetensors (pickle adapters are not loaded)")
    hidden = model_config.get("hidden_size")
    with safe_open(str(files[0]), "pt") as handle:
        for name in handle.keys():
            if "lora_A" in name and any(
                f".{p}." in name for p in ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj")
            ):
                in_features = handle.get_slice(name).get_shape()[1]
                if hidden is not None and in_features != hidden:
                    raise UserError(
                        f"{key}: adapter {adapter_dir} was made for another base ({made_for}, hidden size "
                        f"{in_features}) than model.name_or_path {model_path} (hidden size {hidden})"
                    )
                break


def load_policy(base, adapter_dir: Path):
    """The twin adapter on the base as the trainable `default` adapter."""
    from peft import PeftModel

    try:
        return PeftModel.from_pretrained(base, str(adapter_dir), is_trainable=True)
    except (RuntimeError, ValueError, KeyError) as err:
        raise UserError(f"model.adapter: cannot load {adapter_dir} on this base: {str(err).splitlines()[0]}") from None


def ensure_reference_copy(model) -> None:
    """Make sure `ref` is a frozen, bitwise copy of `default` (TRL normally made it already)."""
    if REF not in model.peft_config:
        model.add_adapter(REF, model.peft_config["default"])
        for name, param in model.named_parameters():
            if ".default." in name:
                model.get_parameter(name.replace(".default.", f".{REF}.")).data.copy_(param.data)
    model.set_adapter("default")
    for name, param in model.named_parameters():
        if f".{REF}." in name:
            param.requires_grad_(False)


def merged_copy(base_loader, adapter_dir: Path):
    """The other way to hold the reference: the twin adapter merged into a second full copy of the base."""
    from peft import PeftModel

    ref = PeftModel.from_pretrained(base_loader(), str(adapter_dir)).merge_and_unload().eval()
    for param in ref.parameters():
        param.requires_grad_(False)
    return ref
