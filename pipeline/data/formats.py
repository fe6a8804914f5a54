"""The preference-file shapes twin-dpo reads, how a file's shape is recognised, and how each becomes pairs.

A file holds one shape; its first row decides which, and every later row must have the same one. Each shape
is normalised to the same (prompt turns, chosen text, rejected text), so the rest of the pipeline sees one form.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Callable

from pipeline.errors import UserError

ROLES = ("system", "user", "assistant")
_SPEAKER = re.compile(r"(?:^|\n\n)(Human|Assistant):[ ]?")  # Anthropic HH-RLHF transcripts


@dataclass(frozen=True)
class Pair:
    prompt: tuple[tuple[str, str], ...]  # (role, content) turns ending with a user turn
    chosen: str
    rejected: str
    where: str  # "file:line 12" for messages


Turns = list[tuple[str, str]]


# ------------------------------------------------------------------ pieces of a row


def _turns(value: Any, where: str, name: str, problems: list[str]) -> Turns | None:
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


def _text(value: Any, where: str, name: str, problems: list[str]) -> str | None:
    if value is None:
        problems.append(f"{where}: field '{name}' is missing; every row needs prompt, chosen and rejected")
        return None
    if not isinstance(value, str):
        problems.append(f"{where}: field '{name}' must be a string, got {type(value).__name__}")
        return None
    if not value.strip():
        problems.append(f"{where}: field '{name}' is empty; remove the row or write the answer")
        return None
    return value


def _answer(value: Any, prompt: Turns, where: str, name: str, problems: list[str]) -> str | None:
    """A chosen/rejected answer: a string, a list with one assistant turn, or a whole conversation that repeats
    the prompt and ends with the answer (UltraFeedback-binarized)."""
    if isinstance(value, list):
        turns = _turns(value, where, name, problems)
        if turns is None:
            return None
        if len(turns) > 1 and turns[-1][0] == "assistant":
            if turns[:-1] != prompt:
                problems.append(
                    f"{where}: field '{name}' is a conversation whose turns before the answer differ from 'prompt'; "
                    "fix the row so both say the same"
                )
                return None
            turns = turns[-1:]
        if len(turns) != 1 or turns[0][0] != "assistant":
            problems.append(f"{where}: field '{name}' must end with one assistant turn after the prompt's turns")
            return None
        value = turns[0][1]
    return _text(value, where, name, problems)


def _split_conversations(chosen: Turns, rejected: Turns, where: str, problems: list[str]) -> Pair | None:
    """An implicit prompt: the turns both conversations share, then one assistant answer each."""
    shared = 0
    while shared < min(len(chosen), len(rejected)) and chosen[shared] == rejected[shared]:
        shared += 1
    if shared == 0:
        problems.append(f"{where}: 'chosen' and 'rejected' share no prompt turns, so the prompt cannot be split off")
        return None
    rest_c, rest_r = chosen[shared:], rejected[shared:]
    if len(rest_c) != 1 or len(rest_r) != 1 or rest_c[0][0] != "assistant" or rest_r[0][0] != "assistant":
        problems.append(
            f"{where}: 'chosen' and 'rejected' conversations must share every turn but a last assistant turn"
        )
        return None
    return _finish(chosen[:shared], rest_c[0][1], rest_r[0][1], where, problems)


def _finish(prompt: Turns | None, chosen: str | None, rejected: str | None, where: str, problems: list[str]):
    if prompt is None or chosen is None or rejected is None:
        return None
    for name, text in (("chosen", chosen), ("rejected", rejected)):
        if not text.strip():
            problems.append(f"{where}: field '{name}' is empty; remove the row or write the answer")
            return None
    if prompt[-1][0] != "user":
        problems.append(f"{where}: the prompt must end with a user turn, it ends with {prompt[-1][0]!r}")
        return None
    return Pair(tuple(prompt), chosen, rejected, where)


# ------------------------------------------------------------------ the shapes


def _prompt_row(where: str, row: dict, problems: list[str]) -> Pair | None:
    value = row.get("prompt", row.get("messages"))
    if value is None:
        problems.append(f"{where}: field 'prompt' is missing; every row needs prompt, chosen and rejected")
        return None
    if isinstance(value, str):
        if not value.strip():
            problems.append(f"{where}: field 'prompt' is empty")
            return None
        prompt = [("user", value)]
    else:
        prompt = _turns(value, where, "prompt", problems)
        if prompt is None:
            return None
    before = len(problems)
    chosen = _answer(row.get("chosen"), prompt, where, "chosen", problems)
    rejected = _answer(row.get("rejected"), prompt, where, "rejected", problems)
    return None if len(problems) > before else _finish(prompt, chosen, rejected, where, problems)


def _conversation_row(where: str, row: dict, problems: list[str]) -> Pair | None:
    chosen = _turns(row.get("chosen"), where, "chosen", problems)
    rejected = _turns(row.get("rejected"), where, "rejected", problems)
    if chosen is None or rejected is None:
        return None
    return _split_conversations(chosen, rejected, where, problems)


def _is_transcript(text: str) -> bool:
    """Whether `text` starts (after whitespace) with a speaker; cheap: it stops at the first speaker."""
    first = _SPEAKER.search(text)
    return first is not None and not text[: first.start()].strip()


def transcript(text: str) -> Turns | None:
    """'\\n\\nHuman: ...\\n\\nAssistant: ...' as turns; None when it is not such a transcript."""
    if not _is_transcript(text):
        return None
    parts = _SPEAKER.split(text)
    return [
        ("user" if who == "Human" else "assistant", said.strip())
        for who, said in zip(parts[1::2], parts[2::2], strict=True)
    ]


def _transcript_row(where: str, row: dict, problems: list[str]) -> Pair | None:
    sides = []
    for name in ("chosen", "rejected"):
        text = _text(row.get(name), where, name, problems)
        turns = transcript(text) if text is not None else None
        if text is not None and turns is None:
            problems.append(f"{where}: field '{name}' is not a 'Human: ... Assistant: ...' transcript")
        sides.append(turns)
    if None in sides:
        return None
    return _split_conversations(sides[0], sides[1], where, problems)


def _openai_row(where: str, row: dict, problems: list[str]) -> Pair | None:
    source = row.get("input")
    if not isinstance(source, dict) or "messages" not in source:
        problems.append(f"{where}: field 'input' must be an object with 'messages'")
        return None
    prompt = _turns(source["messages"], where, "input.messages", problems)
    if prompt is None:
        return None
    before = len(problems)
    answers = []
    for name in ("preferred_output", "non_preferred_output"):
        turns = _turns(row.get(name), where, name, problems)
        if turns is not None and (len(turns) != 1 or turns[0][0] != "assistant"):
            problems.append(f"{where}: field '{name}' must hold exactly one assistant turn")
        answers.append(turns[0][1] if turns else None)
    return None if len(problems) > before else _finish(prompt, answers[0], answers[1], where, problems)


def _orca_row(where: str, row: dict, problems: list[str]) -> Pair | None:
    system = row.get("system") or ""
    if not isinstance(system, str):
        problems.append(f"{where}: field 'system' must be a string, got {type(system).__name__}")
        return None
    question = _text(row.get("question"), where, "question", problems)
    chosen = _text(row.get("chosen"), where, "chosen", problems)
    rejected = _text(row.get("rejected"), where, "rejected", problems)
    if question is None:
        return None
    prompt = ([("system", system)] if system.strip() else []) + [("user", question)]
    return _finish(prompt, chosen, rejected, where, problems)


@dataclass(frozen=True)
class Shape:
    name: str
    looks_like: str  # what the shape's rows hold, for messages
    parse: Callable[[str, dict, list[str]], Pair | None]


SHAPES = {
    "prompt": Shape(
        "prompt / chosen / rejected",
        "{prompt or messages, chosen, rejected} as strings or turns "
        "(TRL standard and conversational; UltraFeedback-binarized)",
        _prompt_row,
    ),
    "conversations": Shape(
        "chosen / rejected conversations (implicit prompt)",
        "{chosen, rejected} as whole conversations that share all but the last turn",
        _conversation_row,
    ),
    "transcripts": Shape(
        "Human / Assistant transcripts (Anthropic HH-RLHF)",
        '{chosen, rejected} as "\\n\\nHuman: ...\\n\\nAssistant: ..." strings',
        _transcript_row,
    ),
    "openai": Shape(
        "OpenAI / Azure DPO fine-tuning", "{input: {messages}, preferred_output, non_preferred_output}", _openai_row
    ),
    "orca": Shape(
        "system / question / chosen / rejected (orca_dpo_pairs)", "{system, question, chosen, rejected}", _orca_row
    ),
}


def shape_of(row: Any) -> str | None:
    """Which of SHAPES a row has, by its keys and the types of its answers; None for none of them."""
    if not isinstance(row, dict):
        return None
    if "input" in row and ("preferred_output" in row or "non_preferred_output" in row):
        return "openai"
    if "question" in row and ("chosen" in row or "rejected" in row):
        return "orca"
    if "prompt" in row or "messages" in row:
        return "prompt"
    if "chosen" in row or "rejected" in row:
        answers = [row.get("chosen"), row.get("rejected")]
        if any(isinstance(a, list) for a in answers):
            return "conversations"
        if any(isinstance(a, str) and _is_transcript(a) for a in answers):
            return "transcripts"
        return "prompt"  # prompt/chosen/rejected strings with the prompt missing: reported as such
    return None


def unknown(source: str, row: Any) -> UserError:
    """One line for a file whose shape twin-dpo does not read: what it looks like, and what is read."""
    seen = f"rows with keys {sorted(row)[:8]}" if isinstance(row, dict) else f"{type(row).__name__} rows"
    supported = "; ".join(f"{shape.name} {shape.looks_like}" for shape in SHAPES.values())
    return UserError(f"{source}: holds {seen}, a shape twin-dpo does not read; it reads: {supported}")
