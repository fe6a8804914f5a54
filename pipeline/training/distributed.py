"""Several processes through accelerate: who this process is, and the few collectives twin-dpo itself needs.

A run on N processes is started by accelerate's launcher (`--nproc N`, or `accelerate launch -m pipeline train`
with the user's config); torch.distributed's environment (RANK, WORLD_SIZE, LOCAL_RANK) says which process this
is. Each process trains on its share of every global batch (accelerate shards the loader), and the gradients
are averaged (DDP; FSDP / DeepSpeed through accelerate's config). twin-dpo's own duties across processes:
- one run folder: rank 0 picks it, locks it and writes every file in it; the others are told its path;
- one reference pass: each rank computes every N-th batch, the results are gathered, rank 0 writes the cache;
- one view: only rank 0 prints, draws progress bars and logs metrics (the other ranks' stdout is silenced);
- one decision: a signal seen by any rank stops every rank at the same step.
With WORLD_SIZE unset (one process) every function here is a no-op.
"""

from __future__ import annotations

import contextlib
import os
import sys
from typing import Any, Iterator


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def rank() -> int:
    return int(os.environ.get("RANK", "0"))


def is_main() -> bool:
    return rank() == 0


def active() -> bool:
    return world_size() > 1


def start() -> None:
    """Join the process group (gloo on CPU, nccl on CUDA) before anything else; silence the other ranks' stdout.

    accelerate's PartialState does the joining, so the trainer's accelerator later finds the group ready."""
    if not active():
        return
    import torch
    from accelerate import PartialState

    PartialState(cpu=not torch.cuda.is_available())
    if not is_main():
        sys.stdout = open(os.devnull, "w", encoding="utf-8")  # noqa: SIM115 (lives as long as the process)


def barrier() -> None:
    if active():
        import torch.distributed as dist

        dist.barrier()


@contextlib.contextmanager
def main_first() -> Iterator[None]:
    """Rank 0 runs the block first (builds what the others then find cached: the twin, the embedded model)."""
    if not is_main():
        barrier()
    yield
    if is_main():
        barrier()


def broadcast(value: Any) -> Any:
    """Rank 0's `value`, on every rank."""
    if not active():
        return value
    import torch.distributed as dist

    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def gather(value: Any) -> list[Any]:
    """Every rank's `value`, in rank order, on every rank."""
    if not active():
        return [value]
    import torch.distributed as dist

    out: list[Any] = [None] * world_size()
    dist.all_gather_object(out, value)
    return out


def any_rank(flag: bool) -> bool:
    """True on every rank if `flag` is true on any rank (one small all-reduce)."""
    if not active():
        return flag
    import torch
    import torch.distributed as dist

    t = torch.tensor([1 if flag else 0], dtype=torch.int32)
    if dist.get_backend() == "nccl":
        t = t.cuda()
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def _engine(distributed_type) -> str:
    """fsdp, deepspeed or ddp for one of accelerate's DistributedType values."""
    name = str(distributed_type).split(".")[-1].upper()
    return "fsdp" if "FSDP" in name else "deepspeed" if "DEEPSPEED" in name else "ddp"


def kind(accelerator) -> str:
    """How the processes share the work: single, ddp, fsdp or deepspeed (accelerate's distributed type)."""
    if accelerator is None or accelerator.num_processes <= 1:
        return "single"
    return _engine(accelerator.distributed_type)


def rewrap_after_evaluation(trainer) -> None:
    """Let trainer.train() wrap the model for gradient averaging after an evaluation ran first.

    trainer.evaluate() before train() (the untouched twin's held-out numbers) has accelerate prepare the model for
    inference and flag it as prepared; train() then gets it back unwrapped, without DDP, and every process trains
    on its own shard alone (measured: the ranks' adapters parted at the first step). Clearing the flag makes
    train() wrap it."""
    if not active():
        return
    model = trainer.model
    if getattr(model, "_is_accelerate_prepared", False):
        model._is_accelerate_prepared = False
        models = trainer.accelerator._models
        models[:] = [m for m in models if m is not model]


def engine_from_launcher() -> str:
    """ddp, fsdp or deepspeed, as accelerate's launcher told the processes (before any trainer exists)."""
    if os.environ.get("ACCELERATE_USE_FSDP", "").lower() == "true":
        return "fsdp"
    if os.environ.get("ACCELERATE_USE_DEEPSPEED", "").lower() == "true":
        return "deepspeed"
    return "ddp"


def engine_from_config(path: str | None) -> str:
    """ddp, fsdp or deepspeed, as an accelerate config file asks (read with accelerate's own loader)."""
    if not path:
        return "ddp"
    from accelerate.commands.config.config_args import load_config_from_file

    return _engine(load_config_from_file(path).distributed_type)


def check(recipe, backend_name: str, engine: str | None = None) -> list[str]:
    """Combinations known not to work under several processes, as problems to report before any weight loads.
    `engine`: what a config file asks for (the launching process); else what the launcher told this process."""
    if engine is None and not active():
        return []
    engine, problems = engine or engine_from_launcher(), []
    import torch

    if engine != "ddp" and not torch.cuda.is_available():
        # accelerate 1.15 switches to FSDP / DeepSpeed only from its multi-accelerator modes, not from MULTI_CPU: on a
        # CPU the config would silently train as plain DDP (tried here: the FSDP2 config gave the DDP run's adapter)
        problems.append(
            f"the accelerate config asks for {engine}, which accelerate runs on GPUs only: on a CPU the processes "
            "would train as plain DDP; drop --accelerate-config (DDP), or run on GPUs"
        )
    if backend_name == "unsloth" and engine != "ddp":
        problems.append(
            f"model.backend=unsloth: Unsloth trains under DDP only, not {engine}; use configs/accelerate/ddp.yaml, "
            "or model.backend=hf"
        )
    if engine == "fsdp" and recipe.model.load_in_4bit:
        problems.append(
            "model.load_in_4bit=true under FSDP: 4-bit weights are not sharded by FSDP2 here (peft issue 2834); "
            "use DDP (configs/accelerate/ddp.yaml) for QLoRA, or LoRA / full DPO under FSDP"
        )
    return problems
