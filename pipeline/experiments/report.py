"""Every experiment's page in one place: run folders in, markdown out (learning curves: curves.py).

Reads only what runs wrote (summary.json, metrics.jsonl, eval.json), so any set of run folders can be compared.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline import run_folder
from pipeline.data.questions import FIXED_QUESTIONS
from pipeline.evaluation import style
from pipeline.storage import dir_size, human_bytes, read_json

STYLE_COLUMNS = (
    ("words_per_answer", "words/answer", "{:.0f}"),
    ("words_per_sentence", "words/sentence", "{:.1f}"),
    ("stock_phrase_share", "stock-phrase share", "{:.2f}"),
    ("first_person_per_100_words", "first person /100 words", "{:.1f}"),
    ("repetition_rate", "repetition", "{:.2f}"),
)


@dataclass
class Run:
    name: str
    folder: Path
    summary: dict[str, Any]
    metrics: list[dict[str, Any]]
    eval: dict[str, Any] | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def train_rows(self):
        return [m for m in self.metrics if "loss" in m and "step" in m]

    @property
    def eval_rows(self):
        return [m for m in self.metrics if "eval_loss" in m and "step" in m]


def load(folder: Path, name: str | None = None) -> Run:
    folder = Path(folder)
    summary = read_json(folder / "summary.json")
    ev = read_json(folder / "eval.json") if (folder / "eval.json").is_file() else None
    return Run(name or summary.get("recipe", folder.name), folder, summary, run_folder.read_metrics(folder), ev)


def voice(run: Run) -> dict[str, Any] | None:
    """The run's voice judgement (evaluation/style.py judge): from eval.json, recomputed for older eval files."""
    ev = run.eval or {}
    if ev.get("voice"):
        return ev["voice"]
    return style.judge_styles(ev["style"]) if ev.get("style") else None


def voice_cell(run: Run) -> str:
    """`toward the author (0.74 -> 0.20)`, with the repetition flag when repetition rose by more than 0.05."""
    j = voice(run)
    if j is None:
        return ""
    cell = f"{j['verdict']} ({j['mean_distance_before']:.2f} -> {j['mean_distance_after']:.2f})"
    if j["repetition_flagged"]:
        cell += f"; repetition up {j['repetition_after'] - j['repetition_before']:+.2f}"
    return cell


def artifact_size(run: Run) -> int:
    return dir_size(run.folder / run.summary.get("artifact", "adapter"))


def _ratio(value: float | None, base: float | None) -> str:
    if value is None or not base:
        return ""
    return f" ({value / base:.2f}x)"


def cost_table(run_list: list[Run], baseline: Run | None) -> list[str]:
    """Markdown rows: every figure, and its ratio to the baseline's."""
    head = [
        "run",
        "reference pass",
        "train time (s)",
        "pairs/s",
        "tokens/s",
        "peak memory",
        "trainable params",
        "artifact",
        "held-out reward acc.",
        "held-out margin",
        "voice moved",
    ] + [c[1] for c in STYLE_COLUMNS]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    b = baseline
    for run in run_list:
        s = run.summary
        base_s = b.summary if b else {}
        style = (run.eval or {}).get("style", {}).get("after", {})
        base_style = ((b.eval or {}) if b else {}).get("style", {}).get("after", {})
        after, base_after = s.get("eval_after") or {}, base_s.get("eval_after") or {}
        cells = [
            run.name,
            reference_status(s),
            f"{s['train_seconds']:.1f}{_ratio(s['train_seconds'], base_s.get('train_seconds'))}",
            f"{s['pairs_per_second']:.3f}{_ratio(s['pairs_per_second'], base_s.get('pairs_per_second'))}",
            f"{s['tokens_per_second']:.0f}{_ratio(s['tokens_per_second'], base_s.get('tokens_per_second'))}",
            f"{human_bytes(s['peak_memory_bytes'])}{_ratio(s['peak_memory_bytes'], base_s.get('peak_memory_bytes'))}",
            f"{s['trainable_parameters']:,}{_ratio(s['trainable_parameters'], base_s.get('trainable_parameters'))}",
            f"{human_bytes(artifact_size(run))}{_ratio(artifact_size(run), artifact_size(b) if b else None)}",
            *(
                f"{after.get(k, float('nan')):.3f}{_ratio(after.get(k), base_after.get(k))}"
                for k in ("reward_accuracy", "reward_margin")
            ),
            voice_cell(run),
        ]
        for key, _, fmt in STYLE_COLUMNS:
            value = style.get(key)
            cells.append("" if value is None else fmt.format(value) + _ratio(value, base_style.get(key)))
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def reference_status(summary: dict[str, Any]) -> str:
    """How the run got its reference log-probs: at every step, computed once (seconds), or read from the cache."""
    if summary.get("reference_reused"):
        return "read from cache"
    if summary.get("reference_forward_passes"):
        return f"once, {summary['reference_seconds']:.0f} s"
    return "every step"


def answers(run_list: list[Run], question: str = FIXED_QUESTIONS[0]) -> list[str]:
    lines = [f"### {question}", ""]
    twin_answer = None
    for run in run_list:
        for g in (run.eval or {}).get("generations", []):
            if g["question"] == question:
                twin_answer = twin_answer or g["before"]
                lines += [f"**{run.name}:** {g['after']}", ""]
    if twin_answer:
        lines[2:2] = [f"**untouched twin:** {twin_answer}", ""]
    return lines


def style_reference(run_list: list[Run]) -> list[str]:
    ev = next((r.eval for r in run_list if r.eval), None)
    if not ev:
        return []
    rows = ["| answers | " + " | ".join(c[1] for c in STYLE_COLUMNS) + " |", "|---|" + "---|" * len(STYLE_COLUMNS)]
    for label, key in (
        ("untouched twin", "before"),
        ("author's held-out answers", "author_reference"),
        ("generic held-out answers", "generic_reference"),
    ):
        values = ev["style"][key]
        rows.append(f"| {label} | " + " | ".join(fmt.format(values[k]) for k, _, fmt in STYLE_COLUMNS) + " |")
    return rows


def compare_page(every: list[Run], seconds: float) -> str:
    """reports/compare/report.md: the cost table against the TRL baseline (the last run), curves, answers."""
    load_times = ", ".join(f"{r.name} {r.summary['load_seconds']:.0f} s" for r in every)
    memory_kind = every[0].summary.get("peak_memory_kind", "peak RSS")
    questions = len(every[0].eval["generations"]) if every[0].eval else 8
    lines = [
        "# LoRA, QLoRA and full DPO against the plain TRL baseline",
        "",
        f"Same data, seed, batch and steps for every run ({_describe(every[0])}); device: "
        f"{every[0].summary['device']}. "
        f"Ratios are to the TRL baseline (benchmarks/trl_baseline.py: TRL's documented LoRA DPO with its defaults). "
        f"Train time excludes model loading ({load_times}) and held-out evaluation; it includes the reference pass. "
        f"Peak memory: {memory_kind} of each run's own process.",
        "",
        *cost_table(every, every[-1]),
        "",
        "Held-out reward accuracy and margin are on the held-out pairs after the last step (before training they are "
        f"0.000: the policy is the reference). Style columns measure each run's greedy answers to the {questions} "
        "fixed questions.",
        "",
        "Style yardsticks:",
        "",
        *style_reference(every),
        "",
        "![learning curves](curves.png)",
        "",
        "## Answers side by side",
        "",
        *answers(every),
        f"_Generated in {seconds:.0f} s by `python -m pipeline compare`._",
    ]
    return "\n".join(lines) + "\n"


def _describe(run: Run) -> str:
    s = run.summary
    return f"{s['steps']} steps of {s['pairs_trained'] // max(1, s['steps'])} pairs, {s['pairs_trained']} pairs"


def sweep_page(recipe_spec: str, ranked: list[Run], seconds: float) -> str:
    """reports/sweep/report.md: the ranked runs, their voice, curves, and every answer."""
    lines = [
        f"# Sweep of {recipe_spec}: {len(ranked)} runs",
        "",
        "Ranked by held-out reward accuracy, then runs whose repetition rose by more than 0.05 last, then by how "
        "close the greedy answers to the fixed questions came to the author's held-out answers (mean distance over "
        "the style metrics, in author-generic gaps; the same judgement a run prints). Read the answers below before "
        "you trust the ranking: that is how the Handbook's authors picked their twin.",
        "",
        "| rank | run | held-out reward acc. | margin | voice moved (distance before -> after) | "
        + " | ".join(c[1] for c in STYLE_COLUMNS)
        + " | reference pass |",
        "|" + "---|" * (6 + len(STYLE_COLUMNS)),
    ]
    for rank, run in enumerate(ranked, 1):
        after = run.summary["eval_after"]
        style = (run.eval or {}).get("style", {}).get("after", {})
        ref = reference_status(run.summary)
        lines.append(
            f"| {rank} | {run.name} | {after['reward_accuracy']:.3f} | {after['reward_margin']:.3f} | "
            f"{voice_cell(run)} | "
            + " | ".join(fmt.format(style[k]) if k in style else "" for k, _, fmt in STYLE_COLUMNS)
            + f" | {ref} |"
        )
    lines += ["", "Style yardsticks:", "", *style_reference(ranked), "", "![learning curves](curves.png)", ""]
    lines += ["## Answers to the fixed questions", ""]
    for question in FIXED_QUESTIONS:
        lines += answers(ranked, question)
    lines.append(f"_Generated in {seconds:.0f} s by `python -m pipeline sweep`._")
    return "\n".join(lines) + "\n"


def twin_page(sft_run: Run, dpo_run: Run, memory: dict, seconds: float) -> str:
    s, d = sft_run.summary, dpo_run.summary
    sb, sa = s["eval_before"], s["eval_after"]
    db, da = d["eval_before"], d["eval_after"]
    style_rows = [
        "| answers of | " + " | ".join(c[1] for c in STYLE_COLUMNS) + " |",
        "|---|" + "---|" * len(STYLE_COLUMNS),
    ]
    for label, values in (
        ("the instruct model", (sft_run.eval or {}).get("style", {}).get("before")),
        ("the SFT twin", (dpo_run.eval or {}).get("style", {}).get("before")),
        ("the DPO twin", (dpo_run.eval or {}).get("style", {}).get("after")),
        ("the author (held-out answers)", (dpo_run.eval or {}).get("style", {}).get("author_reference")),
    ):
        if values:
            style_rows.append(f"| {label} | " + " | ".join(fmt.format(values[k]) for k, _, fmt in STYLE_COLUMNS) + " |")
    a, m = memory["adapter-copy"], memory["merged-copy"]
    exported = (
        read_json(dpo_run.folder / "export" / "export.json")
        if (dpo_run.folder / "export" / "export.json").is_file()
        else {}
    )
    lines = [
        "# The twin, end to end: SFT -> DPO on the twin adapter -> export",
        "",
        f"{s['device']}; {s['precision']}; {seconds / 60:.1f} minutes in all.",
        "",
        "## 1. SFT makes the twin",
        "",
        f"LoRA SFT of the instruct model on the author's {s['train_examples']} train answers: {s['steps']} steps in "
        f"{s['train_seconds']:.0f} s. Held-out loss on the author's {s['eval_examples']} unseen answers "
        f"**{sb['loss']:.3f} -> {sa['loss']:.3f}** (perplexity {sb['perplexity']:.2f} -> {sa['perplexity']:.2f}).",
        "",
        "## 2. DPO on the twin adapter",
        "",
        f"Reference: {d['reference']}. {d['steps']} steps, {d['pairs_trained']} pairs in {d['train_seconds']:.0f} s "
        f"({d['pairs_per_second']:.2f} pairs/s). Held-out reward accuracy **{db['reward_accuracy']:.3f} -> "
        f"{da['reward_accuracy']:.3f}**, margin {db['reward_margin']:.3f} -> {da['reward_margin']:.3f}, DPO loss "
        f"{db['loss']:.3f} -> {da['loss']:.3f}.",
        "",
        "Style of the greedy answers to the fixed questions:",
        "",
        *style_rows,
        "",
        "## 3. Memory: one base with two adapters vs a second full copy",
        "",
        f"Same data, {a['steps']} steps each, the reference run at every step (no precomputed log-probs), "
        f"peak memory as {a['peak_memory_kind']}:",
        "",
        "| reference held as | peak memory | s/step | parameters in memory |",
        "|---|---|---|---|",
        f"| frozen copy of the adapter on the shared base | {human_bytes(a['peak_memory_bytes'])} | "
        f"{a['train_seconds'] / max(1, a['steps']):.2f} | {a['total_parameters']:,} |",
        f"| adapter merged into a second full copy | {human_bytes(m['peak_memory_bytes'])} | "
        f"{m['train_seconds'] / max(1, m['steps']):.2f} | {m['total_parameters']:,} + a full copy |",
        "",
        f"The shared base saves {human_bytes(m['peak_memory_bytes'] - a['peak_memory_bytes'])} "
        f"({1 - a['peak_memory_bytes'] / m['peak_memory_bytes']:.0%}) here.",
        "",
        "## 4. Files",
        "",
        f"- SFT twin adapter: `{sft_run.folder / 'adapter'}`",
        f"- DPO twin adapter: `{dpo_run.folder / 'adapter'}`",
        *[
            f"- export: `{dpo_run.folder / 'export' / name}` ({size / 2**20:.1f} MB)"
            for name, size in exported.get("files", {}).items()
            if name.endswith((".gguf", ".safetensors")) or name == "Modelfile"
        ],
        f"- samples: `{sft_run.folder / 'samples.md'}`, `{dpo_run.folder / 'samples.md'}`",
    ]
    return "\n".join(lines) + "\n"


def gpu_smoke_page(rows: list[tuple[str, dict]]) -> str:
    """reports/gpu-smoke/report.md: one line per (method, backend) run."""
    table = [
        "| backend | method | s/step | tokens/s | peak VRAM (max allocated) | held-out reward acc. |",
        "|---|---|---|---|---|---|",
    ]
    for method, s in rows:
        table.append(
            f"| {s['backend']} | {method} | {s['train_seconds'] / max(1, s['steps']):.3f} | "
            f"{s['tokens_per_second']:.0f} | {human_bytes(s['peak_memory_bytes'])} | "
            f"{s['eval_after']['reward_accuracy']:.3f} |"
        )
    return "# GPU smoke test\n\n" + "\n".join(table) + "\n"
