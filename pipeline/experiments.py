"""The seeds' two experiments, one command each.

`compare`: LoRA, QLoRA and full DPO and the plain TRL baseline on the same
data, seed, batch and steps -> reports/compare/ (curves.png, report.md).
`sweep`: a grid of light DPO runs on one recipe, ranked by held-out reward
accuracy and by how the answers sound -> reports/sweep/.

Every run is its own process, so peak memory is measured the same way for
each (peak RSS on CPU, CUDA max allocated on GPU) and one run cannot inflate
another's. The reference log-probs cache (pipeline/reference.py) is shared:
after the first run of a model + data, later runs skip the reference pass.
"""

from __future__ import annotations

import itertools
import shutil
import subprocess
import sys
import time
from pathlib import Path

from pipeline import config as cfg
from pipeline import report, runs
from pipeline.errors import RunFailed, UserError

BASELINE = Path(__file__).resolve().parent.parent / "benchmarks" / "trl_baseline.py"
COMPARED = (("dpo-lora", "dpo_lora"), ("dpo-qlora", "dpo_qlora"), ("dpo-full", "dpo_full"))
DEFAULT_GRID = ("train.learning_rate=5e-6,1e-5,2e-5", "train.beta=0.1,0.5")


def _run(command: list[str], what: str) -> None:
    print(f"[twin-dpo] {what}: {' '.join(command[1:])}", flush=True)
    done = subprocess.run(command)
    if done.returncode != 0:
        raise RunFailed(f"{what} failed with exit status {done.returncode} (its output is above)")


def _flags(steps: int | None, overrides: list[str]) -> list[str]:
    out = ["--max-steps", str(steps)] if steps else []
    for o in overrides:
        out += ["--set", o]
    return out


def _fresh(folder: Path) -> Path:
    if folder.exists():
        print(f"[twin-dpo] replacing the previous {folder}", flush=True)
        shutil.rmtree(folder)
    (folder / "runs").mkdir(parents=True)
    return folder


def compare(steps: int | None, overrides: list[str], out: Path = Path("reports/compare")) -> Path:
    for recipe in (r for _, r in COMPARED):  # fail on a bad --set before any run starts
        cfg.validate(cfg.apply_overrides(cfg.load_recipe(recipe), overrides))
    if not BASELINE.is_file():
        raise UserError(f"compare needs the TRL baseline script {BASELINE}; run it from a twin-dpo checkout")
    out = _fresh(out)
    start = time.perf_counter()
    for name, recipe in COMPARED:
        _run([sys.executable, "-m", "pipeline", "train", recipe, "--run-dir", str(out / "runs" / name),
              *_flags(steps, overrides)], name)
    base_dir = out / "runs" / "trl-baseline"
    _run([sys.executable, str(BASELINE), "--run-dir", str(base_dir), *_flags(steps, overrides)], "trl-baseline")
    _run([sys.executable, "-m", "pipeline", "evaluate", str(base_dir)], "trl-baseline evaluate")
    loaded = [report.load(out / "runs" / name, name) for name, _ in COMPARED]
    baseline = report.load(base_dir, "trl-baseline")
    every = loaded + [baseline]
    report.curves(every, out / "curves.png", "LoRA vs QLoRA vs full DPO vs plain TRL")
    load_times = ", ".join(f"{r.name} {r.summary['load_seconds']:.0f} s" for r in every)
    memory_kind = every[0].summary.get("peak_memory_kind", "peak RSS")
    questions = len(every[0].eval["generations"]) if every[0].eval else 8
    lines = [
        "# LoRA, QLoRA and full DPO against the plain TRL baseline", "",
        f"Same data, seed, batch and steps for every run ({_describe(every[0])}); device: {every[0].summary['device']}. "
        f"Ratios are to the TRL baseline (benchmarks/trl_baseline.py: TRL's documented LoRA DPO with its defaults). "
        f"Train time excludes model loading ({load_times}) and held-out evaluation; it includes the reference pass. "
        f"Peak memory: {memory_kind} of each run's own process.", "",
        *report.cost_table(every, baseline), "",
        "Held-out reward accuracy and margin are on the held-out pairs after the last step (before training they are "
        f"0.000: the policy is the reference). Style columns measure each run's greedy answers to the {questions} "
        "fixed questions.", "",
        "Style yardsticks:", "", *report.style_reference(every), "",
        "![learning curves](curves.png)", "",
        "## Answers side by side", "", *report.answers(every),
        f"_Generated in {time.perf_counter() - start:.0f} s by `python -m pipeline compare`._",
    ]
    runs.write_text_atomic(out / "report.md", "\n".join(lines) + "\n")
    return out / "report.md"


def _describe(run: report.Run) -> str:
    s = run.summary
    return f"{s['steps']} steps of {s['pairs_trained'] // max(1, s['steps'])} pairs, {s['pairs_trained']} pairs"


def parse_grid(grid: list[str]) -> list[dict[str, str]]:
    axes = []
    keys = cfg.all_keys()
    for item in grid or list(DEFAULT_GRID):
        if "=" not in item:
            raise UserError(f"--grid {item}: expected key=v1,v2,..., such as --grid train.beta=0.1,0.5")
        key, values = item.split("=", 1)
        if key not in keys:
            hint = cfg.nearest(key, list(keys))
            raise UserError(f"--grid {key}: unknown recipe key" + (f"; did you mean {' or '.join(hint)}?" if hint else ""))
        axes.append([(key, v.strip()) for v in values.split(",") if v.strip()])
    return [dict(combo) for combo in itertools.product(*axes)]


def _label(point: dict[str, str]) -> str:
    return "-".join(f"{k.split('.')[-1]}{v}" for k, v in point.items()).replace("learning_rate", "lr")


def rank_key(run: report.Run):
    """Held-out reward accuracy first; then fewer stock phrases, more first person, less repetition."""
    after = run.summary.get("eval_after") or {}
    style = (run.eval or {}).get("style", {}).get("after", {})
    return (-round(after.get("reward_accuracy", 0.0), 3), style.get("stock_phrase_share", 1.0),
            -style.get("first_person_per_100_words", 0.0), style.get("repetition_rate", 1.0))


def sweep(recipe_spec: str, grid: list[str], steps: int | None, overrides: list[str],
          out: Path = Path("reports/sweep")) -> Path:
    points = parse_grid(grid)
    base = cfg.apply_overrides(cfg.load_recipe(recipe_spec), overrides)
    for point in points:  # every grid point must be a valid recipe before anything trains
        cfg.validate(cfg.apply_overrides(base, [f"{k}={v}" for k, v in point.items()]))
    out = _fresh(out)
    start = time.perf_counter()
    done = []
    for n, point in enumerate(points, 1):
        label = _label(point)
        sets = overrides + [f"{k}={v}" for k, v in point.items()]
        _run([sys.executable, "-m", "pipeline", "train", recipe_spec, "--run-dir", str(out / "runs" / label),
              *_flags(steps, sets)], f"sweep run {n}/{len(points)} {label}")
        done.append(report.load(out / "runs" / label, label))
    ranked = sorted(done, key=rank_key)
    report.curves(ranked, out / "curves.png", f"sweep over {', '.join(points[0])}")
    lines = [f"# Sweep of {recipe_spec}: {len(points)} runs", "",
             "Ranked by held-out reward accuracy, then by the voice of the greedy answers to the fixed questions: "
             "fewer answers with stock phrases, more first person, less repetition. Read the answers below before "
             "you trust the ranking: that is how the Handbook's authors picked their twin.", "",
             "| rank | run | held-out reward acc. | margin | " + " | ".join(c[1] for c in report.STYLE_COLUMNS)
             + " | reference pass |", "|" + "---|" * (5 + len(report.STYLE_COLUMNS))]
    for rank, run in enumerate(ranked, 1):
        after = run.summary["eval_after"]
        style = (run.eval or {}).get("style", {}).get("after", {})
        ref = report.reference_status(run.summary)
        lines.append(f"| {rank} | {run.name} | {after['reward_accuracy']:.3f} | {after['reward_margin']:.3f} | "
                     + " | ".join(fmt.format(style[k]) if k in style else "" for k, _, fmt in report.STYLE_COLUMNS)
                     + f" | {ref} |")
    lines += ["", "Style yardsticks:", "", *report.style_reference(ranked), "", "![learning curves](curves.png)", ""]
    from pipeline.questions import FIXED_QUESTIONS

    lines += ["## Answers to the fixed questions", ""]
    for question in FIXED_QUESTIONS:
        lines += report.answers(ranked, question)
    lines.append(f"_Generated in {time.perf_counter() - start:.0f} s by `python -m pipeline sweep`._")
    runs.write_text_atomic(out / "report.md", "\n".join(lines) + "\n")
    return out / "report.md"


def twin(steps: int | None, overrides: list[str], out: Path = Path("reports/twin"), memory_steps: int = 10,
         formats: str | None = None) -> Path:
    """SFT makes the twin -> DPO on the twin adapter -> export, then the memory of the two ways to hold the
    reference, measured on the same data and steps; one summary page."""
    for spec in ("sft_twin", "dpo_lora_twin"):
        cfg.validate(cfg.apply_overrides(cfg.load_recipe(spec), overrides))
    out = _fresh(out)
    start = time.perf_counter()
    py = [sys.executable, "-m", "pipeline"]
    sft_dir, dpo_dir = out / "runs" / "sft-twin", out / "runs" / "dpo-lora-twin"
    _run([*py, "sft", "sft_twin", "--run-dir", str(sft_dir), *_flags(steps, overrides)], "1/4 sft")
    _run([*py, "evaluate", str(sft_dir)], "1/4 sft evaluate")
    twin_sets = overrides + [f"model.adapter={sft_dir}"]
    _run([*py, "train", "dpo_lora_twin", "--run-dir", str(dpo_dir), *_flags(steps, twin_sets)], "2/4 dpo on the twin adapter")
    export_sets = ["--set", f"export.formats={formats}"] if formats else []
    _run([*py, "export", str(dpo_dir), *export_sets], "3/4 export")
    memory = {}
    for kind in ("adapter-copy", "merged-copy"):
        folder = out / "runs" / f"memory-{kind}"
        sets = twin_sets + [f"model.twin_reference={kind}", "train.precompute_ref=false", "train.eval_every=0"]
        _run([*py, "train", "dpo_lora_twin", "--run-dir", str(folder), "--no-eval", *_flags(memory_steps, sets)],
             f"4/4 memory, reference as {kind}")
        memory[kind] = runs.read_json(folder / "summary.json")
    page = twin_page(report.load(sft_dir, "sft-twin"), report.load(dpo_dir, "dpo-lora-twin"), memory, out,
                     time.perf_counter() - start)
    runs.write_text_atomic(out / "summary.md", page)
    return out / "summary.md"


def twin_page(sft_run: report.Run, dpo_run: report.Run, memory: dict, out: Path, seconds: float) -> str:
    s, d = sft_run.summary, dpo_run.summary
    sb, sa = s["eval_before"], s["eval_after"]
    db, da = d["eval_before"], d["eval_after"]
    style_rows = ["| answers of | " + " | ".join(c[1] for c in report.STYLE_COLUMNS) + " |",
                  "|---|" + "---|" * len(report.STYLE_COLUMNS)]
    for label, values in (("the instruct model", (sft_run.eval or {}).get("style", {}).get("before")),
                          ("the SFT twin", (dpo_run.eval or {}).get("style", {}).get("before")),
                          ("the DPO twin", (dpo_run.eval or {}).get("style", {}).get("after")),
                          ("the author (held-out answers)", (dpo_run.eval or {}).get("style", {}).get("author_reference"))):
        if values:
            style_rows.append(f"| {label} | " + " | ".join(fmt.format(values[k]) for k, _, fmt in report.STYLE_COLUMNS) + " |")
    a, m = memory["adapter-copy"], memory["merged-copy"]
    exported = runs.read_json(dpo_run.folder / "export" / "export.json") if (dpo_run.folder / "export" / "export.json").is_file() else {}
    lines = [
        "# The twin, end to end: SFT -> DPO on the twin adapter -> export", "",
        f"{s['device']}; {s['precision']}; {seconds / 60:.1f} minutes in all.", "",
        "## 1. SFT makes the twin", "",
        f"LoRA SFT of the instruct model on the author's {s['train_examples']} train answers: {s['steps']} steps in "
        f"{s['train_seconds']:.0f} s. Held-out loss on the author's {s['eval_examples']} unseen answers "
        f"**{sb['loss']:.3f} -> {sa['loss']:.3f}** (perplexity {sb['perplexity']:.2f} -> {sa['perplexity']:.2f}).", "",
        "## 2. DPO on the twin adapter", "",
        f"Reference: {d['reference']}. {d['steps']} steps, {d['pairs_trained']} pairs in {d['train_seconds']:.0f} s "
        f"({d['pairs_per_second']:.2f} pairs/s). Held-out reward accuracy **{db['reward_accuracy']:.3f} -> "
        f"{da['reward_accuracy']:.3f}**, margin {db['reward_margin']:.3f} -> {da['reward_margin']:.3f}, DPO loss "
        f"{db['loss']:.3f} -> {da['loss']:.3f}.", "",
        "Style of the greedy answers to the fixed questions:", "", *style_rows, "",
        "## 3. Memory: one base with two adapters vs a second full copy", "",
        f"Same data, {a['steps']} steps each, the reference run at every step (no precomputed log-probs), "
        f"peak memory as {a['peak_memory_kind']}:", "",
        "| reference held as | peak memory | s/step | parameters in memory |", "|---|---|---|---|",
        f"| frozen copy of the adapter on the shared base | {runs.human_bytes(a['peak_memory_bytes'])} | "
        f"{a['train_seconds'] / max(1, a['steps']):.2f} | {a['total_parameters']:,} |",
        f"| adapter merged into a second full copy | {runs.human_bytes(m['peak_memory_bytes'])} | "
        f"{m['train_seconds'] / max(1, m['steps']):.2f} | {m['total_parameters']:,} + a full copy |", "",
        f"The shared base saves {runs.human_bytes(m['peak_memory_bytes'] - a['peak_memory_bytes'])} "
        f"({1 - a['peak_memory_bytes'] / m['peak_memory_bytes']:.0%}) here.", "",
        "## 4. Files", "",
        f"- SFT twin adapter: `{sft_run.folder / 'adapter'}`",
        f"- DPO twin adapter: `{dpo_run.folder / 'adapter'}`",
        *[f"- export: `{dpo_run.folder / 'export' / name}` ({size / 2**20:.1f} MB)" for name, size in exported.get("files", {}).items()
          if name.endswith((".gguf", ".safetensors")) or name == "Modelfile"],
        f"- samples: `{sft_run.folder / 'samples.md'}`, `{dpo_run.folder / 'samples.md'}`",
    ]
    return "\n".join(lines) + "\n"


def gpu_smoke(steps: int = 30, overrides: list[str] | None = None, out: Path = Path("reports/gpu-smoke")) -> Path:
    """dpo-lora and dpo-qlora for `steps` steps with each backend (unsloth, hf) on one CUDA GPU: one table."""
    from pipeline import model as model_mod

    if not model_mod.cuda_available():
        raise UserError("gpu-smoke needs a CUDA GPU and none was found (torch.cuda.is_available() is False)")
    out = _fresh(out)
    rows = []
    for method in ("dpo_lora", "dpo_qlora"):
        for backend in ("unsloth", "hf"):
            folder = out / "runs" / f"{method}-{backend}"
            sets = (overrides or []) + [f"model.backend={backend}", "train.eval_every=0"]
            _run([sys.executable, "-m", "pipeline", "train", method, "--run-dir", str(folder), "--no-eval",
                  *_flags(steps, sets)], f"{method} on {backend}")
            s = runs.read_json(folder / "summary.json")
            rows.append(f"| {s['backend']} | {method} | {s['train_seconds'] / max(1, s['steps']):.3f} | "
                        f"{s['tokens_per_second']:.0f} | {runs.human_bytes(s['peak_memory_bytes'])} | "
                        f"{s['eval_after']['reward_accuracy']:.3f} |")
    table = ["| backend | method | s/step | tokens/s | peak VRAM (max allocated) | held-out reward acc. |",
             "|---|---|---|---|---|---|", *rows]
    runs.write_text_atomic(out / "report.md", "# GPU smoke test\n\n" + "\n".join(table) + "\n")
    return out / "report.md"
