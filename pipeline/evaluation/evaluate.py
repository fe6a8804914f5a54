"""`python -m pipeline evaluate RUN` (also run at the end of training): did the twin move toward the voice?

- Held-out DPO numbers (reward accuracy, margin, loss) for the untouched twin and
  the trained policy, as measured by the trainer on the held-out pairs (the
  run's summary.json: before = step 0, after = the last step).
- Greedy answers (fixed seed, fixed max tokens, fp32) of both to the fixed
  questions in data/questions.py, and the style metrics of those answers
  (evaluation/style.py). The untouched twin's answers are cached on disk: every
  run on the same twin shares them. The trained answers run on a merged copy (the
  adapter folded into the weights), one left-padded batch with the KV cache.
Writes RUN/eval.json and RUN/samples.md.
"""

from __future__ import annotations

import contextlib
import json
import time
from pathlib import Path
from typing import Any

import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

from pipeline import recipe as recipes
from pipeline import run_folder
from pipeline.data import Pair, load_splits, render_prompt
from pipeline.data.questions import FIXED_QUESTIONS
from pipeline.errors import UserError
from pipeline.evaluation import style
from pipeline.model import hf, paths, runtime
from pipeline.model.backend import Backend, cuda_available
from pipeline.storage import cache_root, feed_file, hasher, read_json, write_json_atomic, write_text_atomic

MAX_NEW_TOKENS = 128


class _Progress:
    """A transformers logits processor that only ticks a progress bar: one tick per generated token."""

    def __init__(self, bar):
        self.bar = bar

    def __call__(self, input_ids, scores):  # noqa: ARG002 (the processor signature)
        self.bar.update(1)
        return scores


def generate(
    model, tokenizer, questions, system_prompt: str | None, max_new_tokens: int, label: str = "answers"
) -> list[str]:
    """Greedy answers to `questions`, one batch, left-padded, with the KV cache; a progress bar counts the tokens."""
    from tqdm.auto import tqdm
    from transformers import LogitsProcessorList

    prompts = [render_prompt(tokenizer, Pair((("user", q),), "", "", "question"), system_prompt) for q in questions]
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    try:
        batch = tokenizer(prompts, return_tensors="pt", padding=True)
    finally:
        tokenizer.padding_side = side
    torch.manual_seed(0)
    desc = f"{label}: {len(questions)} questions"
    with torch.no_grad(), tqdm(total=max_new_tokens, desc=desc, unit="token", dynamic_ncols=True) as bar:
        out = model.generate(
            **batch,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            use_cache=True,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
            logits_processor=LogitsProcessorList([_Progress(bar)]),
        )
    return [tokenizer.decode(row[batch["input_ids"].shape[1] :], skip_special_tokens=True).strip() for row in out]


def _fingerprint(path: str, recipe) -> str:
    """Identity of the untouched twin: its weight files' contents and everything that shapes its answers."""
    h = hasher()
    folder = Path(path)
    files = sorted(folder.glob("*.safetensors")) if folder.is_dir() else []
    if recipe.model.adapter:  # a twin adapter is part of the untouched twin
        files += sorted(Path(recipe.model.adapter).glob("*.safetensors"))
    for f in files:
        feed_file(h, f)
    h.update(
        json.dumps(
            [
                path if not folder.is_dir() else "",
                recipe.model.load_in_4bit,
                recipe.data.system_prompt,
                FIXED_QUESTIONS,
                MAX_NEW_TOKENS,
                torch.__version__,
                "fp32-greedy",
            ]
        ).encode()
    )
    return h.hexdigest()


def _twin_and_policy(recipe, run_dir: Path, artifact: str, path: str):
    """(untouched twin, trained policy for generation) as two callables, to be called in that order.

    The twin's answers come first, from the unmerged weights (an adapter switched off, or the twin adapter
    switched on); the policy's adapter is then merged into the same weights in place, so the trained answers
    run through plain linear layers (no LoRA side path per token) without a second copy of the base. A 4-bit
    base stays unmerged."""
    fp32 = recipes.apply_overrides(recipe, ["model.dtype=float32"])
    backend = Backend("hf", "evaluate", "cpu" if not cuda_available() else "cuda")
    if artifact != "adapter":
        policy = AutoModelForCausalLM.from_pretrained(run_dir / "model", dtype=torch.float32).eval()

        @contextlib.contextmanager
        def base_twin():
            yield hf.load_base(fp32, path, backend).eval()

        return base_twin, lambda: policy
    peft_model = PeftModel.from_pretrained(hf.load_base(fp32, path, backend), run_dir / "adapter").eval()

    @contextlib.contextmanager
    def twin():
        if not recipe.model.adapter:  # the untouched twin is the same base with the adapter switched off
            with peft_model.disable_adapter():
                yield peft_model
            return
        # the untouched twin is the base with its SFT adapter: loaded only here (its answers may be cached)
        peft_model.load_adapter(recipe.model.adapter, adapter_name="twin")
        peft_model.set_adapter("twin")
        try:
            yield peft_model
        finally:
            peft_model.set_adapter("default")
            peft_model.delete_adapter("twin")

    def merged():
        if recipe.model.load_in_4bit:  # merging re-quantizes the base: its rounding would drown a small update
            return peft_model
        return peft_model.merge_and_unload().eval()

    return twin, merged


def evaluate(run_dir: Path | None) -> dict[str, Any]:
    start = time.perf_counter()
    run_dir = Path(run_dir) if run_dir else run_folder.latest_run()
    if not (run_dir / "summary.json").is_file():
        raise UserError(f"{run_dir} is not a finished run (no summary.json)")
    recipe = recipes.from_dict(read_json(run_dir / "recipe.json"), str(run_dir / "recipe.json"))
    summary = read_json(run_dir / "summary.json")
    runtime.quiet_libraries()
    runtime.set_threads(recipe.train.threads)
    path = paths.resolve_model_path(recipe.model.name_or_path, recipe.model.allow_pickle_weights)
    tokenizer = hf.load_tokenizer(recipe, path)
    system = recipe.data.system_prompt
    twin_ctx, policy_for_generation = _twin_and_policy(recipe, run_dir, summary.get("artifact", "adapter"), path)
    cache = cache_root() / "generations" / f"{_fingerprint(path, recipe)}.json"
    if cache.is_file():
        before = json.loads(cache.read_text())["answers"]
    else:
        with twin_ctx() as twin:
            before = generate(twin, tokenizer, FIXED_QUESTIONS, system, MAX_NEW_TOKENS, "untouched twin")
        cache.parent.mkdir(parents=True, exist_ok=True)
        write_json_atomic(cache, {"questions": FIXED_QUESTIONS, "answers": before})
    answers_start = time.perf_counter()
    after = generate(policy_for_generation(), tokenizer, FIXED_QUESTIONS, system, MAX_NEW_TOKENS, "trained twin")
    answers_seconds = time.perf_counter() - answers_start
    _, held = load_splits(recipe.data)  # the held-out answers themselves are the yardsticks of the two voices
    report = {
        "run": str(run_dir),
        "held_out": {
            "before": summary.get("eval_before"),
            "after": summary.get("eval_after"),
            "pairs": summary.get("eval_pairs"),
        },
        "style": {
            "before": style.metrics(before),
            "after": style.metrics(after),
            "author_reference": style.metrics([p.chosen for p in held]),
            "generic_reference": style.metrics([p.rejected for p in held]),
        },
        "generations": [
            {"question": q, "before": b, "after": a} for q, b, a in zip(FIXED_QUESTIONS, before, after, strict=True)
        ],
        "max_new_tokens": MAX_NEW_TOKENS,
        "decoding": "greedy, fp32, seed 0",
        "seconds": round(time.perf_counter() - start, 1),
        "trained_answers_seconds": round(answers_seconds, 1),
    }
    report["voice"] = style.judge_styles(report["style"])
    write_json_atomic(run_dir / "eval.json", report)
    write_text_atomic(run_dir / "samples.md", samples_markdown(report))
    return report


def samples_markdown(report: dict[str, Any]) -> str:
    b, a = report["style"]["before"], report["style"]["after"]
    author = report["style"]["author_reference"]
    voice = report.get("voice") or {}
    distances = voice.get("metrics", {})
    lines = [
        f"# Samples: {report['run']}",
        "",
        f"Greedy, {report['max_new_tokens']} new tokens at most. Style of these answers (before -> after), and the "
        "distance of each to the author's held-out answers, in units of the gap between the author's and the generic "
        "held-out answers:",
        "",
        "| metric | untouched twin | trained | author's held-out answers | distance before -> after |",
        "|---|---|---|---|---|",
    ]
    for key in b:
        d = distances.get(key)
        moved = f"{d['distance_before']:.2f} -> {d['distance_after']:.2f}" if d else "(judged on its own)"
        lines.append(f"| {key} | {b[key]:.3f} | {a[key]:.3f} | {author[key]:.3f} | {moved} |")
    if voice:
        lines += ["", f"**{style.verdict_line(voice)}**"]
    for g in report["generations"]:
        lines += ["", f"## {g['question']}", "", f"**Untouched twin:** {g['before']}", "", f"**Trained:** {g['after']}"]
    return "\n".join(lines) + "\n"


def _timing(report: dict[str, Any]) -> str:
    trained = report["trained_answers_seconds"]
    return f"evaluation took {report['seconds']:.0f} s, of which the trained answers {trained:.0f} s"


def describe(report: dict[str, Any]) -> str:
    """The style lines a run prints at its end: each metric against the author's yardstick, then the verdict."""
    voice = report.get("voice") or style.judge_styles(report["style"])
    return "\n".join(
        ["style of the greedy answers, untouched -> trained (distance to the author's held-out answers):"]
        + style.distance_lines(voice)
        + [style.verdict_line(voice)]
        + ([_timing(report)] if "trained_answers_seconds" in report else [])
    )
