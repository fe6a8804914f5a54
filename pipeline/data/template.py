"""From pairs to what TRL reads: the chat template applied, lengths checked, batches grouped by length."""

from __future__ import annotations

import random
from dataclasses import dataclass

from pipeline.data.formats import Pair
from pipeline.errors import UserError


def messages(pair: Pair, system_prompt: str | None) -> list[dict[str, str]]:
    turns = [{"role": role, "content": content} for role, content in pair.prompt]
    if system_prompt is not None and turns[0]["role"] != "system":
        turns.insert(0, {"role": "system", "content": system_prompt})
    return turns


def adds_bos(tokenizer) -> bool:
    """Whether encoding text (with special tokens, as TRL and generation do) puts BOS in front by itself."""
    if tokenizer.bos_token_id is None:
        return False
    ids = tokenizer("a")["input_ids"]
    return bool(ids) and ids[0] == tokenizer.bos_token_id


def render_chat(tokenizer, conversation: list[dict[str, str]], generation: bool = True) -> str:
    """The chat template's text, ready to be encoded with special tokens. A template that writes BOS itself (Llama 3,
    Gemma, Mistral) on a tokenizer that also adds it would give every sequence two: the template's is dropped."""
    text = tokenizer.apply_chat_template(conversation, tokenize=False, add_generation_prompt=generation)
    bos = tokenizer.bos_token
    if bos and text.startswith(bos) and adds_bos(tokenizer):
        text = text[len(bos) :]
    return text


def render_prompt(tokenizer, pair: Pair, system_prompt: str | None) -> str:
    """A pair's prompt (with the system prompt) as text, ending in the generation prompt."""
    return render_chat(tokenizer, messages(pair, system_prompt))


def templated(tokenizer, pairs: list[Pair], system_prompt: str | None) -> list[dict[str, str]]:
    """Rows TRL can read: the prompt rendered with the chat template; TRL appends EOS to each answer."""
    if not getattr(tokenizer, "chat_template", None):
        raise UserError(
            "the model's tokenizer has no chat template; use a chat (instruct) model or add chat_template.jinja to its "
            "folder"
        )
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
    for row, pair in zip(rows, pairs, strict=True):
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
    rng = random.Random(seed)
    order = list(range(len(lengths)))
    rng.shuffle(order)
    batches = []
    for start in range(0, len(order), group * batch):
        chunk = sorted(order[start : start + group * batch], key=lambda i: lengths[i], reverse=True)
        batches.extend(chunk[k : k + batch] for k in range(0, len(chunk), batch))
    full = [b for b in batches if len(b) == batch]
    rng.shuffle(full)  # a short batch stays last, so the loader's batches line up with these
    return [i for b in full + [b for b in batches if len(b) < batch] for i in b]
