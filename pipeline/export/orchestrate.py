"""`python -m pipeline export [RUN]`: adapter, merged 16-bit weights, GGUF files and Ollama Modelfiles, each proven.

Everything is written into a temporary folder beside RUN/export/, which is renamed into place at the end. Each
format is proven on its own: one that fails its proof (or cannot be written) is removed and named with the
reason, and the formats that passed are kept; the command then exits 2. GGUF files come from llama.cpp's own
converters, taken from the hash-pinned llama-cpp-python sdist (export/llama_tools.py), K-quants from its quantizer.
"""

from __future__ import annotations

import importlib.util
import shutil
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from peft import PeftModel
from transformers import AutoConfig, AutoModelForCausalLM

from pipeline import data as data_mod
from pipeline import recipe as recipes
from pipeline import run_folder
from pipeline.data.questions import FIXED_QUESTIONS
from pipeline.errors import ExportFailed, UserError
from pipeline.export import gguf_files, llama_tools
from pipeline.export import proofs as P
from pipeline.model import hf, paths, runtime
from pipeline.model.backend import Backend
from pipeline.storage import atomic_dir, read_json, write_json_atomic

PROOF_ROWS = 16  # held-out pairs used for the logit and quantization proofs


def _load_run(run_dir: Path, overrides: list[str]):
    if not (run_dir / "recipe.json").is_file():
        raise UserError(f"{run_dir} is not a twin-dpo run folder (no recipe.json)")
    if not (run_dir / "summary.json").is_file():
        raise UserError(f"{run_dir} is not finished (no summary.json); train it to the end or resume it first")
    recipe = recipes.from_dict(read_json(run_dir / "recipe.json"), str(run_dir / "recipe.json"))
    recipe = recipes.validate(recipes.apply_overrides(recipe, overrides))
    return recipe, read_json(run_dir / "summary.json")


def _fp32(recipe):
    """Proofs compute in fp32 whatever the training precision was."""
    return replace(recipe, model=replace(recipe.model, dtype="float32"))


def _base(recipe, path: str):
    """The base the adapter was trained on, in fp32 (for QLoRA: the dequantized 4-bit weights it was trained on)."""
    base = hf.load_base(_fp32(recipe), path, Backend("hf", "export", "cpu"))
    if recipe.model.load_in_4bit:
        base = base.dequantize()
        base.config.quantization_config = None
        if hasattr(base, "hf_quantizer"):
            base.hf_quantizer = None
    return base


def _trained_and_merged(recipe, run_dir: Path, artifact: str, path: str):
    """(the model as trained, the same merged into plain fp32 weights). For QLoRA the adapter is merged into the
    dequantized base it was trained on, not into the 4-bit weights."""
    if artifact == "model":
        trained = AutoModelForCausalLM.from_pretrained(run_dir / "model", dtype=torch.float32).eval()
        return trained, trained
    trained = PeftModel.from_pretrained(
        hf.load_base(_fp32(recipe), path, Backend("hf", "export", "cpu")), run_dir / "adapter"
    ).eval()
    merged = PeftModel.from_pretrained(_base(recipe, path), run_dir / "adapter").merge_and_unload().eval()
    return trained, merged.float()


def _save_merged(merged, tokenizer, folder: Path, dtype_name: str) -> None:
    dtype = getattr(torch, dtype_name)
    merged.to(dtype).save_pretrained(folder, safe_serialization=True)
    merged.float()
    tokenizer.save_pretrained(folder)
    config = folder / "config.json"
    data = read_json(config)
    data.pop("quantization_config", None)
    write_json_atomic(config, data)


def _check_gguf_ready(recipe, path: str) -> None:
    """Before a minute of merging: llama.cpp's runtime is installed and its converter knows the architecture."""
    if importlib.util.find_spec("llama_cpp") is None:
        raise UserError(
            "export.formats asks for GGUF, whose proofs and K-quants need llama-cpp-python; run `make "
            "setup-gguf` (builds llama.cpp once per machine, about 5-7 minutes on 2 cores) or --set "
            "export.formats=adapter,merged"
        )
    config = AutoConfig.from_pretrained(path, trust_remote_code=recipe.model.trust_remote_code).to_dict()
    llama_tools.check_architecture(config)
    llama_tools.check_settings(config)


def _formats(recipe, artifact: str) -> tuple[str, ...]:
    formats = recipe.export.formats
    if artifact != "adapter":
        dropped = [f for f in formats if f in ("adapter", "gguf-lora")]
        if dropped:
            print(f"[twin-dpo] full training has no adapter: leaving out {', '.join(dropped)}", flush=True)
        formats = tuple(f for f in formats if f not in dropped)
    return formats


def export(run_dir: Path | None, overrides: list[str]) -> tuple[dict[str, Any], Path]:
    start = time.perf_counter()
    run_dir = Path(run_dir) if run_dir else run_folder.latest_run()
    recipe, summary = _load_run(run_dir, overrides)
    artifact = summary.get("artifact", "adapter")
    formats = _formats(recipe, artifact)
    gguf_formats = [f for f in formats if f.startswith("gguf-")]
    runtime.quiet_libraries()
    runtime.set_threads(recipe.train.threads)
    path = paths.resolve_model_path(recipe.model.name_or_path, recipe.model.allow_pickle_weights)
    if gguf_formats:
        _check_gguf_ready(recipe, path)
    tokenizer = hf.load_tokenizer(recipe, path)
    _, eval_pairs = data_mod.load_splits(recipe.data)
    rows = data_mod.templated(tokenizer, eval_pairs[:PROOF_ROWS], recipe.data.system_prompt)
    texts = [
        tokenizer(r["prompt"] + r["chosen"] + tokenizer.eos_token)["input_ids"][: recipe.data.max_length] for r in rows
    ]
    questions = [
        data_mod.render_prompt(tokenizer, data_mod.Pair((("user", q),), "", "", "question"), None)
        for q in FIXED_QUESTIONS
    ]

    print(f"[twin-dpo] exporting {run_dir} ({', '.join(formats)})", flush=True)
    proofs: dict[str, Any] = {}
    outcome = gguf_files.Outcome()
    dtype = recipe.export.merged_dtype
    with atomic_dir(run_dir / "export") as out:
        work = out / ".work"
        work.mkdir()
        trained, merged = _trained_and_merged(recipe, run_dir, artifact, path)
        trained_logits = P.logits_hf(trained, texts)
        del trained
        if "adapter" in formats:
            shutil.copytree(run_dir / "adapter", out / "adapter")
            outcome.written.append("adapter")
        if artifact == "adapter":
            fp32 = P.compare_logits(trained_logits, P.logits_hf(merged, texts))
            fp32["passed"] = fp32["max_abs_logit_diff"] <= P.MERGE_FP32_MAX_DIFF
            fp32["verdict"] = f"max |logit diff| {fp32['max_abs_logit_diff']:.2e} (limit {P.MERGE_FP32_MAX_DIFF:.0e})"
            proofs["merge (fp32) vs adapter model"] = fp32
            if not fp32["passed"]:
                outcome.fail([f for f in formats if f != "adapter"], "merging the adapter changed the logits")
        saved = None
        if not outcome.not_written and ("merged" in formats or gguf_formats):
            merged_dir = out / "merged" if "merged" in formats else work / "merged"
            _save_merged(merged, tokenizer, merged_dir, dtype)
            del merged
            saved = AutoModelForCausalLM.from_pretrained(merged_dir, dtype=torch.float32).eval()  # no peft
            m = P.compare_logits(trained_logits, P.logits_hf(saved, texts))
            floor = P.MERGED_TOP1_FLOOR[dtype]
            m["passed"] = m["top1_agreement"] >= floor
            m["verdict"] = (
                f"top-1 agreement {m['top1_agreement']:.4f} (floor {floor}), max |diff| {m['max_abs_logit_diff']:.3f}"
            )
            proofs[f"merged ({dtype}) vs trained model"] = m
            if not m["passed"]:
                shutil.rmtree(merged_dir)
                outcome.fail([f for f in formats if f != "adapter"], f"the merged {dtype} weights failed their proof")
            elif "merged" in formats:
                outcome.written.append("merged")
        if gguf_formats and not outcome.not_written:
            job = gguf_files.Job(
                recipe,
                tokenizer,
                formats,
                merged_dir,
                saved,
                [r["prompt"] for r in rows],
                questions,
                texts,
                out,
                work,
                base_folder=lambda: _save_base(recipe, path, tokenizer, work / "base", dtype),
                adapter=run_dir / "adapter" if artifact == "adapter" else None,
            )
            gguf_files.write(job, proofs, outcome)
        del saved
        shutil.rmtree(work)
        files = {str(p.relative_to(out)): p.stat().st_size for p in sorted(out.rglob("*")) if p.is_file()}
        report = {
            "run": str(run_dir),
            "formats": list(formats),
            "written": outcome.written,
            "not_written": outcome.not_written,
            "merged_dtype": dtype,
            "files": files,
            "proofs": proofs,
            "seconds": round(time.perf_counter() - start, 1),
            "versions": runtime.versions(),
        }
        print(table(proofs), flush=True)
        if not outcome.written:
            raise ExportFailed(["export refused, nothing passed its proof", *outcome.lines()[1:]])
        write_json_atomic(out / "export.json", report)
    if outcome.not_written:
        raise ExportFailed([f"export incomplete in {run_dir / 'export'}", *outcome.lines()])
    return report, run_dir / "export"


def _save_base(recipe, path: str, tokenizer, folder: Path, dtype: str) -> Path:
    """The base model as a plain Hugging Face folder for llama.cpp's converter (the GGUF LoRA goes on top of it)."""
    _save_merged(_base(recipe, path), tokenizer, folder, dtype)
    return folder


def table(proofs: dict[str, Any]) -> str:
    width = max(len(name) for name in proofs) if proofs else 10
    lines = [f"{'proof':<{width}}  result  figures", f"{'-' * width}  ------  -------"]
    for name, p in proofs.items():
        lines.append(f"{name:<{width}}  {'PASS' if p.get('passed') else 'FAIL':<6}  {p['verdict']}")
    return "\n".join(lines)
