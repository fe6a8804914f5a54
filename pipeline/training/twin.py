"""The embedded twin: an SFT recipe's result, merged into a normal model folder, built once and cached.

`model.name_or_path = "twin:sft_twin"` (the default of dpo_lora / dpo_qlora / dpo_full) means: the model that
LoRA SFT with recipe `sft_twin` makes from its base (SmolLM2-135M-Instruct) on the author's train answers, with
the adapter merged into the weights. That is the Handbook's setup (TwinLlama was a merged SFT model), so DPO's
reference is the twin itself with the DPO adapter off. `twin:<recipe name or .py path>` names any SFT recipe.

The folder is keyed by what makes it: the base's weights, the SFT data files, the SFT recipe and the library
versions that train it. A change to any of them builds a new twin; otherwise every run reuses the folder. It
is built under a temporary name and renamed when complete, so a killed build leaves nothing that looks done.
Training resolves the name (training/prepare.py) and records the folder in the run's recipe.json, as it pins
`runs:<recipe>` adapters, so evaluation and export read a plain model folder.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from pipeline import recipe as recipes
from pipeline.data import EMBEDDED
from pipeline.errors import UserError
from pipeline.model import runtime
from pipeline.model.paths import resolve_model_path
from pipeline.storage import cache_root, feed_file, hasher, read_json, write_json_atomic

PREFIX = recipes.TWIN_PREFIX
INFO = "twin.json"


def _sft_recipe(spec: str):
    recipe = recipes.load_recipe(spec)
    if recipe.method != "sft":
        raise UserError(f"model.name_or_path=twin:{spec}: {spec} is a {recipe.method!r} recipe; name an SFT recipe")
    if recipe.model.name_or_path.startswith(PREFIX):
        raise UserError(
            f"model.name_or_path=twin:{spec}: its own base is a twin ({recipe.model.name_or_path}); "
            "give the SFT recipe a base model"
        )
    return recipe


def key(recipe, base_path: str) -> str:
    """What the twin depends on: base weights and config, SFT data, the SFT recipe, the training libraries."""
    h = hasher()
    folder = Path(base_path)
    if folder.is_dir():
        for f in sorted(folder.glob("*.safetensors")) + [folder / "config.json"]:
            h.update(f.name.encode())
            feed_file(h, f)
    else:  # a Hub id: its name and revision
        h.update(f"{base_path}@{recipe.model.revision}".encode())
    for source in (recipe.data.train, recipe.data.eval):
        path = EMBEDDED.get(source) if source else None
        path = path or (Path(source).expanduser() if source else None)
        if path is not None and path.is_file():
            feed_file(h, path)
        else:
            h.update(str(source).encode())
    settings = recipes.to_dict(recipe)
    for watch_only in ("threads", "report_to"):  # how many cores run it and who watches, not what it makes
        settings["train"].pop(watch_only, None)
    for dpo_only in ("padding_free", "prefix_sharing", "compile"):  # DPO's row layout and kernels; SFT reads neither
        settings["train"].pop(dpo_only, None)
    h.update(json.dumps(settings, sort_keys=True).encode())
    versions = runtime.versions()
    h.update(json.dumps({k: versions[k] for k in ("torch", "transformers", "trl", "peft")}).encode())
    return h.hexdigest()[:16]


def model_dir(spec: str) -> Path:
    """The twin `spec` names (`twin:<SFT recipe name or .py path>`): the cached folder, or built now."""
    spec = spec[len(PREFIX) :] if spec.startswith(PREFIX) else spec
    return build(_sft_recipe(spec), spec)


def cached(recipe, base_path: str) -> Path:
    return cache_root() / "twins" / f"{recipe.name}-{key(recipe, base_path)}"


def build(recipe, spec: str | None = None) -> Path:
    """The merged twin for `recipe` (an SFT recipe): reused from the cache, or trained, merged and cached."""
    base_path = resolve_model_path(recipe.model.name_or_path, recipe.model.allow_pickle_weights)
    target = cached(recipe, base_path)
    if (target / INFO).is_file():
        return target
    print(
        f"[twin-dpo] building the twin once: LoRA SFT of {recipe.model.name_or_path} on the author's answers "
        f"(recipe {recipe.name}), merged into {target}; later runs reuse it",
        flush=True,
    )
    target.parent.mkdir(parents=True, exist_ok=True)
    work = target.parent / f".{target.name}.tmp-{os.getpid()}"
    shutil.rmtree(work, ignore_errors=True)
    try:
        from pipeline.training.sft import sft

        summary, run_dir = sft(recipe, run_dir=work / "sft-run")
        _merge(recipe, base_path, run_dir / "adapter", work / "model")
        info = {
            "what": f"{recipe.model.name_or_path} + LoRA SFT ({recipe.name}) on the author's train answers, merged",
            "spec": f"{PREFIX}{spec or recipe.name}",
            "base": recipe.model.name_or_path,
            "base_path": base_path,
            "sft_recipe": recipe.name,
            "sft_steps": summary["steps"],
            "sft_held_out_loss": [summary["eval_before"]["loss"], summary["eval_after"]["loss"]],
            "sft_seconds": round(summary["wall_seconds"], 1),
            "key": target.name.rsplit("-", 1)[-1],
        }
        for name in ("recipe.json", "summary.json"):
            shutil.copy2(run_dir / name, work / "model" / f"sft-{name}")
        write_json_atomic(work / "model" / INFO, info)
        try:
            (work / "model").rename(target)
        except OSError:  # another process finished the same twin first: keep its copy
            if not (target / INFO).is_file():
                raise
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(
        f"[twin-dpo] twin ready: {target} (held-out loss on the author's answers "
        f"{info['sft_held_out_loss'][0]:.3f} -> {info['sft_held_out_loss'][1]:.3f})",
        flush=True,
    )
    return target


def _merge(recipe, base_path: str, adapter: Path, out: Path) -> None:
    """Base + SFT adapter -> one model folder in the base's fp32 weights, with the tokenizer."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from pipeline.model.hf import load_tokenizer

    kwargs = {"dtype": torch.float32, "trust_remote_code": recipe.model.trust_remote_code}
    if recipe.model.revision:
        kwargs["revision"] = recipe.model.revision
    base = AutoModelForCausalLM.from_pretrained(base_path, **kwargs)
    merged = PeftModel.from_pretrained(base, str(adapter)).merge_and_unload()
    merged.config.name_or_path = f"twin:{recipe.name}"
    merged.save_pretrained(out, safe_serialization=True)
    load_tokenizer(recipe, base_path).save_pretrained(out)


def describe(folder: str | Path) -> dict | None:
    """The twin.json of a twin folder (what it is made of), or None for any other model folder."""
    path = Path(folder) / INFO
    return read_json(path) if path.is_file() else None
