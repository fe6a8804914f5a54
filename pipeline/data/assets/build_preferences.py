"""Build the embedded preference data from `topics.json`, the facts behind it, one entry per topic.

    python -m pipeline.data.assets.build_preferences      # rewrites the two JSONL files

topics.json is written for this project (license: the project's own, see README). Each topic states its facts
once, and this script renders them in two voices that agree on every fact and differ only in style:
`what` completes "X is ..."; `when` is a clause that starts with "when" or "if"; `how` is one or two plain
sentences with a concrete detail; `catch` is a lower-case clause naming the pitfall; `tip` is an imperative
sentence of advice. Topics listed in `heldout` never appear in the train split or in the SFT corpus.

Every pair states the same facts twice. `chosen` is the author's voice: first
person, short sentences, plain words. `rejected` is the generic assistant
voice: formal, hedged, longer, stock phrases. DPO on these pairs must pull the
twin toward the author's style, not toward formality (the Handbook's twin
setting, ch. 6). The output is deterministic; a test checks that the committed
files match this script.
"""

from __future__ import annotations

import json
from pathlib import Path

HERE = Path(__file__).parent
_FACTS = json.loads((HERE / "topics.json").read_text(encoding="utf-8"))
TOPICS, HELDOUT = _FACTS["topics"], _FACTS["heldout"]
TRAIN_FILE = HERE / "preferences_train.jsonl"
HELDOUT_FILE = HERE / "preferences_heldout.jsonl"


def _lc(text: str) -> str:
    """Lower-case the first letter unless the first word is an acronym (LoRA, GGUF)."""
    if len(text) > 1 and text[1].isupper():
        return text
    return text[:1].lower() + text[1:]


def _cap(text: str) -> str:
    return text[:1].upper() + text[1:]


# Prompt kinds. Every topic gets the intro request plus three of the others,
# rotating, so each kind appears across many topics and answer lengths vary.
INTRO = "Write a paragraph to introduce {name}."
OTHER_PROMPTS = [
    ("what", "What is {name}?"),
    ("when", "When should I use {name}, and what is the catch?"),
    ("explain", "Explain {name} to a new engineer on my team."),
    ("advice", "Give me one piece of practical advice about {name}."),
    ("blog", "Write a short note for my blog on why {name} matters."),
]

# --- the author's voice -------------------------------------------------------

CHOSEN = {
    "intro": [
        "{Name} is {what}. I use it {when}. The catch is that {catch}. {tip}",
        "Here is how I explain {name}. It is {what}. You reach for it {when}. Watch out: {catch}. {tip}",
        "I'll keep this plain. {Name} is {what}. I use it {when}. But {catch}. {tip}",
    ],
    "what": ["{Name} is {what}. {how}", "In short, {name} is {what}. {how}"],
    "when": ["Use it {when}. The catch: {catch}. {tip}", "I use it {when}. The catch is that {catch}."],
    "explain": ["I'd put it like this. {Name} is {what}. {how}", "Think of {name} as {what}. I reach for it {when}."],
    "advice": ["{tip} I learned this the hard way: {catch}.", "My advice: {tip_lc} Why? Because {catch}."],
    "blog": [
        "I keep coming back to {name}. It is {what}. I use it {when}. It is not free: {catch}.",
        "{Name} matters to me for one reason. It is {what}. The trap is that {catch}. My rule: {tip_lc}",
    ],
}

# --- the generic assistant voice ----------------------------------------------

REJECTED = {
    "intro": [
        "{Name} represents a pivotal concept in the rapidly evolving landscape of machine learning. At its core, it "
        "can be described as {what}. Practitioners frequently leverage this technique {when}. It is important to "
        "note, however, that {catch}. Therefore, it is generally advisable to {tip_lc} In conclusion, {name} is an "
        "essential tool for unlocking the full potential of modern models.",
        "In today's fast-paced world of machine learning, it is crucial to delve into {name}. Broadly speaking, "
        "{name} refers to {what}. This approach is particularly valuable {when}. Nevertheless, it is essential to "
        "acknowledge that {catch}. As such, a best practice is to {tip_lc} Overall, {name} plays a vital role in "
        "modern AI workflows.",
        "Certainly! {Name} is a fascinating and multifaceted topic. In essence, it can be understood as {what}. "
        "Organizations often turn to this methodology {when}. That being said, it is important to note that "
        "{catch}. Experts therefore recommend that one should {tip_lc} In summary, {name} is a powerful and "
        "transformative technique.",
    ],
    "what": [
        "Great question! {Name} is a multifaceted concept that can be broadly defined as {what}. Additionally, it is "
        "worth noting that {how_lc} Ultimately, understanding {name} is crucial in the complex landscape of modern AI.",
        "{Name} can be defined as {what}. In the broader context of machine learning, it serves as a foundational "
        "building block. Furthermore, {how_lc} In conclusion, a solid grasp of {name} is essential for practitioners.",
    ],
    "when": [
        "The decision to employ {name} depends on a wide variety of factors. Generally speaking, it may be "
        "beneficial {when}. However, it is important to note that {catch}. Consequently, it is often advisable to "
        "{tip_lc} In conclusion, careful consideration of your specific use case is paramount.",
        "Determining when to utilize {name} requires a nuanced understanding of your objectives. It is typically "
        "recommended {when}. That said, one potential drawback is that {catch}. Ultimately, the optimal choice will "
        "depend on the unique requirements of your project.",
    ],
    "explain": [
        "Certainly! Explaining {name} to a new team member is a great opportunity to foster shared understanding. At "
        "a high level, {name} can be described as {what}. Furthermore, {how_lc} By delving into these key aspects, "
        "your new engineer will be well-equipped to navigate this crucial area.",
        "When onboarding a new engineer, it is essential to provide a comprehensive overview of {name}. In essence, "
        "it refers to {what}. Teams commonly leverage it {when}. In conclusion, a thorough understanding of {name} "
        "will empower your colleague to contribute effectively.",
    ],
    "advice": [
        "When it comes to {name}, there are numerous best practices to consider. One particularly valuable "
        "recommendation is to {tip_lc} This is crucial because {catch}. By following this guidance, you can navigate "
        "the complexities of {name} with greater confidence.",
        "Certainly! A key piece of practical advice regarding {name} is to {tip_lc} It is important to note that "
        "{catch}, which can significantly impact outcomes. In conclusion, adopting this best practice can help ensure "
        "robust and reliable results.",
    ],
    "blog": [
        "In the ever-evolving landscape of artificial intelligence, {name} has emerged as a crucial topic. At its "
        "core, {name} is {what}. It plays a pivotal role {when}. It is important to note, however, that {catch}. In "
        "conclusion, {name} empowers practitioners to unlock new possibilities and drive meaningful innovation.",
        "Why does {name} matter? In today's data-driven world, the answer is multifaceted. Broadly speaking, {name} "
        "refers to {what}. Nevertheless, it is essential to recognize that {catch}. As a best practice, one should "
        "{tip_lc} Ultimately, {name} represents a transformative approach.",
    ],
}


def _fields(topic: dict) -> dict:
    return {
        "name": topic["name"],
        "Name": _cap(topic["name"]),
        "what": topic["what"],
        "when": topic["when"],
        "how": topic["how"],
        "how_lc": _lc(topic["how"]),
        "catch": topic["catch"],
        "tip": topic["tip"],
        "tip_lc": _lc(topic["tip"]),
    }


def build() -> tuple[list[dict], list[dict]]:
    """Return (train_rows, heldout_rows); each row is {"prompt", "chosen", "rejected", "topic"}."""
    train, heldout = [], []
    for index, topic in enumerate(TOPICS):
        fields = _fields(topic)
        kinds = [("intro", INTRO)] + [OTHER_PROMPTS[(index + k) % len(OTHER_PROMPTS)] for k in range(3)]
        for slot, (kind, prompt) in enumerate(kinds):
            chosen_options, rejected_options = CHOSEN[kind], REJECTED[kind]
            row = {
                "prompt": prompt.format(**fields),
                "chosen": chosen_options[(index + slot) % len(chosen_options)].format(**fields),
                "rejected": rejected_options[(index + slot) % len(rejected_options)].format(**fields),
                "topic": topic["name"],
            }
            (heldout if topic["name"] in HELDOUT else train).append(row)
    return train, heldout


def _dump(rows: list[dict]) -> str:
    return "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)


def main() -> None:
    train, heldout = build()
    TRAIN_FILE.write_text(_dump(train), encoding="utf-8")
    HELDOUT_FILE.write_text(_dump(heldout), encoding="utf-8")
    print(f"wrote {len(train)} train pairs to {TRAIN_FILE.name}, {len(heldout)} held-out pairs to {HELDOUT_FILE.name}")


if __name__ == "__main__":
    main()
