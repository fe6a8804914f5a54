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

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.errors import UserError

ASSETS = Path(__file__).parent / "assets"
EMBEDDED = {
    "embedded:train": ASSETS / "preferences_train.jsonl",
    "embedded:heldout": ASSETS / "preferences_heldout.jsonl",
}
ROLES = ("system", "user", "assistant")
MAX_LISTED = 5  # problems listed per file before "... and N more"


@dataclass(frozen=True)
class Pair:
    prompt: tuple[tuple[str, str], ...]  # (role, content) turns ending with a user turn
    chosen: str
    rejected: str
    where: str  # "file:line 12" for messages


# ------------------------------------------------------------------ reading


def _read_jsonl(path: Path) -> list[tuple[str, Any]]:
    rows = []
    problems = []
    with path.open(encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                rows.append((f"{path}:line {number}", json.loads(line)))
            except json.JSONDecodeError as err:
                problems.append(f"{path}:line {number}: not valid JSON ({err.msg} at column {err.colno}); fix or delete the line")
    if problems:
        raise UserError(_cap(problems))
    return rows


def _read_json(path: Path) -> list[tuple[str, Any]]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise UserError(f"{path}: not valid JSON ({err.msg} at line {err.lineno}, column {err.colno})") from None
    if isinstance(data, dict):
        lists = [v for v in data.values() if isinstance(v, list)]
        if len(lists) != 1:
            raise UserError(f"{path}: expected a JSON list of rows (or an object holding one list), got an object with keys {list(data)[:5]}")
        data = lists[0]
    if not isinstance(data, list):
        raise UserError(f"{path}: expected a JSON list of rows, got {type(data).__name__}")
    return [(f"{path}:row {i}", row) for i, row in enumerate(data, start=1)]


def _read_table(path: Path, kind: str) -> list[tuple[str, Any]]:
    from datasets import load_dataset

    try:
        table = load_dataset(kind, data_files=str(path), split="train")
    except Exception as err:  # malformed CSV/Parquet: name the file and the parser's reason
        raise UserError(f"{path}: cannot read as {kind.upper()}: {str(err).splitlines()[0]}") from None
    # CSV row N is file line N+1 (header on line 1)
    label = "line" if kind == "csv" else "row"
    offset = 2 if kind == "csv" else 1
    return [(f"{path}:{label} {i + offset}", row) for i, row in enumerate(table)]


def _read_hub(name: str, split: str, key: str) -> list[tuple[str, Any]]:
    from datasets import load_dataset

    try:
        table = load_dataset(name, split=split)
    except Exception as err:
        raise UserError(
            f"{key}: cannot load '{name}' (split '{split}') from the Hugging Face Hub: {str(err).splitlines()[0]}; "
            "check the name and split, your network, or give a local file"
        ) from None
    return [(f"{name}[{split}]:row {i}", row) for i, row in enumerate(table, start=1)]


def looks_like_hub_id(text: str) -> bool:
    parts = text.split("/")
    return len(parts) == 2 and all(parts) and not text.startswith((".", "/", "~")) and "." not in parts[0]


def read_rows(source: str, split: str, key: str) -> list[tuple[str, Any]]:
    """Raw rows with their location, from a file, a Hub id or the embedded set. `key` names the recipe field."""
    if source in EMBEDDED:
        return _read_jsonl(EMBEDDED[source])
    if source.startswith("embedded:"):
        raise UserError(f"{key}: unknown embedded dataset '{source}'; use one of {', '.join(EMBEDDED)}")
    path = Path(source).expanduser()
    if path.exists():
        if path.is_dir():
            raise UserError(f"{key}: {source} is a folder; give a .jsonl, .json, .csv or .parquet file")
        suffix = path.suffix.lower()
        if suffix == ".jsonl":
            return _read_jsonl(path)
        if suffix == ".json":
            return _read_json(path)
        if suffix in (".csv", ".parquet"):
            return _read_table(path, suffix[1:])
        raise UserError(f"{key}: {source}: unsupported file type '{suffix}'; use .jsonl, .json, .csv or .parquet")
    if looks_like_hub_id(source):
        return _read_hub(source, split, key)
    raise UserError(f"{key}: dataset file {source} does not exist; check the path (relative paths start at {Path.cwd()})")


# ------------------------------------------------------------------ validation


def _cap(problems: list[str]) -> list[str]:
    if len(problems) <= MAX_LISTED:
        return problems
    return problems[:MAX_LISTED] + [f"... and {len(problems) - MAX_LISTED} more rows with problems"]


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
            problems.append(f"{where}: field '{name}' turn {i}: role must be one of {', '.join(ROLES)}, got {turn['role']!r}")
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
        if chosen_turns[:-1] != rejected_turns[:-1] or chosen_turns[-1][0] != "assistant" or rejected_turns[-1][0] != "assistant":
            problems.append(f"{where}: 'chosen' and 'rejected' conversations must share every turn but a last assistant turn")
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
        raise UserError(_cap(problems))
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
    import random

    order = list(range(len(train)))
    random.Random(0).shuffle(order)
    n_eval = max(1, round(len(train) * data.eval_fraction))
    if len(train) - n_eval < 1:
        raise UserError(f"data.train: {data.train} has {len(train)} rows, too few to hold out {data.eval_fraction:.0%}; give data.eval")
    held = set(order[:n_eval])
    return [p for i, p in enumerate(train) if i not in held], [p for i, p in enumerate(train) if i in held]


# ------------------------------------------------------------------ chat template


def messages(pair: Pair, system_prompt: str | None) -> list[dict[str, str]]:
    turns = [{"role": role, "content": content} for role, content in pair.prompt]
    if system_prompt is not None and turns[0]["role"] != "system":
        turns.insert(0, {"role": "system", "content": system_prompt})
    return turns


def render_prompt(tokenizer, pair: Pair, system_prompt: str | None) -> str:
    return tokenizer.apply_chat_template(messages(pair, system_prompt), tokenize=False, add_generation_prompt=True)


def templated(tokenizer, pairs: list[Pair], system_prompt: str | None) -> list[dict[str, str]]:
    """Rows TRL can read: the prompt rendered with the chat template; TRL appends EOS to each answer."""
    if not getattr(tokenizer, "chat_template", None):
        raise UserError("the model's tokenizer has no chat template; use a chat (instruct) model or add chat_template.jinja to its folder")
    return [
        {"prompt": render_prompt(tokenizer, p, system_prompt), "chosen": p.chosen, "rejected": p.rejected}
        for p in pairs
    ]


@dataclass
class LengthReport:
    pairs: int
    truncated: int  # pairs whose prompt + answer is cut at max_length
    longest: int  # tokens in the longest prompt + answer
    mean_tokens: float  # mean tokens per sequence (prompt + answer + EOS), chosen and rejected together
    lengths: list[int]  # per pair: tokens of the longer of its two sequences (what a batch pads to)


def check_lengths(tokenizer, rows: list[dict[str, str]], pairs: list[Pair], max_length: int, key: str) -> LengthReport:
    """Fail on prompts that leave no room for an answer; count answers that will be cut."""
    too_long = []
    truncated = 0
    longest = 0
    total = 0
    per_pair = []
    for row, pair in zip(rows, pairs):
        prompt_len = len(tokenizer(row["prompt"])["input_ids"])
        answer_lens = [len(tokenizer(row[side])["input_ids"]) + 1 for side in ("chosen", "rejected")]  # +1: EOS
        if prompt_len >= max_length:
            too_long.append((prompt_len, pair.where))
        full = [prompt_len + a for a in answer_lens]
        truncated += any(f > max_length for f in full)
        longest = max(longest, *full)
        total += sum(min(f, max_length) for f in full)
        per_pair.append(min(max(full), max_length))
    if too_long:
        worst = max(too_long)
        raise UserError(
            f"{key}: {len(too_long)} rows have prompts of {max_length} tokens or more after the chat template "
            f"(longest: {worst[1]}, {worst[0]} tokens), leaving no room for an answer; "
            f"raise data.max_length (now {max_length}) or shorten or remove those rows"
        )
    return LengthReport(len(rows), truncated, longest, total / (2 * len(rows)), per_pair)


def grouped_order(lengths: list[int], batch: int, seed: int, group: int = 50) -> list[int]:
    """A training order whose consecutive `batch`-sized runs have similar lengths.

    Shuffle, cut into groups of `group` batches, sort each group by length, split into batches, and shuffle
    the batches: random like a plain shuffle at the scale of the dataset, but a batch pads to a similar length.
    """
    import random

    rng = random.Random(seed)
    order = list(range(len(lengths)))
    rng.shuffle(order)
    batches = []
    for start in range(0, len(order), group * batch):
        chunk = sorted(order[start:start + group * batch], key=lambda i: lengths[i], reverse=True)
        batches.extend(chunk[k:k + batch] for k in range(0, len(chunk), batch))
    full = [b for b in batches if len(b) == batch]
    rng.shuffle(full)  # a short batch stays last, so the loader's batches line up with these
    return [i for b in full + [b for b in batches if len(b) < batch] for i in b]
