"""Bad input: one line on stderr naming the file / row / field, exit 2, before any weight is loaded."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from conftest import cli_sets
from pipeline import cli


@pytest.fixture
def no_weights(monkeypatch):
    """Fail the test if anything tries to load model weights."""
    from pipeline.model import hf, paths

    def refuse(*_args, **_kwargs):
        raise AssertionError("model weights were loaded before the input was checked")

    monkeypatch.setattr(hf, "load_base", refuse)
    monkeypatch.setattr(paths, "embedded_model_dir", refuse)


def _run(capsys, *argv):
    code = cli.main(list(argv))
    err = capsys.readouterr().err.strip().splitlines()
    return code, err


def _write(tmp_path, name, lines):
    path = tmp_path / name
    path.write_text("".join(line + "\n" for line in lines))
    return path


GOOD = json.dumps({"prompt": "Q?", "chosen": "Yes.", "rejected": "It depends."})


@pytest.mark.parametrize(
    "case, expected",
    [
        ("beta", "train.beta: must be > 0, got -1.0"),
        ("typo_key", "--set train.learnig_rate: unknown recipe key; did you mean train.learning_rate?"),
        ("missing_data", "data.train: dataset file /no/such/file.jsonl does not exist"),
        ("missing_model", "model.name_or_path: model folder /no/such/model does not exist"),
        ("no_chosen", "bad.jsonl:line 2: field 'chosen' is missing"),
        ("empty_rejected", "bad.jsonl:line 1: field 'rejected' is empty"),
        ("not_json", "bad.jsonl:line 2: not valid JSON"),
    ],
)
@pytest.mark.usefixtures("no_weights")
def test_bad_input_exits_2_with_one_line(case, expected, capsys, tmp_path, tiny_llama):
    bad_file = {
        "no_chosen": [GOOD, json.dumps({"prompt": "Q", "rejected": "x"})],
        "empty_rejected": [json.dumps({"prompt": "Q", "chosen": "a", "rejected": ""})],
        "not_json": [GOOD, '{"prompt": "Q", "chosen": '],
    }
    sets = {
        "beta": ["train.beta=-1"],
        "typo_key": ["train.learnig_rate=1e-6"],
        "missing_data": ["data.train=/no/such/file.jsonl"],
        "missing_model": ["model.name_or_path=/no/such/model"],
    }.get(case) or ["data.train=" + str(_write(tmp_path, "bad.jsonl", bad_file[case]))]
    if case not in ("missing_model",):
        sets = sets + [f"model.name_or_path={tiny_llama}"]
    argv = ["train", "dpo_lora", "--max-steps", "1"] + [a for s in sets for a in ("--set", s)]
    code, err = _run(capsys, *argv)
    assert code == 2
    assert len(err) == 1, err
    assert expected in err[0]
    assert not list(tmp_path.glob("runs/*")), "a rejected run leaves no run folder"


@pytest.mark.usefixtures("no_weights")
def test_prompt_longer_than_max_length_says_how_many_and_how_to_fix(capsys, tmp_path, tiny_llama):
    long_prompt = " ".join(["word"] * 400)
    path = _write(
        tmp_path,
        "long.jsonl",
        [
            GOOD,
            json.dumps({"prompt": long_prompt, "chosen": "a", "rejected": "b"}),
            json.dumps({"prompt": long_prompt + " more", "chosen": "a", "rejected": "b"}),
        ],
    )
    code, err = _run(
        capsys,
        "train",
        "dpo_lora",
        "--set",
        f"model.name_or_path={tiny_llama}",
        "--set",
        f"data.train={path}",
        "--set",
        "data.max_length=128",
    )
    assert code == 2 and len(err) == 1
    assert "data.train: 2 rows have prompts of 128 tokens or more after the chat template" in err[0]
    assert "long.jsonl:line 3" in err[0] and "raise data.max_length (now 128)" in err[0]


@pytest.mark.usefixtures("no_weights")
def test_unsloth_backend_without_gpu_is_one_line(capsys):
    code, err = _run(capsys, "train", "dpo_lora", "--set", "model.backend=unsloth", "--max-steps", "1")
    assert code == 2 and len(err) == 1
    assert "model.backend=unsloth needs a CUDA GPU" in err[0]


@pytest.mark.usefixtures("no_weights")
def test_pickle_only_model_folder_is_refused(capsys, tmp_path, tiny_llama):
    import shutil

    folder = tmp_path / "pickled"
    shutil.copytree(tiny_llama, folder)
    (folder / "model.safetensors").unlink()
    (folder / "pytorch_model.bin").write_bytes(b"not really")
    code, err = _run(capsys, "train", "dpo_lora", "--set", f"model.name_or_path={folder}", "--max-steps", "1")
    assert code == 2 and len(err) == 1
    assert "only pickle weights (pytorch_model.bin)" in err[0] and "model.allow_pickle_weights=true" in err[0]


def test_max_steps_and_run_dir_write_summary(tmp_path, tiny_llama, small_data, capsys):
    run_dir = tmp_path / "D"
    argv = ["train", "dpo_lora", "--max-steps", "2", "--run-dir", str(run_dir)]
    code = cli.main([*argv, *cli_sets(tiny_llama, small_data), "--set", "model.dtype=float32"])
    assert code == 0
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["steps"] == 2 and summary["status"] == "completed"
    out = capsys.readouterr().out
    assert "held-out (hf, computed in float32): reward accuracy" in out and str(run_dir) in out
    # a finished run folder is not overwritten
    code = cli.main([*argv, "--set", f"model.name_or_path={tiny_llama}"])
    assert code == 2 and "already holds a finished run" in capsys.readouterr().err


def test_console_script_and_module_entry_point_agree():
    out = subprocess.run(
        [sys.executable, "-m", "pipeline", "recipe", "dpo_qlora", "--set", "train.beta=0.1"],
        capture_output=True,
        text=True,
        check=True,
    )
    recipe = json.loads(out.stdout)
    assert recipe["model"]["load_in_4bit"] is True and recipe["train"]["beta"] == 0.1
    bad = subprocess.run(
        [sys.executable, "-m", "pipeline", "train", "dpo_lora", "--set", "train.beta=-1"],
        capture_output=True,
        text=True,
    )
    assert bad.returncode == 2 and bad.stderr.strip().splitlines() == [
        "twin-dpo: error: train.beta: must be > 0, got -1.0"
    ]


def test_no_eval_is_a_smoke_test_without_held_out_work(tmp_path, tiny_llama, small_data, capsys):
    """`--no-eval` (issue 17's smoke test): no held-out evaluation, not even the recipe's periodic one, no reference
    pass over the held-out pairs, no fixed-question answers; the run still trains and writes its folder."""
    run_dir = tmp_path / "smoke"
    argv = ["train", "dpo_lora", "--max-steps", "2", "--no-eval", "--run-dir", str(run_dir)]
    sets = [*cli_sets(tiny_llama, small_data), "--set", "model.dtype=float32", "--set", "train.eval_every=0.5"]
    assert cli.main(argv + sets) == 0
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["steps"] == 2
    assert summary["eval_before"] is None and summary["eval_after"] is None and summary["eval_pairs"] == 0
    # the reference pass computed the 2 steps' train pairs (sequential sampler) and no held-out pair
    assert summary["reference_pairs_computed"] == summary["pairs_trained"] == 4
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert not [m for m in metrics if "eval_loss" in m] and [m["step"] for m in metrics if "loss" in m] == [1, 2]
    assert (run_dir / "adapter" / "adapter_model.safetensors").is_file() and not (run_dir / "samples.md").exists()
    out = capsys.readouterr().out
    assert "held-out: not evaluated (--no-eval)" in out and "answering the fixed questions" not in out
