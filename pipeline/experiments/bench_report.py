"""reports/bench/bench.md and bench.json from the bench's run summaries: medians, spreads, ratios, MFU."""

from __future__ import annotations

import statistics
from typing import Any

from pipeline.storage import human_bytes


def _stats(values: list[float]) -> dict[str, float]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "values": values}


def model_flops(summary: dict, shape: dict[str, int]) -> float | None:
    """FLOPs the run's model really performed in its training time, from the positions it counted (summary
    `work`, training/work.py); recomputation (gradient checkpointing, our head's backward) is not counted, as MFU
    does not count it; attention's own matmuls are left out (small at these lengths).

    Per position of the transformer body, B = its weights (embeddings excluded), per projected LM-head row
    Hd = vocab x hidden, per position of the adapter A = the LoRA weights:
    - LoRA training: forward 2B, backward to the inputs only through the frozen weights 2B, adapter forward and
      both backward products 6A; head forward 2Hd, backward to its input 2Hd (it is frozen);
    - full training: 6B and 6Hd;
    - a reference forward, only where one ran (TRL's at every step; our one-off pass, cold runs only): 2B, 2Hd.
    """
    work = summary.get("work")
    if not work:
        return None
    t, r = work["train"], work["reference"]
    body, head = shape["body"], shape["head"]
    if summary.get("method", "lora") == "full":
        train = 6 * body * t["body_tokens"] + 6 * head * t["head_rows"]
    else:
        lora = summary["trainable_parameters"]
        train = (4 * body + 6 * lora) * t["body_tokens"] + 4 * head * t["head_rows"]
    return float(train + 2 * body * r["body_tokens"] + 2 * head * r["head_rows"])


def mfu(summary: dict, shape: dict[str, int], peak: float) -> float:
    flops = model_flops(summary, shape)
    return float("nan") if flops is None else flops / summary["train_seconds"] / peak


def train_reference_seconds(summary: dict) -> float:
    """The part of a run's one-off reference pass that its train time holds: the train pairs' share (the held-out
    pairs' share, `reference_eval_seconds`, is in its evaluation time; summaries from before the split lack it)."""
    if summary.get("reference_reused"):
        return 0.0
    return (summary.get("reference_seconds") or 0.0) - (summary.get("reference_eval_seconds") or 0.0)


def _loop_pairs_per_second(summary: dict) -> float:
    """pairs/s of the training loop alone: without a reference pass the run had to compute before it."""
    return summary["pairs_trained"] / (summary["train_seconds"] - train_reference_seconds(summary))


def steady_step_seconds(summary: dict) -> float | None:
    """Median seconds of a run's steps after its first (forward, backward, update; summaries' `step_seconds`),
    or None for a run of one step or a summary without step times."""
    steps = summary.get("step_seconds") or []
    return statistics.median(steps[1:]) if len(steps) >= 2 else None


def loop_step_seconds(summary: dict) -> float:
    """A run's training-loop seconds per step: its steady steps where timed, else its train time less the reference
    pass, per step."""
    steady = steady_step_seconds(summary)
    if steady is not None:
        return steady
    return summary["pairs_trained"] / _loop_pairs_per_second(summary) / max(1, summary["steps"])


def loop_speedup(row: dict) -> float:
    """A scaling point's training-loop speed-up: the baseline's steady step time over ours (the first step's
    one-off warm-up left out on both sides); from whole-run pairs/s where a side has no step times."""
    b, o = steady_step_seconds(row["baseline"]), steady_step_seconds(row["ours"])
    if b is not None and o is not None:
        return b / o
    return _loop_pairs_per_second(row["ours"]) / _loop_pairs_per_second(row["baseline"])


def _each(runs: list[dict], key: str) -> str:
    """One figure in seconds per run, in run order: "41 s, 39 s, 40 s"."""
    return ", ".join(f"{run.get(key) or 0:.0f} s" for run in runs)


def _met(ok: bool) -> str:
    return "met" if ok else "NOT met"


def _targets(main, scale, base, acc_gap) -> list[str]:
    """Issue 17's targets, each with its measured figure and met / NOT met."""
    b = base["pairs_per_second"]["median"]
    runs = len(main["cold"])
    cold = statistics.median(s["pairs_per_second"] for s in main["cold"]) / b
    warm = statistics.median(s["pairs_per_second"] for s in main["ours"]) / b
    lines = [
        f"cold single run (computes the reference first) >= 2.0x the baseline's pairs/s, median of {runs}: "
        f"{cold:.2f}x, {_met(cold >= 2.0)}",
        f"warm (reference cache read) >= 3.0x, median of {len(main['ours'])}: {warm:.2f}x, {_met(warm >= 3.0)}",
    ]
    grid = [r for r in scale if r["length"] <= 1024 and r["batch"] <= 4]
    if grid:
        speed = [(loop_speedup(r), r) for r in grid]
        low, at = min(speed, key=lambda x: x[0])
        lines.append(
            f"training loop >= 2.0x at every scaling point up to 1024 tokens x batch 4: lowest {low:.2f}x "
            f"({at['length']} tokens, batch {at['batch']}), {_met(low >= 2.0)}"
        )
        mem = [(r["ours"]["peak_memory_bytes"] / r["baseline"]["peak_memory_bytes"], r) for r in grid]
        high, at = max(mem, key=lambda x: x[0])
        lines.append(
            f"peak memory <= TRL's at every scaling point: highest ours / TRL {high:.2f} ({at['length']} tokens, "
            f"batch {at['batch']}), {_met(high <= 1.0)}"
        )
    else:
        lines.append("scaling grid: not run (--no-scaling)")
    lines.append(f"held-out reward accuracy within 0.05 of the baseline's: {acc_gap:.3f}, {_met(acc_gap <= 0.05)}")
    return lines


def render(main, ablation, scale, shape, peak, prec, steps, ablation_steps, repeats, seconds) -> dict[str, Any]:
    def figures(summaries):
        return {
            "pairs_per_second": _stats([s["pairs_per_second"] for s in summaries]),
            "tokens_per_second": _stats([s["tokens_per_second"] for s in summaries]),
            "peak_memory_bytes": _stats([s["peak_memory_bytes"] for s in summaries]),
            "mfu": _stats([mfu(s, shape, peak) for s in summaries]),
            "final_train_loss": _stats([s["final_train_loss"] for s in summaries]),
            "held_out_reward_accuracy": _stats([s["eval_after"]["reward_accuracy"] for s in summaries]),
        }

    base, cold, ours = figures(main["baseline"]), figures(main["cold"]), figures(main["ours"])
    ratio = ours["pairs_per_second"]["median"] / base["pairs_per_second"]["median"]
    ratio_cold = cold["pairs_per_second"]["median"] / base["pairs_per_second"]["median"]
    mem_ok = (
        max(cold["peak_memory_bytes"]["median"], ours["peak_memory_bytes"]["median"])
        <= (base["peak_memory_bytes"]["median"])
    )
    acc_gap = max(
        abs(side["held_out_reward_accuracy"]["median"] - base["held_out_reward_accuracy"]["median"])
        for side in (cold, ours)
    )
    s0 = main["ours"][0]
    targets = _targets(main, scale, base, acc_gap)
    targets.insert(-1, f"peak memory of the main runs (cold and warm) <= the baseline's: {_met(mem_ok)}")
    md = [
        f"# Bench: twin-dpo LoRA DPO vs plain TRL — **{ratio_cold:.2f}x pairs/s cold, {ratio:.2f}x warm**",
        "",
        "## Targets",
        "",
        *[f"- {line}" for line in targets],
        "",
        f"{s0['device']}; compute {prec.autocast or 'float32'}; SmolLM2-135M-class model ({shape['params'] / 1e6:.1f}M "
        "parameters); "
        f"{steps} steps of {s0['pairs_trained'] // max(1, s0['steps'])} pairs per run, {repeats} repetitions of: "
        "the baseline, ours on an empty reference cache (cold: it computes the reference log-probs first), ours "
        "again reading that cache (warm). Medians, with [min, max] across runs.",
        "",
        "| figure | TRL baseline | twin-dpo, cold | twin-dpo, warm | cold / TRL | warm / TRL |",
        "|---|---|---|---|---|---|",
    ]
    for key, label, fmt in (
        ("pairs_per_second", "pairs/s", "{:.3f}"),
        ("tokens_per_second", "real tokens/s", "{:.0f}"),
        ("peak_memory_bytes", "peak memory", None),
        ("mfu", "MFU", "{:.1%}"),
        ("final_train_loss", "end-of-run train loss", "{:.4f}"),
        ("held_out_reward_accuracy", "held-out reward accuracy", "{:.3f}"),
    ):

        def show(st, fmt=fmt):
            if fmt is None:
                return f"{human_bytes(st['median'])} [{human_bytes(st['min'])}, {human_bytes(st['max'])}]"
            return f"{fmt.format(st['median'])} [{fmt.format(st['min'])}, {fmt.format(st['max'])}]"

        r = [
            side[key]["median"] / base[key]["median"] if base[key]["median"] else float("nan") for side in (cold, ours)
        ]
        md.append(
            f"| {label} | {show(base[key])} | {show(cold[key])} | {show(ours[key])} | {r[0]:.2f}x | {r[1]:.2f}x |"
        )
    md += [
        "",
        f"MFU = the FLOPs each side's model really performed in its training time / the physical ceiling, the "
        f"matmul peak measured here at the model's largest shape: **{peak / 1e9:.0f} GFLOP/s = 100%**. Counted "
        "per side (training/work.py, bench_report.model_flops): LoRA = forward + backward to the inputs through the "
        "frozen weights + the adapter's own products; the LM head on the positions it really projects (ours: the "
        "answers; TRL's on a CPU: every position, padding included); the transformer on the positions it really "
        "ran (ours packed, TRL's padded); the reference forward only where it ran (TRL: every step; ours: the "
        "one-off pass of a cold run, none when cached). Recomputation is not counted.",
    ]
    first = main["cold"]
    md += [
        "",
        "Each cold run computed the reference log-probs of the "
        f"{first[0].get('reference_pairs_computed', 'all')} train and held-out pairs it reads "
        f"({_each(first, 'reference_seconds')}; the held-out pairs' {_each(first, 'reference_eval_seconds')} of that "
        "count as evaluation, as TRL's held-out reference forward does); train time per run, cold: "
        f"{_each(first, 'train_seconds')}, warm: {_each(main['ours'], 'train_seconds')}.",
        "",
        "## Ablation: each lever switched off on its own",
        "",
        f"{ablation_steps}-step runs, one each. The all-on run computes its reference log-probs on an empty cache; "
        f"the others read the main runs' cache unless the lever changes the cache key (the LM head, the row order, "
        f"the reference batches, compiled blocks), when they compute them first. pairs/s here is the training "
        f"loop's, without that one-off pass (its train pairs' share in its own column, the held-out pairs' after the "
        f"+). Slowdown = all levers on / this run (below 1: this run was faster).",
        "",
        "| lever (off, unless marked ON) | pairs/s (training loop) | slowdown | one-off reference pass | train time "
        "with it | peak memory | held-out reward acc. |",
        "|---|---|---|---|---|---|---|",
    ]
    on = _loop_pairs_per_second(ablation[0][1])
    for label, run in ablation:
        ref = (
            "read from cache"
            if run.get("reference_reused")
            else f"{train_reference_seconds(run):.1f} s + {run.get('reference_eval_seconds') or 0:.1f} s"
            if run.get("reference_cache")
            else "none: run at every step"
        )
        md.append(
            f"| {label} | {_loop_pairs_per_second(run):.3f} | {on / _loop_pairs_per_second(run):.2f}x | {ref} | "
            f"{run['train_seconds']:.0f} s | {human_bytes(run['peak_memory_bytes'])} | "
            f"{run['eval_after']['reward_accuracy']:.3f} |"
        )
    if scale:
        md += [
            "",
            "## Scaling: seconds per step and peak memory",
            "",
            "Synthetic pairs whose prompt + answer fill the given length (every pair the same length: no padding "
            "for padding-free rows to save); a few steps each (small runs: read the trend, not the third digit). "
            "Each of our runs meets new pairs, so it first computes their reference log-probs: whole-run s/step "
            "with that one-off pass. The training loop is a step's forward, backward and update, timed the same "
            "way on both sides, median of the steps after the first (whose one-off warm-up, as the reference pass, "
            "is in the whole-run columns); the target line reads its speed-up.",
            "",
            "| tokens per sequence | batch (pairs) | TRL s/step, whole run | ours s/step, whole run with its "
            "reference pass | TRL s/step, loop | ours s/step, loop | speed-up (loop) | TRL peak | ours peak |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for row in scale:
            b, o = row["baseline"], row["ours"]
            bs, os_ = b["train_seconds"] / max(1, b["steps"]), o["train_seconds"] / max(1, o["steps"])
            md.append(
                f"| {row['length']} | {row['batch']} | {bs:.2f} | {os_:.2f} | {loop_step_seconds(b):.2f} | "
                f"{loop_step_seconds(o):.2f} | "
                f"{loop_speedup(row):.2f}x | {human_bytes(b['peak_memory_bytes'])} | "
                f"{human_bytes(o['peak_memory_bytes'])} |"
            )
    md += ["", f"_{seconds / 60:.1f} minutes, `python -m pipeline bench`._"]
    return {
        "md": "\n".join(md) + "\n",
        "targets": targets,
        "json": {
            "ratio_pairs_per_second": ratio,
            "ratio_cold_pairs_per_second": ratio_cold,
            "targets": targets,
            "baseline": base,
            "ours_cold": cold,
            "ours": ours,
            "matmul_peak_flops": peak,
            "parameters": shape["params"],
            "shape": shape,
            "steps": steps,
            "ablation_steps": ablation_steps,
            "repeats": repeats,
            "ablation": [{"lever_off": label, "summary": s} for label, s in ablation],
            "scaling": scale,
            "seconds": seconds,
        },
    }
