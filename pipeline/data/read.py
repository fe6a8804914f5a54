"""Reading preference rows with their location ("file:line 12") from files, the Hub or the embedded set."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pipeline.errors import UserError
from pipeline.storage import looks_like_hub_id

ASSETS = Path(__file__).parent / "assets"
EMBEDDED = {
    "embedded:train": ASSETS / "preferences_train.jsonl",
    "embedded:heldout": ASSETS / "preferences_heldout.jsonl",
}
MAX_LISTED = 5  # problems listed per file before "... and N more"


def cap(problems: list[str]) -> list[str]:
    if len(problems) <= MAX_LISTED:
        return problems
    return problems[:MAX_LISTED] + [f"... and {len(problems) - MAX_LISTED} more rows with problems"]


def _text(path: Path) -> str:
    """The file as text; a file that is not UTF-8 is one line naming the byte where decoding stopped."""
    raw = path.read_bytes()
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise UserError(
            f"{path}: not UTF-8 text (byte 0x{raw[err.start]:02x} at offset {err.start}); save it as UTF-8 JSON lines"
        ) from None


def _read_jsonl(path: Path) -> list[tuple[str, Any]]:
    rows = []
    problems = []
    for number, line in enumerate(_text(path).split("\n"), start=1):
        if not line.strip():
            continue
        try:
            rows.append((f"{path}:line {number}", json.loads(line)))
        except json.JSONDecodeError as err:
            problems.append(
                f"{path}:line {number}: not valid JSON ({err.msg} at column {err.colno}); fix or delete the line"
            )
    if problems:
        raise UserError(cap(problems))
    return rows


def _read_json(path: Path) -> list[tuple[str, Any]]:
    try:
        data = json.loads(_text(path))
    except json.JSONDecodeError as err:
        raise UserError(f"{path}: not valid JSON ({err.msg} at line {err.lineno}, column {err.colno})") from None
    if isinstance(data, dict):
        lists = [v for v in data.values() if isinstance(v, list)]
        if len(lists) != 1:
            raise UserError(
                f"{path}: expected a JSON list of rows (or an object holding one list), got an object with keys "
                f"{list(data)[:5]}"
            )
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
    raise UserError(
        f"{key}: dataset file {source} does not exist; check the path (relative paths start at {Path.cwd()})"
    )
