"""Command line: argument parsing, exit codes, error printing; nothing else.

    python -m pipeline train RECIPE [--set key=value ...] [--max-steps N] [--run-dir DIR]

Exit status: 0 done, 2 the user's input is wrong (one line per problem on
stderr, nothing trained), 1 a bug (with its traceback).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from pipeline.errors import EXIT_USER, UserError


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="twin-dpo", description="DPO for a twin language model: LoRA, QLoRA or full, on CPU or one GPU.")
    sub = parser.add_subparsers(dest="command", required=True)

    train = sub.add_parser("train", help="train a recipe into a run folder")
    train.add_argument("recipe", help="recipe name (dpo_lora, dpo_qlora, dpo_full) or path to a recipe .py file")
    train.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                       help="override a recipe field, e.g. --set train.learning_rate=5e-6 (repeatable)")
    train.add_argument("--max-steps", type=int, default=None, metavar="N", help="stop after N optimizer steps")
    train.add_argument("--run-dir", default=None, metavar="DIR", help="write the run here instead of runs/<recipe>-<time>")

    export = sub.add_parser("export", help="export a run: adapter, merged weights, GGUF, Ollama Modelfile, with proofs")
    export.add_argument("run", nargs="?", default=None, help="run folder (default: the newest finished run in runs/)")
    export.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override export fields, e.g. --set export.formats=merged,gguf-f16")

    show = sub.add_parser("recipe", help="print a recipe, resolved with --set overrides, as JSON")
    show.add_argument("recipe")
    show.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    return parser


def _resolve(recipe_spec: str, overrides: list[str]):
    from pipeline import config

    recipe = config.load_recipe(recipe_spec)
    recipe = config.apply_overrides(recipe, overrides)
    return config.validate(recipe)


def _cmd_train(args) -> int:
    if args.max_steps is not None and args.max_steps < 1:
        raise UserError(f"--max-steps must be >= 1, got {args.max_steps}")
    recipe = _resolve(args.recipe, args.overrides)
    from pipeline import train

    summary, run_dir = train.train(recipe, args.run_dir, max_steps=args.max_steps)
    print(train.describe(summary, run_dir), flush=True)
    return 0


def _cmd_export(args) -> int:
    from pipeline import export

    report, folder = export.export(args.run, args.overrides)
    sizes = ", ".join(f"{name} {size / 2**20:.1f} MB" for name, size in report["files"].items()
                      if name.endswith((".gguf", ".safetensors")) or name == "Modelfile")
    print(f"export: {folder} in {report['seconds']:.0f} s ({sizes})", flush=True)
    return 0


def _cmd_recipe(args) -> int:
    from pipeline import config

    print(config.dumps(_resolve(args.recipe, args.overrides)), end="")
    return 0


COMMANDS = {"train": _cmd_train, "export": _cmd_export, "recipe": _cmd_recipe}


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        return COMMANDS[args.command](args)
    except UserError as err:
        for problem in err.problems:
            print(f"twin-dpo: error: {problem}", file=sys.stderr)
        return EXIT_USER
    except KeyboardInterrupt:
        print("twin-dpo: interrupted", file=sys.stderr)
        return 130


def entry() -> None:
    """Console script `twin-dpo`."""
    sys.exit(main())


if __name__ == "__main__":
    entry()
