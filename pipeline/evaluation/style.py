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


# The voice metrics the judgement reads; repetition is judged on its own (a rise is degeneration, not voice).
VOICE = ("words_per_answer", "words_per_sentence", "stock_phrase_share", "first_person_per_100_words")
LABELS = {
    "words_per_answer": "words/answer",
    "words_per_sentence": "words/sentence",
    "stock_phrase_share": "stock-phrase share",
    "first_person_per_100_words": "first person /100 words",
    "repetition_rate": "repetition",
}
MOVED = 0.05  # a change in mean distance under 5% of the author-generic gap is "not at all"
REPETITION_RISE = 0.05  # repetition up by more than this is flagged


def judge(before: dict[str, float], after: dict[str, float], author: dict[str, float], generic: dict[str, float]):
    """Did the answers move toward the author's voice? Per metric, the distance to the author's held-out yardstick
    before and after, in units of the gap between the author's and the generic held-out answers (so metrics of
    different scales weigh alike); the verdict reads the mean of those distances, and repetition separately."""
    rows = {}
    for key in VOICE:
        gap = abs(generic[key] - author[key]) or 1.0
        d0, d1 = abs(before[key] - author[key]) / gap, abs(after[key] - author[key]) / gap
        rows[key] = {
            "before": before[key],
            "after": after[key],
            "author": author[key],
            "distance_before": round(d0, 4),
            "distance_after": round(d1, 4),
            "closer": d1 < d0 - 1e-9,
        }
    mean0 = sum(r["distance_before"] for r in rows.values()) / len(rows)
    mean1 = sum(r["distance_after"] for r in rows.values()) / len(rows)
    if mean1 < mean0 - MOVED:
        verdict = "toward the author"
    elif mean1 > mean0 + MOVED:
        verdict = "away from the author"
    else:
        verdict = "not at all"
    rise = after["repetition_rate"] - before["repetition_rate"]
    return {
        "verdict": verdict,
        "mean_distance_before": round(mean0, 4),
        "mean_distance_after": round(mean1, 4),
        "metrics_closer": sum(r["closer"] for r in rows.values()),
        "metrics": rows,
        "repetition_before": before["repetition_rate"],
        "repetition_after": after["repetition_rate"],
        "repetition_flagged": rise > REPETITION_RISE,
    }


def judge_styles(styles: dict) -> dict:
    """`judge` on an eval.json `style` block (before, after, author_reference, generic_reference)."""
    return judge(styles["before"], styles["after"], styles["author_reference"], styles["generic_reference"])


def verdict_line(j: dict) -> str:
    """One line: where the voice went, and a repetition flag when it rose too much."""
    line = (
        f"voice: moved {j['verdict']} ({j['metrics_closer']} of {len(j['metrics'])} style metrics closer to the "
        f"author's held-out answers; mean distance {j['mean_distance_before']:.2f} -> {j['mean_distance_after']:.2f} "
        f"author-generic gaps); repetition {j['repetition_before']:.2f} -> {j['repetition_after']:.2f}"
    )
    if j["repetition_flagged"]:
        line += f" REPETITION UP by more than {REPETITION_RISE} (a step toward degenerate text)"
    return line


def distance_lines(j: dict) -> list[str]:
    """Per metric: value before -> after, the author's yardstick, and the distance to it before -> after."""
    out = []
    for key, r in j["metrics"].items():
        fmt = "{:.2f}" if key == "stock_phrase_share" else "{:.1f}"
        out.append(
            f"  {LABELS[key]:<24} {fmt.format(r['before'])} -> {fmt.format(r['after'])} (author "
            f"{fmt.format(r['author'])}): distance {r['distance_before']:.2f} -> {r['distance_after']:.2f}"
            f"{', closer' if r['closer'] else ''}"
        )
    return out
