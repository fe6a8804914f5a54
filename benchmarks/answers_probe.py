"""How long do the fixed-question answers take: the LoRA adapter as a side path, or merged into the weights?

Puts the dpo_lora adapter shape (r 32 on all seven projections, lora_B drawn at a small scale so the adapter
changes the logits a little, as a trained one does) on the embedded model (or any model folder), then answers
the fixed questions (data/questions.py) exactly as `evaluate` does (greedy, fp32, one left-padded batch, KV
cache, 128 new tokens at most) with:

  unmerged   the PeftModel: every linear layer adds its LoRA path at every generated token
  merged     the same adapter folded into a copy of the weights (what evaluate generates the trained answers on)

alternating the two, `--repeats` times each, and prints the medians, their ratio and whether the answers agree.

    .venv/bin/python benchmarks/answers_probe.py [--model DIR] [--repeats 3] [--scale 1e-3]
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch


def main() -> None:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from pipeline.data.questions import FIXED_QUESTIONS
    from pipeline.evaluation.evaluate import MAX_NEW_TOKENS, generate
    from pipeline.model import paths, runtime
    from pipeline.recipe import ALL_LINEAR

    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=None, help="model folder (default: the embedded SmolLM2-135M-Instruct)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--scale", type=float, default=1e-3, help="std of lora_B (0 would make the adapter a no-op)")
    args = ap.parse_args()
    runtime.quiet_libraries()
    runtime.set_threads(0)
    folder = args.model or str(paths.embedded_model_dir())
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    torch.manual_seed(0)
    unmerged = get_peft_model(model, LoraConfig(r=32, lora_alpha=32, target_modules=list(ALL_LINEAR))).eval()
    for name, param in unmerged.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(param, std=args.scale)
    merged = copy.deepcopy(unmerged).merge_and_unload().eval()
    times: dict[str, list[float]] = {"unmerged": [], "merged": []}
    answers: dict[str, list[str]] = {}
    for _ in range(args.repeats):
        for label, m in (("unmerged", unmerged), ("merged", merged)):
            start = time.perf_counter()
            answers[label] = generate(m, tokenizer, FIXED_QUESTIONS, None, MAX_NEW_TOKENS, label)
            times[label].append(time.perf_counter() - start)
    med = {k: statistics.median(v) for k, v in times.items()}
    same = sum(a == b for a, b in zip(answers["unmerged"], answers["merged"], strict=True))
    print(f"{len(FIXED_QUESTIONS)} questions, {MAX_NEW_TOKENS} new tokens at most, {args.repeats} runs each")
    for k, v in times.items():
        print(f"  {k:9s} median {med[k]:.1f} s  (runs: {', '.join(f'{t:.1f}' for t in v)})")
    print(f"  merged is {med['unmerged'] / med['merged']:.2f}x faster; {same}/{len(FIXED_QUESTIONS)} answers identical")


if __name__ == "__main__":
    main()
