"""What DPO and SFT do before training: set up the process, check everything before a weight is loaded,
say what will run where, then load the model."""

from __future__ import annotations

import importlib.util
import json
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from pipeline import data as data_mod
from pipeline import recipe as recipes
from pipeline.errors import UserError
from pipeline.model import adapters, hf, paths, runtime, unsloth
from pipeline.model.backend import Backend, precision, resolve_backend
from pipeline.recipe import Recipe
from pipeline.training import compiled, distributed, twin
from pipeline.training.run import Run


def with_max_steps(recipe: Recipe, max_steps: int | None) -> Recipe:
    return recipe if max_steps is None else replace(recipe, train=replace(recipe.train, max_steps=max_steps))


def begin(recipe: Recipe) -> str:
    """Set up the process before any library is imported; returns the allocator setting for the summary."""
    if resolve_backend(recipe).name == "unsloth":
        unsloth.import_unsloth()  # before transformers, trl and peft: Unsloth patches them on import
    allocator = runtime.tune_allocator()
    runtime.quiet_libraries()
    distributed.start()  # under accelerate's launcher: join the process group, quiet the other ranks
    return allocator


TRACKERS = {"tensorboard": "tensorboard", "trackio": "trackio", "wandb": "wandb", "mlflow": "mlflow"}


def check_tracker(name: str) -> None:
    """train.report_to names a tracker whose package is importable (before any weight is loaded)."""
    module = TRACKERS.get(name)
    if module and importlib.util.find_spec(module) is None:
        how = "pip install -e '.[track]'" if name == "tensorboard" else f"pip install {module}"
        raise UserError(
            f"train.report_to={name}: the {module} package is not installed; install it into this environment "
            f"({sys.prefix}) with `{how}`, or set train.report_to=none"
        )


@dataclass
class Prepared:
    """Everything checked before a model weight is loaded."""

    recipe: Recipe
    backend: Backend
    path: str
    tokenizer: Any
    train_rows: list[dict[str, str]]
    eval_rows: list[dict[str, str]]
    lengths: data_mod.LengthReport
    train_pairs: list[data_mod.Pair]  # the validated pairs in file order (SFT trains on these)
    eval_pairs: list[data_mod.Pair]


def prepare(recipe: Recipe) -> Prepared:
    """Validate recipe, data and model location, and load the tokenizer; no model weights yet."""
    recipes.validate(recipe)
    check_tracker(recipe.train.report_to)
    backend = resolve_backend(recipe)
    problems = distributed.check(recipe, backend.name)
    if problems:
        raise UserError(problems)
    compiled.check(recipe, backend.device)
    train_pairs, eval_pairs = data_mod.load_splits(recipe.data, announce=True)
    if recipe.model.name_or_path.startswith(twin.PREFIX):
        # build the twin once (or find it), and pin the folder it means now, so recipe.json names the same weights
        folder = str(twin.model_dir(recipe.model.name_or_path))
        recipe = replace(recipe, model=replace(recipe.model, name_or_path=folder))
    path = paths.resolve_model_path(recipe.model.name_or_path, recipe.model.allow_pickle_weights)
    if recipe.model.adapter:
        adapter_dir = adapters.resolve(recipe.model.adapter)
        if (Path(path) / "config.json").is_file():
            adapters.check_fits(adapter_dir, json.loads((Path(path) / "config.json").read_text()), path)
        # pin `runs:<recipe>` to the folder it means now, so recipe.json always names the same twin
        recipe = replace(recipe, model=replace(recipe.model, adapter=str(adapter_dir.resolve())))
    tokenizer = hf.load_tokenizer(recipe, path)
    system = recipe.data.system_prompt
    train_rows = data_mod.templated(tokenizer, train_pairs, system)
    eval_rows = data_mod.templated(tokenizer, eval_pairs, system)
    lengths = data_mod.check_lengths(tokenizer, train_rows, train_pairs, recipe.data.max_length, "data.train")
    eval_lengths = data_mod.check_lengths(tokenizer, eval_rows, eval_pairs, recipe.data.max_length, "data.eval")
    t = recipe.train
    if t.group_by_length:  # training reads rows in this order (sequential sampler)
        # grouped by the batch of all processes: accelerate deals each global batch out, batch_size pairs per rank
        train_order = data_mod.grouped_order(lengths.lengths, t.batch_size * distributed.world_size(), t.seed)
    else:
        train_order = list(range(len(train_rows)))  # the trainer's random sampler shuffles
    # evaluation reads rows sorted by length, in the same batches as the reference pass
    eval_order = sorted(range(len(eval_rows)), key=lambda i: eval_lengths.lengths[i])
    return Prepared(
        recipe,
        backend,
        path,
        tokenizer,
        [train_rows[i] for i in train_order],
        [eval_rows[i] for i in eval_order],
        lengths,
        train_pairs,
        eval_pairs,
    )


def announce(prep: Prepared, run: Run) -> None:
    recipe, backend = prep.recipe, prep.backend
    resuming = f", resuming from {run.checkpoint.name}" if run.checkpoint else ""
    print(f"[twin-dpo] {recipe.name}: run folder {run.path}{resuming}", flush=True)
    threads = runtime.set_threads(recipe.train.threads)
    print(
        f"[twin-dpo] backend: {backend.name} ({backend.reason}); device: {runtime.device_name(backend.device)}; "
        f"{precision(recipe, backend.device).describe()}; threads: {threads}",
        flush=True,
    )
    if prep.lengths.truncated:
        print(
            f"[twin-dpo] note: {prep.lengths.truncated} of {prep.lengths.pairs} train pairs are longer than "
            f"data.max_length={recipe.data.max_length} and will be cut",
            flush=True,
        )


def load_model(prep: Prepared, run: Run):
    """The model for the prepared recipe; the load time goes into the run's timings."""
    start = time.perf_counter()
    loaded = hf.load(prep.recipe, prep.backend, tokenizer=prep.tokenizer)
    run.timings["load_seconds"] = time.perf_counter() - start
    return loaded
