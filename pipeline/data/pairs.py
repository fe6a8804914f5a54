"""Preference data: load a file, recognise its shape once, validate every row, split off held-out pairs.

The shapes read (pipeline/data/formats.py): TRL's prompt / chosen / rejected (strings or turns, UltraFeedback-
binarized's whole conversations included), chosen / rejected conversations with an implicit prompt, Anthropic
HH-RLHF transcripts, OpenAI / Azure DPO fine-tuning JSONL, and orca_dpo_pairs columns. Everything becomes
(prompt turns, chosen text, rejected text) and is then rendered with the tokenizer's chat template
(pipeline/data/template.py), so TRL sees plain strings.
"""

from __future__ import annotations

import random
from typing import Any

from pipeline.data.formats import ROLES, SHAPES, Pair, shape_of, unknown
from pipeline.data.read import cap, read_rows
from pipeline.errors import UserError

__all__ = ["ROLES", "Pair", "load_pairs", "load_splits", "parse_pairs"]


def parse_pairs(rows: list[tuple[str, Any]], source: str, key: str, announce: bool = False) -> list[Pair]:
    """Validate all rows; one UserError lists every broken row (up to MAX_LISTED) with its location.

    The first row decides the file's shape; a later row of another shape is an error naming its line, and a
    file whose first row has no known shape is one line saying what it holds and what is read."""
    if not rows:
        raise UserError(f"{key}: {source} has no rows")
    kind = shape_of(rows[0][1])
    if kind is None:
        raise unknown(f"{key}: {source}", rows[0][1])
    shape = SHAPES[kind]
    problems: list[str] = []
    pairs = []
    for where, row in rows:
        other = shape_of(row)
        if not isinstance(row, dict):
            problems.append(f"{where}: expected an object like the file's first row, got {type(row).__name__}")
        elif other is not None and other != kind:
            problems.append(
                f"{where}: this row is {SHAPES[other].name}, but the file's first row is {shape.name}; "
                "keep one format per file"
            )
        elif (pair := shape.parse(where, row, problems)) is not None:
            pairs.append(pair)
    if problems:
        raise UserError(cap(problems))
    if announce:
        print(f"[twin-dpo] {key}: {source}: {len(pairs)} pairs, read as {shape.name}", flush=True)
    return pairs


def load_pairs(source: str, split: str, key: str, announce: bool = False) -> list[Pair]:
    return parse_pairs(read_rows(source, split, key), source, key, announce)


def load_splits(data, announce: bool = False) -> tuple[list[Pair], list[Pair]]:
    """(train, eval) pairs for a DataConfig; eval is carved from train when data.eval is None."""
    train = load_pairs(data.train, data.train_split, "data.train", announce)
    if data.eval is not None:
        return train, load_pairs(data.eval, data.eval_split, "data.eval", announce)
    order = list(range(len(train)))
    random.Random(0).shuffle(order)
    n_eval = max(1, round(len(train) * data.eval_fraction))
    if len(train) - n_eval < 1:
        raise UserError(
            f"data.train: {data.train} has {len(train)} rows, too few to hold out {data.eval_fraction:.0%}; give "
            "data.eval"
        )
    held = set(order[:n_eval])
    return [p for i, p in enumerate(train) if i not in held], [p for i, p in enumerate(train) if i in held]
