"""Never lose a run: kill -9 and resume, interrupts, divergence, a full disk, the lock, unsafe models."""

from __future__ import annotations

import errno
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import cli_sets, tiny_recipe
from pipeline import cli
from pipeline.errors import EXIT_DIVERGED, Diverged, UserError
from pipeline.training import dpo as train
from pipeline.training import guard

STEPS = 12


SLOW_STEPS = Path(__file__).parent / "slow_steps.py"


def _argv(model, data, extra=(), command="train", recipe="dpo_lora"):
    return [
        sys.executable,
        "-m",
        "pipeline",
        command,
        recipe,
        "--max-steps",
        str(STEPS),
        *(["--no-answers"] if command == "train" else []),
        *cli_sets(model, data),
        "--set",
        "model.dtype=float32",
        "--set",
        "train.save_every=2",
        "--set",
        "train.eval_every=0",
        "--set",
        "train.learning_rate=1e-3",
        "--set",
        "train.warmup_steps=0",
        *extra,
    ]


def _start(argv, delay="0.15"):
    """The command in `argv` (python -m pipeline ...) with each step slowed by `delay` seconds."""
    slow = [sys.executable, str(SLOW_STEPS), delay, *argv[3:]]
    return subprocess.Popen(slow, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_for(path: Path, proc, timeout=120):
    end = time.time() + timeout
    while time.time() < end:
        if path.exists():
            return True
        if proc.poll() is not None:
            return False
        time.sleep(0.02)
    raise AssertionError(f"{path} did not appear")


def _adapter(run_dir):
    return load_file(str(run_dir / "adapter" / "adapter_model.safetensors"))


def _train_rows(run_dir):
    return {
        r["step"]: r
        for r in (json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines())
        if "loss" in r
    }


@pytest.fixture(scope="module")
def uninterrupted(tiny_llama, small_data, tmp_path_factory):
    folder = tmp_path_factory.mktemp("straight") / "run"
    env = {**os.environ, "TWIN_DPO_CACHE": str(folder.parent / "cache")}
    done = subprocess.run(
        _argv(tiny_llama, small_data, ["--run-dir", str(folder)]), env=env, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return folder


def test_kill_9_after_a_checkpoint_then_resume_equals_an_uninterrupted_run(
    tiny_llama, small_data, tmp_path, uninterrupted
):
    run_dir = tmp_path / "run"
    proc = _start(_argv(tiny_llama, small_data, ["--run-dir", str(run_dir)]))
    assert _wait_for(run_dir / "checkpoints" / "checkpoint-4" / guard.MARKER, proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (run_dir / "summary.json").exists()
    done = subprocess.run(_argv(tiny_llama, small_data, ["--resume", str(run_dir)]), capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["steps"] == STEPS and summary["resumed_from_step"] >= 4
    a, b = _adapter(run_dir), _adapter(uninterrupted)
    assert a.keys() == b.keys()
    assert max(float((a[k] - b[k]).abs().max()) for k in a) <= 1e-6
    resumed, straight = _train_rows(run_dir), _train_rows(uninterrupted)
    assert sorted(resumed) == list(range(1, STEPS + 1))
    for step in range(summary["resumed_from_step"] + 1, STEPS + 1):
        for key in ("loss", "rewards/margins", "logps/chosen"):
            assert resumed[step][key] == pytest.approx(straight[step][key], abs=1e-6), (step, key)


def test_three_kills_at_random_moments_then_the_same_adapter(tiny_llama, small_data, tmp_path, uninterrupted):
    rng = random.Random(7)
    run_dir = tmp_path / "run"
    first = _argv(tiny_llama, small_data, ["--run-dir", str(run_dir)])
    again = _argv(tiny_llama, small_data, ["--resume", str(run_dir)])
    for kill in range(3):
        proc = _start(first if kill == 0 else again)
        _wait_for(run_dir / "metrics.jsonl", proc)  # training (or its evaluation) has begun
        if kill == 2:  # the last kill comes once a complete checkpoint exists, so the final run must resume from one
            end = time.time() + 120
            while (
                guard.latest_checkpoint(run_dir / "checkpoints") is None and proc.poll() is None and time.time() < end
            ):
                time.sleep(0.02)
        time.sleep(rng.uniform(0.0, 1.5 if kill < 2 else 0.3))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        if kill == 0 and not (run_dir / "recipe.json").exists():
            pytest.fail("the first process was killed before it wrote its recipe")
    done = subprocess.run(again, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "resuming from checkpoint-" in done.stdout
    assert json.loads((run_dir / "summary.json").read_text())["resumed_from_step"] >= 2
    a, b = _adapter(run_dir), _adapter(uninterrupted)
    assert max(float((a[k] - b[k]).abs().max()) for k in a) <= 1e-6
    left = sorted(p.name for p in (run_dir / "checkpoints").glob("checkpoint-*"))
    assert all((run_dir / "checkpoints" / n / guard.MARKER).exists() for n in left), "no torn checkpoint left behind"
    assert len(left) <= 2


def test_sigterm_saves_prints_the_resume_command_and_exits_143(tiny_llama, small_data, tmp_path):
    run_dir = tmp_path / "run"
    proc = _start(_argv(tiny_llama, small_data, ["--run-dir", str(run_dir)]), delay="0.3")
    assert _wait_for(run_dir / "checkpoints" / "checkpoint-2" / guard.MARKER, proc)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err[-2000:]
    assert f"--resume {run_dir}" in err and "python -m pipeline train dpo_lora" in err
    saved = guard.complete_checkpoints(run_dir / "checkpoints")[-1]
    assert f"saved {saved}" in err
    done = subprocess.run(_argv(tiny_llama, small_data, ["--resume", str(run_dir)]), capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]


def test_resume_with_a_changed_recipe_names_the_fields(tiny_llama, small_data, tmp_path, capsys):
    run_dir = tmp_path / "run"
    recipe = tiny_recipe(tiny_llama, small_data, save_every=2)
    train.train(recipe, run_dir, max_steps=2)
    (run_dir / "summary.json").unlink()  # pretend it stopped after its checkpoint
    argv = [
        "train",
        "dpo_lora",
        "--max-steps",
        "4",
        "--resume",
        str(run_dir),
        *cli_sets(tiny_llama, small_data),
        "--set",
        "model.dtype=float32",
        "--set",
        "train.learning_rate=5e-4",
    ]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert "the recipe changed since the run started" in err
    assert (
        "train.learning_rate (0.001 in the run, 0.0005 now)" in err and "train.max_steps (2 in the run, 4 now)" in err
    )
    assert cli.main(argv + ["--force", "--no-answers"]) == 0
    assert json.loads((run_dir / "summary.json").read_text())["steps"] == 4


class Poison:
    """A trainer callback that turns the model's hidden states into NaN from a given step on."""

    def __new__(cls, step):
        from transformers import TrainerCallback

        class _Poison(TrainerCallback):
            def on_step_begin(self, args, state, control, model=None, **kwargs):
                if state.global_step + 1 == step:
                    layer = (
                        model.get_base_model().model.layers[0]
                        if hasattr(model, "get_base_model")
                        else model.model.layers[0]
                    )
                    layer.register_forward_hook(
                        lambda _mod, _inp, out: (
                            (out[0] * float("nan"),) + tuple(out[1:]) if isinstance(out, tuple) else out * float("nan")
                        )
                    )

        return _Poison()


def test_a_nan_step_stops_the_run_keeps_the_last_good_checkpoint(tiny_llama, small_data, tmp_path):
    run_dir = tmp_path / "run"
    recipe = tiny_recipe(tiny_llama, small_data, save_every=2)
    with pytest.raises(Diverged) as err:
        train.train(recipe, run_dir, max_steps=10, extra_callbacks=[Poison(step=5)])
    assert "training diverged at step 5: loss nan" in str(err.value)
    assert "learning rate (0.001) is likely too high" in str(err.value)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "diverged" and summary["last_good_checkpoint"].endswith("checkpoint-4")
    assert not (run_dir / "adapter").exists(), "nothing from the diverged step is the result"
    assert [p.name for p in guard.complete_checkpoints(run_dir / "checkpoints")] == ["checkpoint-2", "checkpoint-4"]
    good = load_file(str(run_dir / "checkpoints" / "checkpoint-4" / "adapter_model.safetensors"))
    assert all(torch.isfinite(t).all() for t in good.values())
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(tiny_llama), run_dir / "checkpoints" / "checkpoint-4"
    )


def test_diverged_exit_status_is_3(monkeypatch, capsys):
    def boom(*args, **kwargs):
        raise Diverged("training diverged at step 5: loss nan; ...")

    monkeypatch.setattr(train, "train", boom)
    assert cli.main(["train", "dpo_lora", "--max-steps", "1"]) == EXIT_DIVERGED == 3
    assert "training diverged at step 5" in capsys.readouterr().err


def test_disk_full_while_saving_keeps_the_previous_checkpoint(tiny_llama, small_data, tmp_path, monkeypatch):
    from transformers import Trainer

    original = Trainer._save_optimizer_and_scheduler

    def full_disk(self, output_dir):
        if self.state.global_step == 4:
            Path(output_dir, "optimizer.pt").write_bytes(b"half")
            raise OSError(errno.ENOSPC, "No space left on device")
        return original(self, output_dir)

    monkeypatch.setattr(Trainer, "_save_optimizer_and_scheduler", full_disk)
    run_dir = tmp_path / "run"
    with pytest.raises(UserError) as err:
        train.train(tiny_recipe(tiny_llama, small_data, save_every=2), run_dir, max_steps=6)
    message = str(err.value)
    assert "disk full while writing" in message and "the previous checkpoint checkpoint-2 is intact" in message
    assert [p.name for p in (run_dir / "checkpoints").glob("checkpoint-*")] == ["checkpoint-2"]
    assert (run_dir / "checkpoints" / "checkpoint-2" / guard.MARKER).exists()
    assert not (run_dir / "summary.json").exists()


def test_a_second_process_on_the_same_run_folder_is_refused(tiny_llama, small_data, tmp_path, capsys):
    run_dir = tmp_path / "run"
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time; from pipeline.training import guard; "
            f"lock = guard.RunLock(__import__('pathlib').Path({str(run_dir)!r})).__enter__(); "
            "print('locked', flush=True); time.sleep(60)",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        code = cli.main(
            [
                "train",
                "dpo_lora",
                "--max-steps",
                "1",
                "--run-dir",
                str(run_dir),
                "--set",
                f"model.name_or_path={tiny_llama}",
                "--set",
                f"data.train={small_data['train']}",
            ]
        )
        err = capsys.readouterr().err.strip().splitlines()
        assert code == 2 and len(err) == 1
        assert f"run folder {run_dir} is in use by pid {holder.pid}" in err[0]
    finally:
        holder.kill()
        holder.wait()


def test_a_model_that_needs_remote_code_is_refused(tiny_llama, tmp_path, capsys):
    import shutil

    folder = tmp_path / "remote"
    shutil.copytree(tiny_llama, folder)
    config = json.loads((folder / "config.json").read_text())
    config.update(
        model_type="twin-custom",
        auto_map={
            "AutoConfig": "configuration_custom.CustomConfig",
            "AutoModelForCausalLM": "modeling_custom.CustomModel",
        },
    )
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "modeling_custom.py").write_text("raise SystemExit('remote code ran')\n")
    (folder / "configuration_custom.py").write_text("raise SystemExit('remote code ran')\n")
    code = cli.main(["train", "dpo_lora", "--max-steps", "1", "--set", f"model.name_or_path={folder}"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1, err
    assert "model.trust_remote_code=true" in err[0] and str(folder) in err[0]


def _sft_argv(model, data, extra=()):
    return _argv(model, data, extra, command="sft", recipe="sft_twin")


def test_sft_kill_9_after_a_checkpoint_then_resume_equals_an_uninterrupted_run(tiny_llama, small_data, tmp_path):
    straight = tmp_path / "straight"
    done = subprocess.run(
        _sft_argv(tiny_llama, small_data, ["--run-dir", str(straight)]), capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr[-3000:]
    run_dir = tmp_path / "run"
    proc = _start(_sft_argv(tiny_llama, small_data, ["--run-dir", str(run_dir)]))
    assert _wait_for(run_dir / "checkpoints" / "checkpoint-4" / guard.MARKER, proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (run_dir / "summary.json").exists() and not (run_dir / "adapter").exists()
    done = subprocess.run(_sft_argv(tiny_llama, small_data, ["--resume", str(run_dir)]), capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["steps"] == STEPS and summary["resumed_from_step"] >= 4
    a, b = _adapter(run_dir), _adapter(straight)
    assert a.keys() == b.keys()
    assert max(float((a[k] - b[k]).abs().max()) for k in a) <= 1e-6


def test_sft_stops_on_a_nan_step_and_refuses_a_second_process(tiny_llama, small_data, tmp_path, capsys):
    from pipeline import recipe as recipes
    from pipeline.training import sft

    recipe = recipes.apply_overrides(
        recipes.load_recipe("sft_twin"),
        [
            f"model.name_or_path={tiny_llama}",
            f"data.train={small_data['train']}",
            f"data.eval={small_data['heldout']}",
            "model.dtype=float32",
            "train.save_every=2",
            "train.eval_every=0",
            "train.learning_rate=1e-3",
        ],
    )
    run_dir = tmp_path / "run"
    with pytest.raises(Diverged, match="training diverged at step 3: loss nan"):
        sft.sft(recipe, run_dir, max_steps=6, extra_callbacks=[Poison(step=3)])
    assert json.loads((run_dir / "summary.json").read_text())["status"] == "diverged"
    assert not (run_dir / "adapter").exists()
    assert [p.name for p in guard.complete_checkpoints(run_dir / "checkpoints")] == ["checkpoint-2"]
    with guard.RunLock(tmp_path / "locked"):
        code = cli.main(
            [
                "sft",
                "sft_twin",
                "--max-steps",
                "1",
                "--run-dir",
                str(tmp_path / "locked"),
                "--set",
                f"model.name_or_path={tiny_llama}",
                "--set",
                f"data.train={small_data['train']}",
            ]
        )
    assert code == 2 and "is in use by" in capsys.readouterr().err
