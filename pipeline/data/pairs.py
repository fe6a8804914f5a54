"""Preference data: load, validate every row, apply the chat template.

Accepted rows (JSONL/JSON/CSV/Parquet files, Hub datasets, the embedded set):
- standard: {"prompt": str, "chosen": str, "rejected": str}
- conversational (TRL's format): "prompt" (or "messages") is a list of
  {"role", "content"} turns; "chosen"/"rejected" are strings or lists with one
  assistant turn; or no prompt and "chosen"/"rejected" are whole conversations
  that share every turn but the last.

Everything is normalised to (prompt turns, chosen text, rejected text) and then
rendered with the tokenizer's chat template, so TRL sees plain strings.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any

from pipeline.data.read import cap, read_rows
from pipeline.errors import UserError

ROLES = ("system", "user", "assistant")


@dataclass(frozen=True)
class Pair:
    prompt: tuple[tuple[str, str], ...]  # (role, content) turns ending with a user turn
    chosen: str
    rejected: str
    where: str  # "file:line 12" for messages


def _turns(value: Any, where: str, name: str, problems: list[str]) -> list[tuple[str, str]] | None:
    if not isinstance(value, list) or not value:
        problems.append(f"{where}: field '{name}' must be a non-empty list of {{role, content}} turns")
        return None
    turns = []
    for i, turn in enumerate(value):
        if not isinstance(turn, dict) or "role" not in turn or "content" not in turn:
            problems.append(f"{where}: field '{name}' turn {i}: must be an object with 'role' and 'content'")
            return None
        if turn["role"] not in ROLES:
            problems.append(
                f"{where}: field '{name}' turn {i}: role must be one of {', '.join(ROLES)}, got {turn['role']!r}"
            )
            return None
        if not isinstance(turn["content"], str):
            problems.append(f"{where}: field '{name}' turn {i}: content must be a string")
            return None
        turns.append((turn["role"], turn["content"]))
    return turns


def _answer(value: Any, where: str, name: str, problems: list[str]) -> str | None:
    """A chosen/rejected answer: a string, or a list with one assistant turn."""
    if value is None:
        problems.append(f"{where}: field '{name}' is missing; every row needs prompt, chosen and rejected")
        return None
    if isinstance(value, list):
        turns = _turns(value, where, name, problems)
        if turns is None:
            return None
        if len(turns) != 1 or turns[0][0] != "assistant":
            problems.append(f"{where}: field '{name}' must hold exactly one assistant turn when 'prompt' is given")
            return None
        value = turns[0][1]
    if not isinstance(value, str):
        problems.append(f"{where}: field '{name}' must be a string, got {type(value).__name__}")
        return None
    if not value.strip():
        problems.append(f"{where}: field '{name}' is empty; remove the row or write the answer")
        return None
    return value


def _pair(where: str, row: Any, problems: list[str]) -> Pair | None:
    if not isinstance(row, dict):
        problems.append(f"{where}: expected an object with prompt, chosen and rejected, got {type(row).__name__}")
        return None
    before = len(problems)
    prompt_value = row.get("prompt", row.get("messages"))
    if prompt_value is None and isinstance(row.get("chosen"), list) and isinstance(row.get("rejected"), list):
        # implicit prompt: whole conversations that differ only in the last (assistant) turn
        chosen_turns = _turns(row["chosen"], where, "chosen", problems)
        rejected_turns = _turns(row["rejected"], where, "rejected", problems)
        if chosen_turns is None or rejected_turns is None:
            return None
        if (
            chosen_turns[:-1] != rejected_turns[:-1]
            or chosen_turns[-1][0] != "assistant"
            or rejected_turns[-1][0] != "assistant"
        ):
            problems.append(
                f"{where}: 'chosen' and 'rejected' conversations must share every turn but a last assistant turn"
            )
            return None
        prompt, chosen, rejected = chosen_turns[:-1], chosen_turns[-1][1], rejected_turns[-1][1]
        if not prompt:
            problems.append(f"{where}: the conversations have no prompt turns before the answer")
            return None
    else:
        if prompt_value is None:
            problems.append(f"{where}: field 'prompt' is missing; every row needs prompt, chosen and rejected")
            prompt = None
        elif isinstance(prompt_value, str):
            prompt = [("user", prompt_value)] if prompt_value.strip() else None
            if prompt is None:
                problems.append(f"{where}: field 'prompt' is empty")
        else:
            prompt = _turns(prompt_value, where, "prompt", problems)
        chosen = _answer(row.get("chosen"), where, "chosen", problems)
        rejected = _answer(row.get("rejected"), where, "rejected", problems)
    if len(problems) > before or prompt is None:
        return None
    if not chosen.strip() or not rejected.strip():
        field_name = "chosen" if not chosen.strip() else "rejected"
        problems.append(f"{where}: field '{field_name}' is empty; remove the row or write the answer")
        return None
    if prompt[-1][0] != "user":
        problems.append(f"{where}: the prompt must end with a user turn, it ends with {prompt[-1][0]!r}")
        return None
    return Pair(tuple(prompt), chosen, rejected, where)


def parse_pairs(rows: list[tuple[str, Any]], source: str, key: str) -> list[Pair]:
    """Validate all rows; one UserError lists every broken row (up to MAX_LISTED) with its location."""
    problems: list[str] = []
    pairs = [p for where, row in rows if (p := _pair(where, row, problems)) is not None]
    if problems:
        raise UserError(cap(problems))
    if not pairs:
        raise UserError(f"{key}: {source} has no rows")
    return pairs


def load_pairs(source: str, split: str, key: str) -> list[Pair]:
    return parse_pairs(read_rows(source, split, key), source, key)


def load_splits(data) -> tuple[list[Pair], list[Pair]]:
    """(train, eval) pairs for a DataConfig; eval is carved from train when data.eval is None."""
    train = load_pairs(data.train, data.train_split, "data.train")
    if data.eval is not None:
        return train, load_pairs(data.eval, data.eval_split, "data.eval")
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
