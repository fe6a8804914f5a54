"""`python -m pipeline sweep RECIPE`: a grid of light DPO runs on one recipe, ranked by held-out reward
accuracy and by how the answers sound -> reports/sweep/."""

from __future__ import annotations

import itertools
import time
from pathlib import Path

from pipeline import recipe as recipes
from pipeline.errors import UserError
from pipeline.experiments import children, curves, report
from pipeline.storage import write_text_atomic

DEFAULT_GRID = ("train.learning_rate=1e-6,2e-6,5e-6", "train.beta=0.1,0.5")  # `make sweep` and --grid's default


def parse_grid(grid: list[str]) -> list[dict[str, str]]:
    axes = []
    keys = recipes.all_keys()
    for item in grid or list(DEFAULT_GRID):
        if "=" not in item:
            raise UserError(f"--grid {item}: expected key=v1,v2,..., such as --grid train.beta=0.1,0.5")
        key, values = item.split("=", 1)
        if key not in keys:
            hint = recipes.nearest(key, list(keys))
            raise UserError(
                f"--grid {key}: unknown recipe key" + (f"; did you mean {' or '.join(hint)}?" if hint else "")
            )
        axes.append([(key, v.strip()) for v in values.split(",") if v.strip()])
    return [dict(combo) for combo in itertools.product(*axes)]


def _label(point: dict[str, str]) -> str:
    return "-".join(f"{k.split('.')[-1]}{v}" for k, v in point.items()).replace("learning_rate", "lr")


def rank_key(run: report.Run):
    """Held-out reward accuracy first; then a flagged repetition rise last; then closest to the author's voice."""
    after = run.summary.get("eval_after") or {}
    voice = report.voice(run) or {}
    return (
        -round(after.get("reward_accuracy", 0.0), 3),
        voice.get("repetition_flagged", True),
        voice.get("mean_distance_after", float("inf")),
    )


def sweep(
    recipe_spec: str, grid: list[str], steps: int | None, overrides: list[str], out: Path = Path("reports/sweep")
) -> Path:
    points = parse_grid(grid)
    base = recipes.apply_overrides(recipes.load_recipe(recipe_spec), overrides)
    for point in points:  # every grid point must be a valid recipe before anything trains
        recipes.validate(recipes.apply_overrides(base, [f"{k}={v}" for k, v in point.items()]))
    out = children.fresh(out)
    start = time.perf_counter()
    done = []
    for n, point in enumerate(points, 1):
        label = _label(point)
        sets = overrides + [f"{k}={v}" for k, v in point.items()]
        children.run(
            [
                *children.PIPELINE,
                "train",
                recipe_spec,
                "--run-dir",
                str(out / "runs" / label),
                *children.flags(steps, sets),
            ],
            f"sweep run {n}/{len(points)} {label}",
        )
        done.append(report.load(out / "runs" / label, label))
    ranked = sorted(done, key=rank_key)
    curves.curves(ranked, out / "curves.png", f"sweep over {', '.join(points[0])}")
    write_text_atomic(out / "report.md", report.sweep_page(recipe_spec, ranked, time.perf_counter() - start))
    return out / "report.md"
