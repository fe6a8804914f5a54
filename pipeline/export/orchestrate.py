"""`python -m pipeline export [RUN]`: adapter, merged 16-bit weights, GGUF and an Ollama Modelfile, each proven.

Everything is written into a temporary folder beside RUN/export/ and renamed
into place only when every proof passed; a failed proof leaves no export/.
Nothing is downloaded or compiled: GGUF comes from export/gguf_convert.py,
K-quants from llama-cpp-python's quantizer (the `[gguf]` extra).
"""

from __future__ import annotations

import ctypes
import importlib.util
import os
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
from pipeline.export import gguf_convert, modelfile
from pipeline.export import proofs as P
from pipeline.model import hf, paths, runtime
from pipeline.model.backend import Backend
from pipeline.storage import atomic_dir, read_json, write_json_atomic

PROOF_ROWS = 16  # held-out pairs used for the logit and quantization proofs
OLLAMA_PREFERENCE = ("gguf-q4_k_m", "gguf-q8_0", "gguf-f16")


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


def _trained_and_merged(recipe, run_dir: Path, artifact: str, path: str):
    """(the model as trained, the same merged into plain fp32 weights). For QLoRA the adapter is merged into the
    dequantized base it was trained on, not into the 4-bit weights."""
    backend = Backend("hf", "export", "cpu")
    if artifact == "model":
        trained = AutoModelForCausalLM.from_pretrained(run_dir / "model", dtype=torch.float32).eval()
        return trained, trained
    trained = PeftModel.from_pretrained(hf.load_base(_fp32(recipe), path, backend), run_dir / "adapter").eval()
    base = hf.load_base(_fp32(recipe), path, backend)
    if recipe.model.load_in_4bit:
        base = base.dequantize()
    merged = PeftModel.from_pretrained(base, run_dir / "adapter").merge_and_unload().eval()
    merged.config.quantization_config = None
    if hasattr(merged, "hf_quantizer"):
        merged.hf_quantizer = None
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


def _check(proofs: dict[str, Any]) -> list[str]:
    return [f"{name}: {p['verdict']}" for name, p in proofs.items() if not p.get("passed")]


def export(run_dir: Path | None, overrides: list[str]) -> tuple[dict[str, Any], Path]:
    start = time.perf_counter()
    run_dir = Path(run_dir) if run_dir else run_folder.latest_run()
    recipe, summary = _load_run(run_dir, overrides)
    formats = recipe.export.formats
    gguf_formats = [f for f in formats if f.startswith("gguf-")]
    artifact = summary.get("artifact", "adapter")
    if "adapter" in formats and artifact != "adapter":
        formats = tuple(f for f in formats if f != "adapter")  # full training has no adapter to export
    runtime.quiet_libraries()
    runtime.set_threads(recipe.train.threads)
    path = paths.resolve_model_path(recipe.model.name_or_path, recipe.model.allow_pickle_weights)
    if gguf_formats:  # before a minute of merging: the converter must know the architecture
        config = AutoConfig.from_pretrained(path, trust_remote_code=recipe.model.trust_remote_code)
        gguf_convert.check_architecture(config.to_dict())
        if importlib.util.find_spec("llama_cpp") is None:
            raise UserError(
                "export.formats asks for GGUF, whose proofs and K-quants need llama-cpp-python; run `make "
                "setup-gguf` (builds llama.cpp once per machine, about 5-7 minutes on 2 cores) or --set "
                "export.formats=adapter,merged"
            )
    tokenizer = hf.load_tokenizer(recipe, path)
    _, eval_pairs = data_mod.load_splits(recipe.data)
    rows = data_mod.templated(tokenizer, eval_pairs[:PROOF_ROWS], recipe.data.system_prompt)
    prompts = [r["prompt"] for r in rows]
    texts = [
        tokenizer(r["prompt"] + r["chosen"] + tokenizer.eos_token)["input_ids"][: recipe.data.max_length] for r in rows
    ]
    questions = [
        tokenizer.apply_chat_template([{"role": "user", "content": q}], tokenize=False, add_generation_prompt=True)
        for q in FIXED_QUESTIONS
    ]

    print(f"[twin-dpo] exporting {run_dir} ({', '.join(formats)})", flush=True)
    proofs: dict[str, Any] = {}
    with atomic_dir(run_dir / "export") as out:
        work = out / ".work"
        work.mkdir()
        trained, merged = _trained_and_merged(recipe, run_dir, artifact, path)

        trained_logits = P.logits_hf(trained, texts)
        if artifact == "adapter":
            fp32 = P.compare_logits(trained_logits, P.logits_hf(merged, texts))
            fp32["passed"] = fp32["max_abs_logit_diff"] <= P.MERGE_FP32_MAX_DIFF
            fp32["verdict"] = f"max |logit diff| {fp32['max_abs_logit_diff']:.2e} (limit {P.MERGE_FP32_MAX_DIFF:.0e})"
            proofs["merge (fp32) vs adapter model"] = fp32
        if "adapter" in formats:
            shutil.copytree(run_dir / "adapter", out / "adapter")
        merged_dir = out / "merged" if "merged" in formats else work / "merged"
        dtype = recipe.export.merged_dtype
        _save_merged(merged, tokenizer, merged_dir, dtype)
        del merged
        saved = AutoModelForCausalLM.from_pretrained(
            merged_dir, dtype=torch.float32
        ).eval()  # plain transformers, no peft
        m = P.compare_logits(trained_logits, P.logits_hf(saved, texts))
        floor = P.MERGED_TOP1_FLOOR[dtype]
        m.update(
            passed=m["top1_agreement"] >= floor,
            verdict=f"top-1 agreement {m['top1_agreement']:.4f} (floor {floor}), max |diff| "
            f"{m['max_abs_logit_diff']:.3f}",
        )
        proofs[f"merged ({dtype}) vs trained model"] = m
        del trained

        if gguf_formats:
            fields = gguf_convert.tokenizer_fields(merged_dir)
            pre, tried = P.pick_pre_tokenizer(merged_dir, tokenizer, fields, gguf_convert.PRE_CANDIDATES, work)
            if not pre:
                raise ExportFailed(
                    f"GGUF: no llama.cpp pre-tokenizer reproduces this tokenizer (tried {', '.join(tried)})"
                )
            (out / "gguf").mkdir()
            f16 = (out / "gguf" if "gguf-f16" in formats else work) / "model-f16.gguf"
            gguf_convert.convert(merged_dir, f16, "f16", pre=pre, fields=fields)
            g = P.gguf_vs_transformers(f16, saved, tokenizer, prompts, questions, texts)
            g["pre_tokenizer"] = pre
            forced = g["teacher_forced"]["top1_agreement"]
            g["passed"] = (
                g["prompts_tokenized_identically"] == g["prompts"]
                and g["questions_identical"] == g["questions"]
                and forced >= P.GGUF_F16_TOP1_FLOOR
            )
            g["verdict"] = (
                f"tokenization {g['prompts_tokenized_identically']}/{g['prompts']} identical, greedy "
                f"{g['greedy_tokens']} tokens {g['questions_identical']}/{g['questions']} identical, "
                f"teacher-forced top-1 {forced:.4f} (floor {P.GGUF_F16_TOP1_FLOOR})"
            )
            proofs["gguf f16 (llama.cpp) vs transformers"] = g
            for fmt in gguf_formats:
                if fmt == "gguf-f16":
                    continue
                kind = fmt.split("-", 1)[1]
                target = out / "gguf" / f"model-{kind}.gguf"
                if kind == "q8_0":
                    gguf_convert.convert(merged_dir, target, "q8_0", pre=pre, fields=fields)
                else:
                    _quantize_llama_cpp(f16, target, kind)
                q = P.quantized_vs_f16(f16, target, texts)
                fl = P.QUANT_FLOORS[kind]
                q["passed"] = q["top1_agreement"] >= fl["top1"] and q["mean_kl"] <= fl["kl"]
                q["verdict"] = (
                    f"top-1 agreement {q['top1_agreement']:.4f} (floor {fl['top1']}), "
                    f"mean KL {q['mean_kl']:.4f} (limit {fl['kl']})"
                )
                proofs[f"gguf {kind} vs f16 (teacher-forced)"] = q
            proofs["Modelfile TEMPLATE vs chat template"] = _write_modelfile(recipe, tokenizer, out, formats)
        del saved
        shutil.rmtree(work)
        failed = _check(proofs)
        files = {str(p.relative_to(out)): p.stat().st_size for p in sorted(out.rglob("*")) if p.is_file()}
        report = {
            "run": str(run_dir),
            "formats": list(formats),
            "merged_dtype": dtype,
            "files": files,
            "proofs": proofs,
            "seconds": round(time.perf_counter() - start, 1),
            "versions": runtime.versions(),
        }
        print(table(proofs), flush=True)
        if failed:
            raise ExportFailed([f"export refused, a proof failed: {f}" for f in failed])
        write_json_atomic(out / "export.json", report)
    return report, run_dir / "export"


def _quantize_llama_cpp(src: Path, dst: Path, kind: str) -> None:
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = {"q4_k_m": llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_K_M}[kind]
    params.nthread = max(1, len(os.sched_getaffinity(0)))
    with P.quiet_stderr():
        rc = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(params))
    if rc != 0 or not dst.is_file():
        raise ExportFailed(f"GGUF: llama.cpp could not quantize {src.name} to {kind} (code {rc})")


def _write_modelfile(recipe, tokenizer, out: Path, formats) -> dict[str, Any]:
    chosen = next(f for f in OLLAMA_PREFERENCE if f in formats)
    parts = modelfile.derive(tokenizer)
    template = modelfile.go_template(parts)
    e = recipe.export
    params = {"temperature": e.temperature, "top_p": e.top_p, "repeat_penalty": e.repeat_penalty, "num_ctx": e.num_ctx}
    text = modelfile.modelfile_text(
        f"gguf/model-{chosen.split('-', 1)[1]}.gguf", template, modelfile.stop_tokens(tokenizer, parts), params
    )
    (out / "Modelfile").write_text(text, encoding="utf-8")
    proof = modelfile.prove(tokenizer, template)
    proof["from"] = chosen
    proof["passed"] = proof["identical"]
    proof["verdict"] = (
        f"{proof['conversations']} conversations rendered identically by {proof['renderer']}"
        if proof["identical"]
        else "the TEMPLATE renders differently from the chat template"
    )
    return proof


def table(proofs: dict[str, Any]) -> str:
    width = max(len(name) for name in proofs) if proofs else 10
    lines = [f"{'proof':<{width}}  result  figures", f"{'-' * width}  ------  -------"]
    for name, p in proofs.items():
        lines.append(f"{name:<{width}}  {'PASS' if p.get('passed') else 'FAIL':<6}  {p['verdict']}")
    return "\n".join(lines)
