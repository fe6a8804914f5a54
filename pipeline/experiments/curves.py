"""Learning curves as a PNG: train loss, reward margin and reward accuracy per step, held-out points as markers."""

from __future__ import annotations

from pathlib import Path

from pipeline.experiments.report import Run


def curves(run_list: list[Run], path: Path, title: str) -> None:
    """Train loss, reward margin and reward accuracy against step; held-out points as markers, same colours."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = (
        ("loss", "eval_loss", "DPO loss"),
        ("rewards/margins", "eval_rewards/margins", "reward margin"),
        ("rewards/accuracies", "eval_rewards/accuracies", "reward accuracy"),
    )
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.8))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for run, color in zip(run_list, colors * 4, strict=False):  # colours repeat past 40 runs
        rows, evals = run.train_rows, run.eval_rows
        for ax, (key, eval_key, label) in zip(axes, panels, strict=True):
            xs = [r["step"] for r in rows if key in r]
            ys = [r[key] for r in rows if key in r]
            if ys:
                ax.plot(xs, _smooth(ys), color=color, lw=1.6, label=f"{run.name} (train)")
            ex = [r["step"] for r in evals if eval_key in r]
            if ex:
                ax.plot(
                    ex,
                    [r[eval_key] for r in evals if eval_key in r],
                    "o--",
                    color=color,
                    ms=6,
                    lw=0.8,
                    label=f"{run.name} (held-out)",
                )
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
        chunk = values[max(0, i - window + 1) : i + 1]
        out.append(sum(chunk) / len(chunk))
    return out
