"""The GGUF part of an export: f16, q8_0 and K-quants of the merged model, the adapter as a GGUF LoRA, and the
Ollama Modelfiles, each proven on its own.

Files come from llama.cpp's own converters (export/llama_tools.py) and quantizer. Each format is written to a
temporary name and renamed into place only after its proof passed; a format that fails is removed and reported,
and the formats that passed stay.
"""

from __future__ import annotations

import ctypes
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from pipeline.errors import ExportFailed, UserError
from pipeline.export import llama_tools, modelfile
from pipeline.export import proofs as P

OLLAMA_PREFERENCE = ("gguf-q4_k_m", "gguf-q8_0", "gguf-f16")
F16_PROOF = "gguf f16 (llama.cpp) vs transformers"
LORA_PROOF = "gguf base + LoRA vs merged f16 (teacher-forced)"


@dataclass
class Outcome:
    """What the export wrote and what it did not, with the reason for each."""

    written: list[str] = field(default_factory=list)
    not_written: dict[str, str] = field(default_factory=dict)

    def fail(self, names, reason: str) -> None:
        for name in [names] if isinstance(names, str) else names:
            self.not_written.setdefault(name, reason)

    def lines(self) -> list[str]:
        head = f"written: {', '.join(self.written) or 'nothing'}"
        return [head] + [f"not written: {name}: {why}" for name, why in self.not_written.items()]


@dataclass
class Job:
    recipe: Any
    tokenizer: Any
    formats: tuple[str, ...]
    merged_dir: Path
    saved: Any  # the merged model as saved, loaded back with plain transformers
    prompts: list[str]
    questions: list[str]
    texts: list[list[int]]
    out: Path
    work: Path
    base_folder: Callable[[], Path] | None  # saves the base the adapter was trained on (None: no adapter)
    adapter: Path | None
    pre: str | None = None  # the pre-tokenizer found by probing, when llama.cpp does not know the tokenizer's hash


def _proven(proofs: dict, name: str, proof: dict, outcome: Outcome, fmt: str, path: Path | None) -> bool:
    proofs[name] = proof
    if proof["passed"]:
        outcome.written.append(fmt)
        return True
    if path is not None:
        path.unlink(missing_ok=True)
    outcome.fail(fmt, f"proof failed: {name}: {proof['verdict']}")
    return False


def write(job: Job, proofs: dict[str, Any], outcome: Outcome) -> None:
    wanted = [f for f in job.formats if f.startswith("gguf-")]
    gguf_dir = job.out / "gguf"
    gguf_dir.mkdir(exist_ok=True)
    f16 = (gguf_dir if "gguf-f16" in job.formats else job.work) / "model-f16.gguf"
    try:
        _say("converting the merged model to GGUF f16 with llama.cpp's convert_hf_to_gguf.py")
        try:
            llama_tools.convert(job.merged_dir, f16, "f16")
        except llama_tools.UnknownPreTokenizer:
            job.pre = _probe_pre_tokenizer(job)
            llama_tools.convert(job.merged_dir, f16, "f16", pre=job.pre)
        proofs[F16_PROOF] = proof = _f16_proof(job, f16)
    except ExportFailed as err:
        f16.unlink(missing_ok=True)
        outcome.fail(wanted, str(err))
        return
    if not proof["passed"]:
        f16.unlink(missing_ok=True)
        outcome.fail("gguf-f16", f"proof failed: {F16_PROOF}: {proof['verdict']}")
        outcome.fail(wanted, f"the f16 GGUF that every other GGUF is checked against failed its proof ({F16_PROOF})")
        return
    if "gguf-f16" in wanted:
        outcome.written.append("gguf-f16")
    for fmt in wanted:
        if fmt in ("gguf-f16", "gguf-lora"):
            continue
        kind = fmt.split("-", 1)[1]
        target = gguf_dir / f"model-{kind}.gguf"
        try:
            _say(f"writing GGUF {kind}")
            if kind == "q8_0":
                llama_tools.convert(job.merged_dir, target, "q8_0", pre=job.pre)
            else:
                _quantize(f16, target, kind)
            proof = _quant_proof(f16, target, job.texts, kind)
        except ExportFailed as err:
            target.unlink(missing_ok=True)
            outcome.fail(fmt, str(err))
            continue
        _proven(proofs, f"gguf {kind} vs f16 (teacher-forced)", proof, outcome, fmt, target)
    if "gguf-lora" in wanted:
        _write_lora(job, f16, proofs, outcome)
    _modelfiles(job, proofs, outcome)


def _say(text: str) -> None:
    print(f"[twin-dpo] {text}", flush=True)


def _probe_pre_tokenizer(job: Job) -> str:
    pre, tried = P.pick_pre_tokenizer(job.merged_dir, job.tokenizer, job.work)
    if not pre:
        raise ExportFailed(
            f"GGUF: llama.cpp does not recognize this tokenizer's pre-tokenizer, and none of the {len(tried)} it "
            f"has ({', '.join(tried)}) splits the probe texts the way transformers does"
        )
    _say(
        f"llama.cpp does not know this tokenizer by its hash; its '{pre}' pre-tokenizer splits every probe text the "
        "same way, so the GGUF files use it (the f16 proof checks the prompts again)"
    )
    return pre


def _f16_proof(job: Job, f16: Path) -> dict[str, Any]:
    g = P.gguf_vs_transformers(f16, job.saved, job.tokenizer, job.prompts, job.questions, job.texts)
    forced = g["teacher_forced"]["top1_agreement"]
    greedy_ok = g["questions_identical"] + g["questions_parting_at_a_near_tie"]
    g["passed"] = (
        g["prompts_tokenized_identically"] == g["prompts"]
        and greedy_ok == g["questions"]
        and forced >= P.GGUF_F16_TOP1_FLOOR
    )
    ties = g["questions_parting_at_a_near_tie"]
    g["verdict"] = (
        f"tokenization {g['prompts_tokenized_identically']}/{g['prompts']} identical, greedy "
        f"{g['greedy_tokens']} tokens {g['questions_identical']}/{g['questions']} identical"
        + (f" ({ties} parting at a near-tie, logit gap <= {P.NEAR_TIE})" if ties else "")
        + f", teacher-forced top-1 {forced:.4f} (floor {P.GGUF_F16_TOP1_FLOOR})"
    )
    return g


def _quant_proof(f16: Path, target: Path, texts, kind: str) -> dict[str, Any]:
    q = P.quantized_vs_f16(f16, target, texts)
    fl = P.QUANT_FLOORS[kind]
    q["passed"] = q["top1_agreement"] >= fl["top1"] and q["mean_kl"] <= fl["kl"]
    q["verdict"] = (
        f"top-1 agreement {q['top1_agreement']:.4f} (floor {fl['top1']}), mean KL {q['mean_kl']:.4f} (limit {fl['kl']})"
    )
    return q


def _quantize(src: Path, dst: Path, kind: str) -> None:
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = {"q4_k_m": llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_K_M}[kind]
    params.nthread = max(1, len(os.sched_getaffinity(0)))
    tmp = dst.with_name(f".{dst.name}.tmp-{os.getpid()}")
    try:
        with P.quiet_stderr():
            rc = llama_cpp.llama_model_quantize(str(src).encode(), str(tmp).encode(), ctypes.byref(params))
        if rc != 0 or not tmp.is_file():
            raise ExportFailed(f"GGUF: llama.cpp could not quantize {src.name} to {kind} (code {rc})")
        os.replace(tmp, dst)
    finally:
        tmp.unlink(missing_ok=True)


def _write_lora(job: Job, f16: Path, proofs: dict, outcome: Outcome) -> None:
    if job.adapter is None or job.base_folder is None:
        outcome.fail("gguf-lora", "this run trained every weight (full DPO), so there is no adapter to convert")
        return
    base = job.out / "gguf" / "base-f16.gguf"
    lora = job.out / "gguf" / "lora-f16.gguf"
    try:
        _say("converting the base model and the LoRA adapter to GGUF with llama.cpp's converters")
        folder = job.base_folder()
        llama_tools.convert(folder, base, "f16", pre=job.pre)
        llama_tools.convert_lora(job.adapter, folder, lora, "f16", pre=job.pre)
        q = P.lora_vs_merged(base, lora, f16, job.texts)
        q["without_adapter_top1"] = P.quantized_vs_f16(f16, base, job.texts)["top1_agreement"]  # what the adapter moves
    except ExportFailed as err:
        base.unlink(missing_ok=True)
        lora.unlink(missing_ok=True)
        outcome.fail("gguf-lora", str(err))
        return
    q["passed"] = q["top1_agreement"] >= P.GGUF_LORA_TOP1_FLOOR
    q["verdict"] = (
        f"top-1 agreement {q['top1_agreement']:.4f} (floor {P.GGUF_LORA_TOP1_FLOOR}; base alone "
        f"{q['without_adapter_top1']:.4f}), mean KL {q['mean_kl']:.5f}"
    )
    if not _proven(proofs, LORA_PROOF, q, outcome, "gguf-lora", lora):
        base.unlink(missing_ok=True)


def _modelfiles(job: Job, proofs: dict, outcome: Outcome) -> None:
    merged = next((f for f in OLLAMA_PREFERENCE if f in outcome.written), None)
    with_lora = "gguf-lora" in outcome.written
    if not merged and not with_lora:
        return
    names = (["Modelfile"] if merged else []) + (["Modelfile.lora"] if with_lora else [])
    try:
        parts = modelfile.derive(job.tokenizer)
        template = modelfile.go_template(parts)
        stops = modelfile.stop_tokens(job.tokenizer, parts)
    except UserError as err:
        outcome.fail(names, str(err))
        return
    proof = modelfile.prove(job.tokenizer, template)
    proof["from"] = merged or "gguf-lora"
    proof["passed"] = proof["identical"]
    proof["verdict"] = (
        f"{proof['conversations']} conversations rendered identically by {proof['renderer']}"
        if proof["identical"]
        else "the TEMPLATE renders differently from the chat template"
    )
    proofs["Modelfile TEMPLATE vs chat template"] = proof
    if not proof["passed"]:
        outcome.fail(names, f"proof failed: Modelfile TEMPLATE vs chat template: {proof['verdict']}")
        return
    e = job.recipe.export
    params = {"temperature": e.temperature, "top_p": e.top_p, "repeat_penalty": e.repeat_penalty, "num_ctx": e.num_ctx}
    if merged:
        source = f"gguf/model-{merged.split('-', 1)[1]}.gguf"
        (job.out / "Modelfile").write_text(modelfile.modelfile_text(source, template, stops, params), encoding="utf-8")
        outcome.written.append("Modelfile")
    if with_lora:
        text = modelfile.modelfile_text("gguf/base-f16.gguf", template, stops, params, adapter="gguf/lora-f16.gguf")
        (job.out / "Modelfile.lora").write_text(text, encoding="utf-8")
        outcome.written.append("Modelfile.lora")
