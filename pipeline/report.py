"""Reports from run folders: learning curves (PNG), cost tables with ratios, answers side by side.

Reads only what runs wrote (summary.json, metrics.jsonl, eval.json), so any
set of run folders can be compared.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline import runs

SFT_QUESTION = "Write a paragraph to introduce supervised fine-tuning."
STYLE_COLUMNS = (("words_per_answer", "words/answer", "{:.0f}"), ("words_per_sentence", "words/sentence", "{:.1f}"),
                 ("stock_phrase_share", "stock-phrase share", "{:.2f}"),
                 ("first_person_per_100_words", "first person /100 words", "{:.1f}"),
                 ("repetition_rate", "repetition", "{:.2f}"))


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
    summary = runs.read_json(folder / "summary.json")
    ev = runs.read_json(folder / "eval.json") if (folder / "eval.json").is_file() else None
    return Run(name or summary.get("recipe", folder.name), folder, summary, runs.read_metrics(folder), ev)


def dir_size(path: Path) -> int:
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())


def artifact_size(run: Run) -> int:
    return dir_size(run.folder / run.summary.get("artifact", "adapter"))


def curves(run_list: list[Run], path: Path, title: str) -> None:
    """Train loss, reward margin and reward accuracy against step; held-out points as markers, same colours."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = (("loss", "eval_loss", "DPO loss"), ("rewards/margins", "eval_rewards/margins", "reward margin"),
              ("rewards/accuracies", "eval_rewards/accuracies", "reward accuracy"))
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.8))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for run, color in zip(run_list, colors * 4):
        rows, evals = run.train_rows, run.eval_rows
        for ax, (key, eval_key, label) in zip(axes, panels):
            xs = [r["step"] for r in rows if key in r]
            ys = [r[key] for r in rows if key in r]
            if ys:
                ax.plot(xs, _smooth(ys), color=color, lw=1.6, label=f"{run.name} (train)")
            ex = [r["step"] for r in evals if eval_key in r]
            if ex:
                ax.plot(ex, [r[eval_key] for r in evals if eval_key in r], "o--", color=color, ms=6, lw=0.8,
                        label=f"{run.name} (held-out)")
            ax.set_title(label, fontsize=12)
            ax.set_xlabel("optimizer step")
            ax.grid(alpha=0.3)
    axes[2].set_ylim(-0.05, 1.05)
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=min(4, len(labels)), fontsize=9, frameon=False)
    fig.suptitle(title + "  (lines: training, smoothed over 5 steps; markers: held-out pairs)", fontsize=12)
    fig.tight_layout(rect=(0, 0.12, 1, 0.95))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _smooth(values: list[float], window: int = 5) -> list[float]:
    out = []
    for i in range(len(values)):
        chunk = values[max(0, i - window + 1): i + 1]
        out.append(sum(chunk) / len(chunk))
    return out


def _ratio(value: float | None, base: float | None) -> str:
    if value is None or not base:
        return ""
    return f" ({value / base:.2f}x)"


def cost_table(run_list: list[Run], baseline: Run | None) -> list[str]:
    """Markdown rows: every figure, and its ratio to the baseline's."""
    head = ["run", "reference pass", "train time (s)", "pairs/s", "tokens/s", "peak memory", "trainable params", "artifact",
            "held-out reward acc.", "held-out margin"] + [c[1] for c in STYLE_COLUMNS]
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
            f"{runs.human_bytes(s['peak_memory_bytes'])}{_ratio(s['peak_memory_bytes'], base_s.get('peak_memory_bytes'))}",
            f"{s['trainable_parameters']:,}{_ratio(s['trainable_parameters'], base_s.get('trainable_parameters'))}",
            f"{runs.human_bytes(artifact_size(run))}{_ratio(artifact_size(run), artifact_size(b) if b else None)}",
            f"{after.get('reward_accuracy', float('nan')):.3f}{_ratio(after.get('reward_accuracy'), base_after.get('reward_accuracy'))}",
            f"{after.get('reward_margin', float('nan')):.3f}{_ratio(after.get('reward_margin'), base_after.get('reward_margin'))}",
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


def answers(run_list: list[Run], question: str = SFT_QUESTION) -> list[str]:
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
    for label, key in (("untouched twin", "before"), ("author's held-out answers", "author_reference"),
                       ("generic held-out answers", "generic_reference")):
        values = ev["style"][key]
        rows.append(f"| {label} | " + " | ".join(fmt.format(values[k]) for k, _, fmt in STYLE_COLUMNS) + " |")
    return rows
