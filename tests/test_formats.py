"""The preference files people have: each shape loads, is validated row by row, and trains; broken files are
one line per problem, naming the file and line. Fixtures written here from the formats' public descriptions."""

from __future__ import annotations

import json

import pytest

from conftest import train_argv
from pipeline import cli, data
from pipeline.errors import UserError

SYSTEM = "You answer in one short sentence."


def _hh(*turns: str) -> str:
    return "".join(f"\n\n{'Human' if i % 2 == 0 else 'Assistant'}: {t}" for i, t in enumerate(turns))


def _msg(role: str, content: str) -> dict:
    return {"role": role, "content": content}


# one row per shape, each meaning: system (or none) + "What is LoRA?" -> chosen "A small adapter." vs rejected
ROWS = {
    "transcripts": {
        "chosen": _hh("What is LoRA?", "A small adapter."),
        "rejected": _hh("What is LoRA?", "It is important to note that LoRA is multifaceted."),
    },
    "openai": {
        "input": {"messages": [_msg("system", SYSTEM), _msg("user", "What is LoRA?")]},
        "preferred_output": [_msg("assistant", "A small adapter.")],
        "non_preferred_output": [_msg("assistant", "It is important to note that LoRA is multifaceted.")],
    },
    "ultrafeedback": {
        "prompt": "What is LoRA?",
        "chosen": [_msg("user", "What is LoRA?"), _msg("assistant", "A small adapter.")],
        "rejected": [
            _msg("user", "What is LoRA?"),
            _msg("assistant", "It is important to note that LoRA is multifaceted."),
        ],
        "score_chosen": 8.0,
        "score_rejected": 3.0,
    },
    "orca": {
        "system": SYSTEM,
        "question": "What is LoRA?",
        "chosen": "A small adapter.",
        "rejected": "It is important to note that LoRA is multifaceted.",
    },
    "conversations": {
        "chosen": [_msg("user", "What is LoRA?"), _msg("assistant", "A small adapter.")],
        "rejected": [
            _msg("user", "What is LoRA?"),
            _msg("assistant", "It is important to note that LoRA is multifaceted."),
        ],
    },
}


def _write(tmp_path, name, rows):
    path = tmp_path / f"{name}.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.mark.parametrize("name", sorted(ROWS))
def test_each_shape_becomes_the_same_pair(name, tmp_path, capsys):
    pairs = data.load_pairs(str(_write(tmp_path, name, [ROWS[name]] * 3)), "train", "data.train", announce=True)
    assert len(pairs) == 3
    pair = pairs[0]
    assert pair.prompt[-1] == ("user", "What is LoRA?") and pair.chosen == "A small adapter."
    assert pair.rejected == "It is important to note that LoRA is multifaceted."
    assert pair.prompt[0] == (("system", SYSTEM) if name in ("openai", "orca") else ("user", "What is LoRA?"))
    out = capsys.readouterr().out
    assert out.count("read as") == 1 and f"{name}.jsonl: 3 pairs" in out


def test_multi_turn_transcripts_keep_their_turns_and_roles(tmp_path):
    row = {
        "chosen": _hh("Hi.", "Hello.", "What is DPO?", "Preference tuning."),
        "rejected": _hh("Hi.", "Hello.", "What is DPO?", "DPO is a multifaceted paradigm."),
    }
    pair = data.load_pairs(str(_write(tmp_path, "hh", [row])), "train", "data.train")[0]
    assert pair.prompt == (("user", "Hi."), ("assistant", "Hello."), ("user", "What is DPO?"))
    assert pair.chosen == "Preference tuning." and pair.rejected == "DPO is a multifaceted paradigm."


def test_a_file_mixing_shapes_names_the_line(tmp_path):
    path = _write(tmp_path, "mixed", [ROWS["orca"], ROWS["orca"], ROWS["transcripts"]])
    with pytest.raises(UserError) as err:
        data.load_pairs(str(path), "train", "data.train")
    assert err.value.problems == [
        f"{path}:line 3: this row is Human / Assistant transcripts (Anthropic HH-RLHF), but "
        "the file's first row is system / question / chosen / rejected (orca_dpo_pairs); "
        "keep one format per file"
    ]


def test_conversations_that_share_no_prompt_cannot_be_split(tmp_path):
    row = {"chosen": _hh("What is LoRA?", "A small adapter."), "rejected": _hh("What is RAG?", "Retrieval.")}
    path = _write(tmp_path, "hh", [ROWS["transcripts"], row])
    with pytest.raises(UserError) as err:
        data.load_pairs(str(path), "train", "data.train")
    assert err.value.problems == [
        f"{path}:line 2: 'chosen' and 'rejected' share no prompt turns, so the prompt cannot be split off"
    ]


def test_ultrafeedback_conversation_that_disagrees_with_its_prompt_names_the_line(tmp_path):
    row = dict(ROWS["ultrafeedback"], prompt="What is QLoRA?")
    path = _write(tmp_path, "uf", [ROWS["ultrafeedback"], row])
    with pytest.raises(UserError) as err:
        data.load_pairs(str(path), "train", "data.train")
    assert len(err.value.problems) == 2 and all(p.startswith(f"{path}:line 2: field '") for p in err.value.problems)
    assert "differ from 'prompt'" in err.value.problems[0]


def test_an_unknown_shape_is_one_line_listing_what_is_read(tmp_path):
    path = _write(tmp_path, "sft", [{"text": f"row {i}", "label": 1} for i in range(40)])
    with pytest.raises(UserError) as err:
        data.load_pairs(str(path), "train", "data.train")
    (line,) = err.value.problems
    assert line.startswith(
        f"data.train: {path}: holds rows with keys ['label', 'text'], a shape twin-dpo does not read"
    )
    for shape in ("prompt or messages", "implicit", "Human", "preferred_output", "question"):
        assert shape in line, shape


@pytest.mark.parametrize(
    "content", [b"\x00\x01\xff\xfebinary\x80", "prompt,caf\u00e9\n".encode("latin-1")], ids=["binary", "latin-1"]
)
def test_a_file_that_is_not_utf8_is_one_line_with_the_byte_offset(content, tmp_path, capsys):
    path = tmp_path / "bad.jsonl"
    path.write_bytes(content)
    offset = next(i for i in range(len(content)) if content[i] >= 0x80)
    assert cli.main(["train", "dpo_lora", "--set", f"data.train={path}"]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith(f"twin-dpo: error: {path}: not UTF-8 text") and f"at offset {offset}" in line


@pytest.mark.parametrize("name", ["transcripts", "openai", "ultrafeedback"])
def test_each_shape_trains(name, tiny_llama, small_data, tmp_path):
    path = _write(tmp_path, name, [ROWS[name]] * 4)
    run_dir = tmp_path / "run"
    argv = train_argv(tiny_llama, small_data, run_dir, "--set", f"data.train={path}")
    assert cli.main(argv) == 0
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["steps"] == 1 and summary["pairs_trained"] == 2
