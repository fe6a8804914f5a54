"""`train RECIPE --nproc N`: the same command on N processes, started by accelerate's own launcher (torchrun
underneath: gloo on CPU, nccl on CUDA), or under an accelerate config file (`--accelerate-config`: FSDP,
DeepSpeed, several machines; configs/accelerate/ has examples).

This process checks the recipe and the data and builds what is built once (the twin) before any process starts,
picks the run folder and hands it to the processes, then turns the way they ended into one line and an exit
status: a user's mistake (2) is printed by the process that found it; a process killed from outside stops the
others, and the line says which one, and where the run can continue from.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
from pathlib import Path

from pipeline.errors import EXIT_SIGNAL, Interrupted, RunFailed, UserError
from pipeline.training import guard
from pipeline.training.run import locate

LAUNCHED = "TWIN_DPO_LAUNCHED"  # set for the processes `--nproc` starts


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launcher_args(nproc: int, config_file: str | None, child_argv: list[str]) -> list[str]:
    """accelerate launch's arguments for `python -m pipeline <child_argv>` on `nproc` processes."""
    if config_file:  # the user's distributed setup; the process count still comes from --nproc
        head = ["--config_file", str(config_file), "--num_processes", str(nproc)]
    else:
        # "multi_gpu" is accelerate's name for its torchrun path; without CUDA the processes join over gloo
        head = ["--multi_gpu", "--num_processes", str(nproc), "--num_machines", "1"]
        head += ["--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(_free_port())]
    return [*head, "-m", "pipeline", *child_argv]


def run(nproc: int, config_file: str | None, child_argv: list[str], run_dir: Path, resume_line: str) -> None:
    """Start the processes and wait; raises RunFailed / Interrupted with the line a user needs, else returns."""
    from accelerate.commands.launch import launch_command, launch_command_parser
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    # their notices ("Received 2 death signal, shutting down workers") would bury the processes' own lines; torch's
    # elastic loggers set their own level from LOGLEVEL when their module is imported, so set both
    os.environ.setdefault("LOGLEVEL", "ERROR")
    import torch.distributed.run  # noqa: F401  (imports the elastic agent's modules, and their loggers, now)

    for name in list(logging.Logger.manager.loggerDict):
        if name.startswith(("torch.distributed.elastic", "torch.distributed.run", "accelerate")):
            logging.getLogger(name).setLevel(logging.CRITICAL)
    args = launch_command_parser().parse_args(launcher_args(nproc, config_file, child_argv))
    os.environ[LAUNCHED] = "1"  # for the processes: they leave the resume line to this one
    try:
        launch_command(args)
    except SignalException as stop:  # Ctrl-C / SIGTERM here: the processes got it too and saved a checkpoint
        signum = stop.sigval if stop.sigval in EXIT_SIGNAL else signal.SIGTERM
        raise Interrupted(signum, guard.latest_checkpoint(run_dir / "checkpoints")) from None
    except ChildFailedError as failed:
        first_rank, first = failed.get_first_failure()
        code = first.exitcode
        stopped = {status: signum for signum, status in EXIT_SIGNAL.items()}
        if code in stopped:  # a signal asked the processes to stop: they saved a checkpoint
            raise Interrupted(stopped[code], guard.latest_checkpoint(run_dir / "checkpoints")) from None
        if code in (2, 3):
            raise SystemExit(code) from None  # that process printed what happened
        last = guard.latest_checkpoint(run_dir / "checkpoints")
        how = f"was killed by {signal.Signals(-code).name}" if code < 0 else f"failed (exit status {code}; see above)"
        where = (
            f"the newest complete checkpoint is {last}; continue with:\n  {resume_line}"
            if last
            else "no checkpoint was complete; start again"
        )
        raise RunFailed(f"process rank {first_rank} {how}; the other processes were stopped; {where}") from None
    finally:
        os.environ.pop(LAUNCHED, None)


def train(args, recipe) -> Path:
    """`train --nproc N`: check and build here (once), then train on N processes; returns the run folder."""
    from pipeline.training import distributed, prepare

    prepare.begin(recipe)
    prep = prepare.prepare(prepare.with_max_steps(recipe, args.max_steps))  # fails here, before N processes start
    problems = distributed.check(prep.recipe, prep.backend.name, distributed.engine_from_config(args.accelerate_config))
    if problems:
        raise UserError(problems)
    # the run folder as one process would pick it (a new one, or the run to resume once its recipe is checked)
    run_dir, _ = locate(prep.recipe, args.run_dir, args.resume, args.force)
    child = [args.recipe, *(f"--set={o}" for o in args.overrides), "--no-answers"]  # answered here, afterwards
    child += ["--no-eval"] if args.no_eval else []
    child += ["--max-steps", str(args.max_steps)] if args.max_steps is not None else []
    child += ["--resume", str(run_dir)] if args.resume else ["--run-dir", str(run_dir)]
    child += ["--force"] if args.force else []
    again = (
        guard.resume_command("train", args.recipe, args.overrides, args.max_steps, run_dir) + f" --nproc {args.nproc}"
    )
    print(f"[twin-dpo] starting {args.nproc} processes (accelerate launch); run folder {run_dir}", flush=True)
    run(args.nproc, args.accelerate_config, ["train", *child], run_dir, again)
    return run_dir
