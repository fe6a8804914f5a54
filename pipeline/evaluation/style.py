"""Style metrics of generated answers: did the twin move toward the author's voice?

The author writes short, plain, first-person sentences; the generic assistant
voice is long, hedged and full of stock phrases. These numbers are cheap,
transparent proxies for that difference, not a judge of quality.
"""

from __future__ import annotations

import re

# The generic assistant voice: stock phrases the author never uses. One list, used by the data tests,
# the evaluation and the reports. Matched case-insensitively as whole phrases.
STOCK_PHRASES = (
    "it is important to note",
    "it is worth noting",
    "it is worth mentioning",
    "in conclusion",
    "in summary",
    "delve",
    "certainly!",
    "great question",
    "pivotal",
    "leverage",
    "landscape",
    "furthermore",
    "additionally",
    "moreover",
    "crucial",
    "multifaceted",
    "in today's",
    "ever-evolving",
    "rapidly evolving",
    "ultimately",
    "nevertheless",
    "paramount",
    "unlock",
    "empower",
    "transformative",
    "a wide range of",
    "a wide variety of",
    "best practice",
    "in essence",
    "broadly speaking",
    "at its core",
    "plays a vital role",
    "it is essential",
    "navigate",
    "foster",
    "robust",
)
_STOCK = re.compile("|".join(re.escape(p) for p in STOCK_PHRASES), re.IGNORECASE)
_SENTENCE = re.compile(r"(?<=[.!?])\s+")
_WORD = re.compile(r"[A-Za-z0-9']+")
FIRST_PERSON = {"i", "i'm", "i've", "i'd", "i'll", "me", "my", "mine", "myself"}


def stock_phrases(text: str) -> list[str]:
    return [m.group(0).lower() for m in _STOCK.finditer(text)]


def words(text: str) -> list[str]:
    return _WORD.findall(text)


def sentences(text: str) -> list[str]:
    return [s for s in _SENTENCE.split(text.strip()) if words(s)]


def repetition_rate(text: str, n: int = 3) -> float:
    """Share of word trigrams that repeat an earlier trigram of the same answer (degenerate loops score high)."""
    tokens = [w.lower() for w in words(text)]
    grams = [tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1)]
    if not grams:
        return 0.0
    return 1.0 - len(set(grams)) / len(grams)


def metrics(answers: list[str]) -> dict[str, float]:
    """Mean words per answer, mean sentence length, share with stock phrases, first-person rate, repetition."""
    if not answers:
        return {}
    n = len(answers)
    all_words = [words(a) for a in answers]
    all_sentences = [s for a in answers for s in sentences(a)]
    total_words = sum(len(w) for w in all_words)
    return {
        "words_per_answer": total_words / n,
        "words_per_sentence": (sum(len(words(s)) for s in all_sentences) / len(all_sentences))
        if all_sentences
        else 0.0,
        "stock_phrase_share": sum(bool(stock_phrases(a)) for a in answers) / n,
        "first_person_per_100_words": 100
        * sum(w.lower() in FIRST_PERSON for ws in all_words for w in ws)
        / max(total_words, 1),
        "repetition_rate": sum(repetition_rate(a) for a in answers) / n,
    }
