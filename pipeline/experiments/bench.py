"""`python -m pipeline bench`: our LoRA DPO against plain TRL, measured side by side in one invocation.

Each run is its own process (peak memory is that process's own), baseline and ours alternate, and
every figure is reported as a median with its spread and as a ratio to the baseline. MFU = the FLOPs each
side's model really performed in its training time (the positions it counted: training/work.py; the
formula: bench_report.model_flops) / the matmul peak this bench measures itself at the model's shapes and
compute dtype. Writes reports/bench/bench.md and bench.json.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from transformers import AutoConfig, AutoTokenizer

from pipeline import recipe as recipes
from pipeline.data import EMBEDDED
from pipeline.errors import UserError
from pipeline.experiments import bench_report, children
from pipeline.model import paths
from pipeline.model.backend import cuda_available, precision
from pipeline.storage import cache_root, human_bytes, read_json, write_json_atomic, write_text_atomic
from pipeline.training import twin

ABLATIONS = (  # each lever switched off on its own
    ("completion-only LM head off (TRL's head)", ["train.fast_head=false"]),
    ("padding-free rows off (TRL's padded rows)", ["train.padding_free=false"]),
    ("prefix sharing off (packed, each answer with its own copy of the prompt)", ["train.prefix_sharing=false"]),
    ("length grouping off (random batches)", ["train.group_by_length=false"]),
    ("reference run at every step (no cached log-probs)", ["train.precompute_ref=false"]),
    ("gradient checkpointing on (TRL's default)", ["train.gradient_checkpointing=true"]),
    ("bf16 autocast off (fp32)", ["model.dtype=float32"]),
    ("glibc's default allocator thresholds", ["env:TWIN_DPO_MMAP_THRESHOLD_MB=0"]),
    ("reference-pass batching off (one pair per forward)", ["env:TWIN_DPO_REFERENCE_PAIRS=1"]),
    ("frozen weights kept float32 (cast to bf16 at every step)", ["env:TWIN_DPO_FROZEN_BF16=0"]),
    ("RMSNorm inputs kept float32 for the backward (not bf16)", ["env:TWIN_DPO_NORM_BF16=0"]),
    ("torch.compile ON (inductor per block, off by default; its compile time inside the run)", ["train.compile=true"]),
)
LENGTHS = (128, 256, 512, 1024)
BATCHES = (1, 2, 4)


def matmul_peak(hidden: int, intermediate: int, tokens: int, dtype_name: str) -> float:
    """FLOP/s of the model's largest matmul shape ([tokens, hidden] x [hidden, intermediate]), best of 5."""
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(dtype_name, torch.float32)
    a, b = torch.randn(tokens, hidden, dtype=dtype), torch.randn(hidden, intermediate, dtype=dtype)
    for _ in range(3):
        a @ b
    best = float("inf")
    for _ in range(5):
        start = time.perf_counter()
        for _ in range(10):
            a @ b
        best = min(best, (time.perf_counter() - start) / 10)
    return 2 * tokens * hidden * intermediate / best


def run_ours(folder: Path, steps: int, sets: list[str], env: dict[str, str]) -> dict[str, Any]:
    argv = [
        *children.PIPELINE,
        "train",
        "dpo_lora",
        "--run-dir",
        str(folder),
        "--no-answers",
        "--max-steps",
        str(steps),
        "--set",
        "train.save_every=0",
        "--set",
        "train.eval_every=0",
    ]
    env = {**env, **dict(s[4:].split("=", 1) for s in sets if s.startswith("env:"))}
    sets = [s for s in sets if not s.startswith("env:")]
    children.run(argv + [a for s in sets for a in ("--set", s)], f"ours {' '.join(sets)}", env, quiet=True)
    return _finished("ours", folder)


def run_baseline(folder: Path, steps: int, sets: list[str], env: dict[str, str]) -> dict[str, Any]:
    argv = [
        sys.executable,
        str(children.BASELINE),
        "--run-dir",
        str(folder),
        "--max-steps",
        str(steps),
        "--set",
        "train.eval_every=0",
    ]
    children.run(argv + [a for s in sets for a in ("--set", s)], "trl baseline", env, quiet=True)
    return _finished("TRL baseline", folder)


def _finished(side: str, folder: Path) -> dict[str, Any]:
    """A finished child's summary, and one line saying what it measured: the children run quietly, and a full
    bench is ~130 min of them, so each run shows it is done as it ends."""
    s = read_json(folder / "summary.json")
    print(
        f"[twin-dpo]   {side} ({folder.name}): {s['steps']} steps, {s['pairs_per_second']:.3f} pairs/s, "
        f"{s['train_seconds']:.0f} s training, peak {human_bytes(s['peak_memory_bytes'])}",
        flush=True,
    )
    return s


def synthetic_data(folder: Path, tokenizer, length: int, pairs: int) -> tuple[Path, Path]:
    """Preference pairs whose prompt + answer is `length` tokens (the prompt a quarter), for the scaling table."""
    words = " ".join(
        json.loads(line)["rejected"] for line in EMBEDDED["embedded:train"].read_text().splitlines()
    ).split()

    def text(n_tokens: int, offset: int) -> str:
        out, i = [], offset
        while len(tokenizer(" ".join(out))["input_ids"]) < n_tokens:
            out.extend(words[i % len(words) : i % len(words) + 16])
            i += 16
        ids = tokenizer(" ".join(out))["input_ids"][:n_tokens]
        return tokenizer.decode(ids)

    rows = [
        {
            "prompt": text(length // 4, 97 * k),
            "chosen": text(length - length // 4 - 40, 13 * k + 5),
            "rejected": text(length - length // 4 - 40, 29 * k + 11),
        }
        for k in range(pairs)
    ]
    train, held = folder / f"train-{length}.jsonl", folder / f"held-{length}.jsonl"
    train.write_text("".join(json.dumps(r) + "\n" for r in rows))
    held.write_text("".join(json.dumps(r) + "\n" for r in rows[:2]))
    return train, held


def _empty_cache(env: dict[str, str], folder: Path) -> dict[str, str]:
    """`env` with TWIN_DPO_CACHE at a new empty `folder` (no reference log-probs), sharing the converted models."""
    folder.mkdir()
    models = cache_root() / "models"
    if models.is_dir():
        (folder / "models").symlink_to(models.resolve())
    return {**env, "TWIN_DPO_CACHE": str(folder)}


def bench(
    steps: int = 100,
    repeats: int = 3,
    scaling_steps: int = 4,
    out: Path = Path("reports/bench"),
    overrides: list[str] | None = None,
    scaling: bool = True,
    lengths=LENGTHS,
    batches=BATCHES,
    ablations=ABLATIONS,
    ablation_steps: int = 30,
) -> Path:
    """Main runs of `steps` (default one epoch: learning is compared once both have seen every pair; after
    30 steps the held-out accuracy still swings by 0.1 with the order of the pairs alone), `repeats` times each:
    the TRL baseline, ours on an empty reference cache (cold) and ours again reading that cache (warm); ablation
    runs of `ablation_steps` (they measure speed)."""
    overrides = overrides or []
    recipe = recipes.resolve("dpo_lora", overrides)
    if recipe.model.name_or_path.startswith(twin.PREFIX):  # built once here: the cold runs' empty caches keep it
        overrides = overrides + [f"model.name_or_path={twin.model_dir(recipe.model.name_or_path)}"]
        recipe = recipes.resolve("dpo_lora", overrides)
    if not children.BASELINE.is_file():
        raise UserError(f"bench needs the TRL baseline script {children.BASELINE}; run it from a twin-dpo checkout")
    out.mkdir(parents=True, exist_ok=True)
    path = paths.resolve_model_path(recipe.model.name_or_path)
    config = AutoConfig.from_pretrained(path)
    prec = precision(recipe, "cuda" if cuda_available() else "cpu")
    shape = model_shape(config)
    peak = matmul_peak(config.hidden_size, config.intermediate_size, 1024, prec.autocast or "fp32")
    start = time.perf_counter()
    work = Path(tempfile.mkdtemp(prefix="twin-bench-", dir=out))
    main: dict[str, list[dict]] = {"baseline": [], "cold": [], "ours": []}
    env = {**os.environ}
    for k in range(repeats):
        print(
            f"[twin-dpo] bench repetition {k + 1}/{repeats}: TRL baseline, ours on an empty reference cache, "
            "ours again reading it",
            flush=True,
        )
        env = _empty_cache({**os.environ}, work / f"cache-{k}")  # each cold run starts empty; its warm run reads it
        main["baseline"].append(run_baseline(work / f"baseline-{k}", steps, overrides, env))
        main["cold"].append(run_ours(work / f"ours-cold-{k}", steps, overrides, env))
        main["ours"].append(run_ours(work / f"ours-{k}", steps, overrides, env))
    print("[twin-dpo] bench ablation: all levers on", flush=True)
    cold = _empty_cache(env, work / "cache-ablation")  # its own reference pass: the column's baseline
    ablation = [("none (all levers on)", run_ours(work / "ablation-all-on", ablation_steps, overrides, cold))]
    for label, sets in ablations:
        print(f"[twin-dpo] bench ablation: {label}", flush=True)
        ablation.append((label, run_ours(work / f"ablation-{len(ablation)}", ablation_steps, overrides + sets, env)))
    scale = []
    if scaling:
        tokenizer = AutoTokenizer.from_pretrained(path)
        for length in lengths:
            for batch in batches:
                pairs = batch * (scaling_steps + 1)
                train, held = synthetic_data(work, tokenizer, length, pairs)
                sets = overrides + [
                    f"data.train={train}",
                    f"data.eval={held}",
                    f"train.batch_size={batch}",
                    "train.warmup_steps=0",
                    f"data.max_length={max(length, 128)}",
                ]
                print(f"[twin-dpo] bench scaling: {length} tokens, batch {batch}", flush=True)
                b = run_baseline(work / f"scale-b-{length}-{batch}", scaling_steps, sets, env)
                o = run_ours(work / f"scale-o-{length}-{batch}", scaling_steps, sets, env)
                scale.append({"length": length, "batch": batch, "baseline": b, "ours": o})
    report = bench_report.render(
        main, ablation, scale, shape, peak, prec, steps, ablation_steps, repeats, time.perf_counter() - start
    )
    write_json_atomic(out / "bench.json", report["json"])
    write_text_atomic(out / "bench.md", report["md"])
    for line in report["targets"]:
        print(f"[twin-dpo] target: {line}", flush=True)
    return out / "bench.md"


def model_shape(config) -> dict[str, int]:
    """Weights per token position: `body` (the transformer layers), `head` (the LM head's vocab x hidden), and
    `params` (all, embeddings once when tied) - what bench_report.model_flops multiplies the counted positions by."""
    h, i, n, v = config.hidden_size, config.intermediate_size, config.num_hidden_layers, config.vocab_size
    kv = config.num_key_value_heads * (h // config.num_attention_heads)
    per_layer = h * h * 2 + h * kv * 2 + 3 * h * i + 2 * h
    body = n * per_layer + h
    return {"body": body, "head": v * h, "params": body + v * h * (1 if config.tie_word_embeddings else 2)}
