"""The export's proofs: each exported file loads and computes what the trained model computes.

Floors, measured (README, "Export proofs"): a proof below its floor fails the
export. Quantized files are judged teacher-forced (per-token top-1 agreement
and mean KL against the F16 file), not by long greedy matches: on a 135M model
a quantized file drifts off the F16 path after a few dozen tokens even when
every single next-token distribution is close.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline.errors import ExportFailed
from pipeline.export import llama_tools

# merged (fp32, before saving) vs adapter model: merging is exact up to float rounding
MERGE_FP32_MAX_DIFF = 1e-3
# f16 GGUF in llama.cpp vs transformers on the same saved weights, teacher-forced next-token agreement
GGUF_F16_TOP1_FLOOR = 0.99
# merged as saved (16-bit) vs adapter model, next-token agreement on held-out text
MERGED_TOP1_FLOOR = {"float16": 0.98, "bfloat16": 0.95}
# greedy paths of the f16 GGUF and transformers may part only where transformers' two candidates are this close
# (logits): same fp16 weights, different float summation order. A broken file parts at gaps of whole logits.
NEAR_TIE = 0.05
# llama.cpp running the base GGUF with the GGUF LoRA applied vs the merged f16 GGUF, teacher-forced top-1
GGUF_LORA_TOP1_FLOOR = 0.99
# quantized GGUF vs F16 GGUF, teacher-forced on held-out text. The floors sit a few points below the top-1
# and at ~3x the KL measured on the embedded SmolLM2 after dpo-lora (README, "Export and run it locally"): run-to-run
# variation passes, a broken quantization does not. Q8_0 measured 0.9516-0.9712 over runs (16 held-out pairs).
QUANT_FLOORS = {"q8_0": {"top1": 0.93, "kl": 0.02}, "q4_k_m": {"top1": 0.80, "kl": 0.25}}


PROBE_TEXTS = (  # tokenizer probes: digits, spaces, newlines, contractions, unicode, code, special tokens
    "Hello world! 12345 and 3.14159, 1,000,000 items.",
    "  two leading spaces\n\nblank line\ttab   three spaces",
    "I'll we've they're CAN'T won't y'all",
    "naïve café résumé — 日本語 😀 ∑ x²",
    "def f(x):\n    return x**2  # code\n",
)


@contextlib.contextmanager
def quiet_stderr():
    """llama.cpp prints load logs on fd 2 even with verbose=False in places; keep the terminal readable. What it
    printed is kept in the yielded list (filled on exit), so a failure can say llama.cpp's own reason."""
    saved = os.dup(2)
    printed: list[str] = []
    with tempfile.TemporaryFile("w+", encoding="utf-8", errors="replace") as sink:
        os.dup2(sink.fileno(), 2)
        try:
            yield printed
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            sink.seek(0)
            printed += sink.read().splitlines()


def llama(path: Path, vocab_only: bool = False, n_ctx: int = 1024, lora: Path | None = None):
    """`path` loaded in llama.cpp (with the GGUF LoRA `lora` applied); a file it refuses is ExportFailed with
    llama.cpp's own reason."""
    import llama_cpp
    from llama_cpp._logger import set_verbose

    printed: list[str] = []
    try:
        with quiet_stderr() as printed:
            lm = llama_cpp.Llama(
                str(path),
                lora_path=str(lora) if lora else None,
                vocab_only=vocab_only,
                n_ctx=n_ctx,
                n_batch=n_ctx,
                logits_all=not vocab_only,
                n_threads=max(1, len(os.sched_getaffinity(0))),
                verbose=True,  # into quiet_stderr's buffer, so that a refusal can give llama.cpp's reason
            )
    except ValueError:
        reason = next((line for line in printed if "error" in line.lower()), "no reason printed")
        raise ExportFailed(f"GGUF: llama.cpp cannot load {path.name}: {reason.strip()}") from None
    finally:
        set_verbose(False)  # llama.cpp's log level is global: back to errors only once the file is loaded
    return lm


def pick_pre_tokenizer(folder: Path, tokenizer, workdir: Path) -> tuple[str, dict[str, bool]]:
    """The first of llama.cpp's pre-tokenizers under which it splits every probe text exactly like `tokenizer`."""
    results = {}
    for pre in llama_tools.PRE_CANDIDATES:
        path = llama_tools.convert(folder, workdir / f"vocab-{pre}.gguf", pre=pre, vocab_only=True)
        lm = llama(path, vocab_only=True)
        results[pre] = all(
            lm.tokenize(t.encode(), add_bos=False, special=True) == tokenizer(t, add_special_tokens=False)["input_ids"]
            for t in PROBE_TEXTS
        )
        lm.close()
        path.unlink()
        if results[pre]:
            return pre, results
    return "", results


def logits_hf(model, texts_ids: list[list[int]]) -> list[torch.Tensor]:
    with torch.no_grad():
        return [model(torch.tensor([ids])).logits[0].float() for ids in texts_ids]


def compare_logits(a: list[torch.Tensor], b: list[torch.Tensor]) -> dict[str, float]:
    diffs = torch.cat([(x - y).abs().flatten() for x, y in zip(a, b, strict=True)])
    top1 = torch.cat([(x.argmax(-1) == y.argmax(-1)).float() for x, y in zip(a, b, strict=True)])
    return {
        "max_abs_logit_diff": float(diffs.max()),
        "mean_abs_logit_diff": float(diffs.mean()),
        "top1_agreement": float(top1.mean()),
        "positions": int(top1.numel()),
    }


def greedy_hf(model, ids: list[int], n: int, eos: int | None) -> list[int]:
    with torch.no_grad():
        out = model.generate(
            torch.tensor([ids]),
            attention_mask=torch.ones(1, len(ids), dtype=torch.long),
            max_new_tokens=n,
            do_sample=False,
            eos_token_id=eos,
            pad_token_id=eos,
        )
    return out[0, len(ids) :].tolist()


def greedy_llama(lm, ids: list[int], n: int, eos: int | None) -> list[int]:
    lm.reset()
    lm.eval(ids)
    out = []
    for _ in range(n):
        token = int(np.argmax(lm.scores[lm.n_tokens - 1]))
        out.append(token)
        if token == eos:
            break
        lm.eval([token])
    return out


def gguf_vs_transformers(
    gguf_path: Path,
    hf_model,
    tokenizer,
    prompts: list[str],
    questions: list[str],
    texts_ids: list[list[int]],
    n_tokens: int = 32,
) -> dict[str, Any]:
    """Identical tokenization of the prompts; identical greedy continuations of the questions; and, teacher-forced
    on held-out text, the same next token at every position (the same fp16 weights, fp32 arithmetic on both)."""
    lm = llama(gguf_path)
    llama_logits = []
    for ids in texts_ids:
        lm.reset()
        lm.eval(ids)
        llama_logits.append(torch.from_numpy(np.array(lm.scores[: len(ids)], dtype=np.float32)))
    forced = compare_logits(logits_hf(hf_model, texts_ids), llama_logits)
    add_bos = bool(lm.metadata.get("tokenizer.ggml.add_bos_token") == "true")
    token_mismatch = [
        p for p in prompts if lm.tokenize(p.encode(), add_bos=add_bos, special=True) != tokenizer(p)["input_ids"]
    ]
    eos = tokenizer.eos_token_id
    generations = []
    for q in questions:
        ids = tokenizer(q)["input_ids"]
        hf, gg = greedy_hf(hf_model, ids, n_tokens, eos), greedy_llama(lm, ids, n_tokens, eos)
        same = 0
        while same < min(len(hf), len(gg)) and hf[same] == gg[same]:
            same += 1
        gap = None if hf == gg or same >= min(len(hf), len(gg)) else _gap(hf_model, ids + hf[:same], hf[same], gg[same])
        generations.append(
            {
                "identical": hf == gg,
                "tokens_matching": same,
                "tokens": len(hf),
                "parting_logit_gap": gap,
                "text": tokenizer.decode(hf, skip_special_tokens=True),
            }
        )
    lm.close()
    return {
        "teacher_forced": forced,
        "prompts_tokenized_identically": len(prompts) - len(token_mismatch),
        "prompts": len(prompts),
        "first_tokenization_mismatch": token_mismatch[0] if token_mismatch else None,
        "questions_identical": sum(g["identical"] for g in generations),
        "questions_parting_at_a_near_tie": sum(
            g["parting_logit_gap"] is not None and g["parting_logit_gap"] <= NEAR_TIE for g in generations
        ),
        "questions": len(questions),
        "greedy_tokens": n_tokens,
        "generations": generations,
    }


def _gap(model, prefix: list[int], hf_token: int, gguf_token: int) -> float:
    """How far apart transformers puts the two tokens where the greedy paths part (logits, fp32)."""
    with torch.no_grad():
        logits = model(torch.tensor([prefix])).logits[0, -1].float()
    return float(logits[hf_token] - logits[gguf_token])


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    m = x.max(-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(-1, keepdims=True))


def quantized_vs_f16(f16_path: Path, quant_path: Path, texts_ids: list[list[int]]) -> dict[str, float]:
    """Teacher-forced next-token top-1 agreement and mean KL(F16 || quantized) over held-out text."""
    return _teacher_forced((f16_path, None), (quant_path, None), texts_ids)


def lora_vs_merged(base: Path, lora: Path, merged_f16: Path, texts_ids: list[list[int]]) -> dict[str, float]:
    """The same comparison for llama.cpp running `base` with the GGUF LoRA applied, against the merged f16 file."""
    return _teacher_forced((merged_f16, None), (base, lora), texts_ids)


def _teacher_forced(reference, candidate, texts_ids: list[list[int]]) -> dict[str, float]:
    rows = {}
    for name, (path, lora) in (("f16", reference), ("quant", candidate)):
        lm = llama(path, lora=lora)
        per_text = []
        for ids in texts_ids:
            lm.reset()
            lm.eval(ids)
            per_text.append(np.array(lm.scores[: len(ids)], dtype=np.float32))
        rows[name] = per_text
        lm.close()
    agree, kls = [], []
    for p_logits, q_logits in zip(rows["f16"], rows["quant"], strict=True):
        lp, lq = _log_softmax(p_logits), _log_softmax(q_logits)
        kls.append((np.exp(lp) * (lp - lq)).sum(-1))
        agree.append(p_logits.argmax(-1) == q_logits.argmax(-1))
    kl = np.concatenate(kls)
    return {
        "top1_agreement": float(np.concatenate(agree).mean()),
        "mean_kl": float(kl.mean()),
        "max_kl": float(kl.max()),
        "positions": int(kl.size),
    }
