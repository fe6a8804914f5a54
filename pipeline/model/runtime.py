"""The process a run lives in: quiet libraries, allocator, threads, and the facts every summary records
(versions, device, peak memory). torch and the libraries are imported inside the functions: on the unsloth
path they must be imported after unsloth (pipeline/model/unsloth.py)."""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import mmap
import os
import platform
import resource
import sys
import warnings
from importlib import metadata


def quiet_imports() -> None:
    """What must be set before the libraries are imported; cheap, imports nothing (the CLI calls it first)."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    # bitsandbytes logs on import that an optional CPU kernel package (`kernels`) is missing; we do not use that
    # kernel, so the notice must not reach the user
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)


def quiet_libraries() -> None:
    """Keep the terminal for our progress bar and messages."""
    quiet_imports()
    import datasets
    import transformers

    # transformers' own deprecation notices (e.g. `is_gradient_checkpointing`) are for library authors, not users
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"(transformers|trl|peft|accelerate)(\.|$)")
    warnings.filterwarnings("ignore", message=r".*gradient_checkpointing.*", category=FutureWarning)
    datasets.disable_progress_bars()
    datasets.logging.set_verbosity_error()
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()


def release_pages(tensor) -> None:
    """Hand the memory pages that lie wholly inside `tensor`'s bytes back to the system (Linux madvise
    DONTNEED); afterwards its values are gone (zeros, or the file's for a file mapping): only for a tensor nothing
    reads again. A model loaded from safetensors keeps its weights in a private mapping of the file, shared by
    all of them, so dropping one weight's tensor frees nothing until this."""
    if sys.platform != "linux":
        return
    page = mmap.PAGESIZE
    start = -(-tensor.data_ptr() // page) * page
    end = (tensor.data_ptr() + tensor.numel() * tensor.element_size()) // page * page
    if end > start:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        libc.madvise(ctypes.c_void_p(start), ctypes.c_size_t(end - start), 4)  # MADV_DONTNEED


def tune_allocator() -> str:
    """Serve tensors of 8 MB and more from mmap (returned to the OS when freed) instead of glibc's heap.

    glibc raises its mmap threshold as large blocks are freed, so the variable-size activations of a training
    run fragment the heap and the RSS creeps up. A fixed threshold stops that; but every mmap'd tensor is
    page-faulted in afresh, which long sequences pay for: one fwd + bwd step at 1,024 tokens x 2 pairs (bf16,
    Dec 3) took 21-25 s with a 4 MB threshold, 17.6-19.7 s with 16 MB, 15-17 s with glibc's default, at peaks
    of 5.7, 5.7 and 6.2 GB; whole `dpo_lora` runs at 1,024 x 4 stepped in 57 s (4 MB), 46 s (8 MB), 36 s
    (16 MB) at peaks of 7.4, 9.0 and 9.8 GB (TRL's: 92.6 s, 9.2 GB): 8 MB is the largest threshold tried that
    stays under TRL's peak there. `make bench` measures it (ablation: "glibc's default allocator thresholds").
    TWIN_DPO_MMAP_THRESHOLD_MB sets it (0: glibc's default).
    """
    mb = int(os.environ.get("TWIN_DPO_MMAP_THRESHOLD_MB", "8") or 0)
    if mb <= 0:
        return "glibc default"
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        if libc.mallopt(-3, mb << 20) != 1:  # M_MMAP_THRESHOLD
            return "glibc default"
    except (OSError, AttributeError):  # not glibc (macOS, musl): nothing to tune
        return "system default"
    return f"mmap threshold {mb} MB"


def set_threads(threads: int) -> int:
    """torch's CPU threads: the recipe's `train.threads`, or one per CPU this process may run on. With several
    processes on one machine (torch.distributed's LOCAL_WORLD_SIZE) the CPUs are split between them, each process
    pinned to its own share: two processes each using every core slow each other down 8-16x here."""
    import torch

    cpus = sorted(os.sched_getaffinity(0))
    share = max(1, len(cpus) // int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    if share < len(cpus) and not threads:
        local = int(os.environ.get("LOCAL_RANK", "0"))
        os.sched_setaffinity(0, cpus[local * share : (local + 1) * share] or cpus[-share:])
    n = threads or share
    torch.set_num_threads(n)
    return n


def versions() -> dict[str, str | None]:
    out: dict[str, str | None] = {}
    for name in (
        "torch",
        "transformers",
        "trl",
        "peft",
        "bitsandbytes",
        "accelerate",
        "datasets",
        "unsloth",
        "unsloth_zoo",
    ):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    out["python"] = platform.python_version()
    return out


def peak_memory(device: str) -> tuple[int, str]:
    """(bytes, what was measured): CUDA max allocated on GPU, else this process's peak RSS.

    On Linux the peak is VmHWM, the high-water mark of this program's own address space. getrusage's ru_maxrss
    is not: Linux carries it over a fork and an exec, so a run started by a big process (`make bench` after
    building the twin in-process: 3.4 GB) reported that process's peak as its own."""
    if device == "cuda":
        import torch

        return int(torch.cuda.max_memory_allocated()), "torch.cuda.max_memory_allocated"
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024, "peak RSS (VmHWM)"
    except OSError:
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # kilobytes, bytes on macOS
    return peak * (1 if platform.system() == "Darwin" else 1024), "peak RSS (ru_maxrss)"


def device_name(device: str) -> str:
    if device == "cuda":
        import torch

        return torch.cuda.get_device_name(0)
    return f"{platform.processor() or platform.machine()} CPU, {os.cpu_count()} cores"
