"""Preference data: the embedded set, the accepted formats, and one clear line per broken row."""

from __future__ import annotations

import json

import pytest

from pipeline import data
from pipeline.data.assets import build_preferences
from pipeline.errors import UserError
from pipeline.evaluation import style


def test_embedded_files_match_their_generator():
    train, heldout = build_preferences.build()
    assert data.EMBEDDED["embedded:train"].read_text(encoding="utf-8") == build_preferences._dump(train)
    assert data.EMBEDDED["embedded:heldout"].read_text(encoding="utf-8") == build_preferences._dump(heldout)


def test_embedded_split_sizes_topics_and_voices():
    train = data.load_pairs("embedded:train", "train", "data.train")
    heldout = data.load_pairs("embedded:heldout", "train", "data.eval")
    assert (len(train), len(heldout)) == (200, 40)
    rows = [json.loads(line) for line in data.EMBEDDED["embedded:heldout"].read_text().splitlines()]
    assert {"prompt": "Write a paragraph to introduce supervised fine-tuning."}.items() <= rows[0].items()
    train_topics = {json.loads(line)["topic"] for line in data.EMBEDDED["embedded:train"].read_text().splitlines()}
    assert not train_topics & {r["topic"] for r in rows}, "held-out topics never appear in training"
    for pair in train + heldout:
        assert len(pair.rejected.split()) > len(pair.chosen.split())  # the generic voice is longer
    pairs = train + heldout
    assert all(style.stock_phrases(p.rejected) for p in pairs), "every generic answer has stock phrases"
    assert not [p.chosen for p in pairs if style.stock_phrases(p.chosen)], "the author never uses them"
    chosen, rejected = style.metrics([p.chosen for p in pairs]), style.metrics([p.rejected for p in pairs])
    assert chosen["words_per_sentence"] < rejected["words_per_sentence"]
    assert chosen["first_person_per_100_words"] > 2 * rejected["first_person_per_100_words"]


def test_formats_normalise_to_the_same_pair():
    standard = {"prompt": "Q?", "chosen": "Yes.", "rejected": "Well, it depends."}
    explicit = {
        "prompt": [{"role": "user", "content": "Q?"}],
        "chosen": [{"role": "assistant", "content": "Yes."}],
        "rejected": [{"role": "assistant", "content": "Well, it depends."}],
    }
    implicit = {
        "chosen": [{"role": "user", "content": "Q?"}, {"role": "assistant", "content": "Yes."}],
        "rejected": [{"role": "user", "content": "Q?"}, {"role": "assistant", "content": "Well, it depends."}],
    }
    messages = {"messages": [{"role": "user", "content": "Q?"}], "chosen": "Yes.", "rejected": "Well, it depends."}
    pairs = [data.parse_pairs([("x", r)], "x", "data.train")[0] for r in (standard, explicit, implicit, messages)]
    assert len({(p.prompt, p.chosen, p.rejected) for p in pairs}) == 1


def test_json_csv_and_parquet_files(tmp_path):
    import pandas as pd

    rows = [{"prompt": f"Q{i}?", "chosen": "Short.", "rejected": "A longer answer."} for i in range(3)]
    (tmp_path / "d.json").write_text(json.dumps({"data": rows}))
    pd.DataFrame(rows).to_csv(tmp_path / "d.csv", index=False)
    pd.DataFrame(rows).to_parquet(tmp_path / "d.parquet")
    for name in ("d.json", "d.csv", "d.parquet"):
        pairs = data.load_pairs(str(tmp_path / name), "train", "data.train")
        assert [p.prompt[0][1] for p in pairs] == ["Q0?", "Q1?", "Q2?"], name


def test_csv_errors_name_the_file_line(tmp_path):
    (tmp_path / "d.csv").write_text("prompt,chosen,rejected\nQ?,Yes.,No.\nQ2?,,No.\n")
    with pytest.raises(UserError) as err:
        data.load_pairs(str(tmp_path / "d.csv"), "train", "data.train")
    assert err.value.problems == [
        f"{tmp_path}/d.csv:line 3: field 'chosen' is missing; every row needs prompt, chosen and rejected"
    ]


def test_every_broken_row_is_listed_with_its_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text(
        "\n".join(
            [
                json.dumps({"prompt": "ok", "chosen": "a", "rejected": "b"}),
                json.dumps({"prompt": "no chosen", "rejected": "b"}),
                json.dumps({"prompt": "empty", "chosen": "a", "rejected": "  "}),
                json.dumps({"prompt": "wrong type", "chosen": 3, "rejected": "b"}),
                json.dumps({"prompt": [{"role": "robot", "content": "x"}], "chosen": "a", "rejected": "b"}),
            ]
        )
        + "\n"
    )
    with pytest.raises(UserError) as err:
        data.load_pairs(str(path), "train", "data.train")
    assert err.value.problems == [
        f"{path}:line 2: field 'chosen' is missing; every row needs prompt, chosen and rejected",
        f"{path}:line 3: field 'rejected' is empty; remove the row or write the answer",
        f"{path}:line 4: field 'chosen' must be a string, got int",
        f"{path}:line 5: field 'prompt' turn 0: role must be one of system, user, assistant, got 'robot'",
    ]


def test_grouped_order_is_a_permutation_of_similar_length_batches():
    import random

    rng = random.Random(1)
    lengths = [rng.randint(10, 300) for _ in range(201)]
    order = data.grouped_order(lengths, batch=2, seed=0)
    assert sorted(order) == list(range(201))
    batches = [order[i : i + 2] for i in range(0, 200, 2)]
    spread = sum(abs(lengths[a] - lengths[b]) for a, b in batches) / len(batches)
    shuffled = list(range(201))
    random.Random(0).shuffle(shuffled)
    random_spread = sum(abs(lengths[shuffled[i]] - lengths[shuffled[i + 1]]) for i in range(0, 200, 2)) / 100
    assert spread < random_spread / 5
    assert data.grouped_order(lengths, 2, 0) == order and data.grouped_order(lengths, 2, 1) != order
