"""llama.cpp's own GGUF converters, taken from the pinned llama-cpp-python source distribution and run as subprocesses.

The sdist that `make setup-gguf` builds llama.cpp from also carries `convert_hf_to_gguf.py` (with its
`conversion/` package, ~225 architectures), `convert_lora_to_gguf.py` and the `gguf-py` they were written
against. They are extracted once, after the sdist's sha256 is checked against constraints/llama-cpp-sdist.txt,
into `.cache/llama.cpp-converters-<version>/`, beside the list of text architectures the converter registers.
The converter, the quantizer and the runtime that loads the file are therefore one source tree.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path
from typing import Any

from pipeline.errors import ExportFailed, UserError
from pipeline.storage import CHECKOUT, cache_root, pip_download, sha256_file, write_json_atomic

PIN_FILE = CHECKOUT / "constraints" / "llama-cpp-sdist.txt"
VERSION = "0.3.36"
SDIST = f"llama_cpp_python-{VERSION}.tar.gz"
VENDOR = f"llama_cpp_python-{VERSION}/vendor/llama.cpp/"
MEMBERS = ("convert_hf_to_gguf.py", "convert_lora_to_gguf.py", "conversion/", "gguf-py/")
ARCH_FILE = "text-architectures.json"
COMMON = tuple(  # named in the message for an architecture the converter does not write
    f"{n}ForCausalLM"
    for n in ("Llama", "Mistral", "Qwen2", "Qwen3", "Qwen3Moe", "Gemma", "Gemma2", "Gemma3", "Phi3", "Olmo2", "Olmoe")
)
# convert_hf_to_gguf.py writes these directly; K-quants come from llama.cpp's quantizer (export/gguf_files.py)
OUTTYPES = ("f16", "bf16", "q8_0")
# llama.cpp names a byte-level BPE pre-tokenizer by the hash of one probe text's token ids, so a tokenizer it has
# not seen (a new model's, or one transformers rebuilds from its class) is refused even when a known split is
# exactly right. twin-dpo then tries these, in order, and takes the first under which llama.cpp tokenizes the
# probe texts exactly like transformers (export/proofs.py); the f16 proof checks the prompts again.
PRE_CANDIDATES = (
    "smollm", "qwen2", "llama-bpe", "gpt-2", "default", "deepseek-llm", "deepseek-coder", "starcoder", "falcon",
    "gpt-4o", "tekken", "olmo", "refact", "command-r",
)  # fmt: skip
UNKNOWN_PRE = "BPE pre-tokenizer was not recognized"


class UnknownPreTokenizer(ExportFailed):
    """llama.cpp's converter does not know the tokenizer's pre-tokenizer by hash (see PRE_CANDIDATES)."""


def pinned() -> tuple[str, str]:
    """(requirement, sha256) from constraints/llama-cpp-sdist.txt."""
    for line in PIN_FILE.read_text(encoding="utf-8").splitlines():
        match = re.match(r"^\s*(llama-cpp-python==\S+)\s+--hash=sha256:([0-9a-f]{64})", line)
        if match:
            return match.group(1), match.group(2)
    raise UserError(f"{PIN_FILE}: no 'llama-cpp-python==X --hash=sha256:...' line; restore it from git")


def sdist_dir() -> Path:
    """Where the verified sdist is kept: once per machine, like the llama.cpp wheel built from it."""
    return Path(os.environ.get("TWIN_DPO_SDIST_DIR", Path.home() / ".cache" / "twin-dpo" / "sdist")).expanduser()


def sdist(download: bool = True) -> Path:
    """The pinned sdist, its hash checked; downloaded once (pip, no build) when missing and `download` is set."""
    requirement, sha = pinned()
    path = sdist_dir() / SDIST
    if path.is_file():
        got = sha256_file(path)
        if got == sha:
            return path
        raise UserError(f"{path} has sha256 {got}, expected {sha}; delete it and run `make setup-gguf` again")
    if not download:
        raise UserError(f"llama.cpp's converters come from {path}, which is missing; run `make setup-gguf`")
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=path.parent) as tmp:
        got = pip_download(requirement, Path(tmp), sha, "llama.cpp's GGUF converters", source=True)
        os.replace(got, path)
    return path


def tools_dir() -> Path:
    return cache_root() / f"llama.cpp-converters-{VERSION}"


def ensure(download: bool = False) -> Path:
    """The extracted converters (extracting them from the verified sdist the first time)."""
    out = tools_dir()
    if (out / ARCH_FILE).is_file():
        return out
    archive = sdist(download)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        with tarfile.open(archive) as tar:
            wanted = [m for m in tar.getmembers() if m.name.startswith(VENDOR) and _wanted(m.name[len(VENDOR) :])]
            for member in wanted:
                member.name = member.name[len(VENDOR) :]
            tar.extractall(tmp, members=wanted, filter="data")
        listing = _run(
            [sys.executable, "-c", _LIST_ARCHITECTURES, str(tmp)], "list the converter's architectures", cwd=tmp
        )
        write_json_atomic(tmp / ARCH_FILE, json.loads(listing.stdout))
        shutil.rmtree(out, ignore_errors=True)
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def _wanted(relative: str) -> bool:
    return any(relative == m or (m.endswith("/") and relative.startswith(m)) for m in MEMBERS)


_LIST_ARCHITECTURES = (
    "import json, sys; sys.path[:0] = [sys.argv[1], sys.argv[1] + '/gguf-py']; import conversion; "
    "print(json.dumps(sorted(conversion.TEXT_MODEL_MAP)))"
)


def architectures() -> list[str]:
    return json.loads((ensure() / ARCH_FILE).read_text(encoding="utf-8"))


def architecture_of(config: dict[str, Any]) -> str:
    """The class name llama.cpp's converter dispatches on: config `architectures[0]` (text_config's if present),
    else the causal-LM class transformers saves for the model type."""
    text = config.get("text_config") or {}
    for names in (text.get("architectures"), config.get("architectures")):
        if names:
            return names[0]
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    model_type = config.get("model_type", "?")
    return MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(model_type, model_type)


def check_architecture(config: dict[str, Any]) -> str:
    """The architecture, if llama.cpp's converter writes it; else one line naming it and what is supported."""
    arch = architecture_of(config)
    known = architectures()
    if arch not in known:
        common = [name.removesuffix("ForCausalLM") for name in COMMON if name in known]
        raise UserError(
            f"GGUF export: architecture '{arch}' (model_type '{config.get('model_type', '?')}') is not one that "
            f"llama.cpp's converter ({VERSION}) writes; it writes {len(known)}, among them {', '.join(common)}; "
            "export without GGUF with --set export.formats=adapter,merged"
        )
    return arch


# Settings a family's converter accepts but llama.cpp's runtime does not compute (the f16 proof would fail after a
# minute of merging): (model_type, config key, value) -> what llama.cpp does instead.
COMPUTES_DIFFERENTLY = {
    ("qwen3_moe", "norm_topk_prob", False): "llama.cpp always renormalizes the chosen experts' weights, as the "
    "released Qwen3-MoE models do (norm_topk_prob true)",
    ("olmoe", "norm_topk_prob", True): "llama.cpp never renormalizes the chosen experts' weights, as the released "
    "OLMoE models do not (norm_topk_prob false)",
}


def check_settings(config: dict[str, Any]) -> None:
    for (model_type, key, value), instead in COMPUTES_DIFFERENTLY.items():
        if config.get("model_type") == model_type and config.get(key, value) == value:
            raise UserError(
                f"GGUF export: this {model_type} model has {key}={json.dumps(value)}, which llama.cpp does not "
                f"compute ({instead}), so its GGUF would answer differently; export without GGUF with "
                "--set export.formats=adapter,merged"
            )


def convert(folder: Path, out: Path, outtype: str = "f16", pre: str | None = None, vocab_only: bool = False) -> Path:
    """A Hugging Face folder -> one GGUF file (written beside `out`, renamed into place when complete). `pre` names
    the pre-tokenizer to write when llama.cpp does not recognize the tokenizer by its hash."""
    if outtype not in OUTTYPES:
        raise ValueError(f"outtype {outtype!r} is not one of {OUTTYPES}")
    args = [str(folder), "--outtype", outtype] + (["--vocab-only"] if vocab_only else [])
    return _write("convert_hf_to_gguf.py", args, out, f"convert {folder.name} to GGUF {outtype}", pre)


def _write(script: str, args: list[str], out: Path, what: str, pre: str | None) -> Path:
    """Run one of llama.cpp's converters (through converter_shim.py) into a temporary file beside `out`, renamed
    into place when it finished."""
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    try:
        argv = [sys.executable, str(Path(__file__).with_name("converter_shim.py")), str(ensure() / script)]
        _run(argv + args + ["--outfile", str(tmp)], what, pre=pre)
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    return out


def convert_lora(adapter: Path, base: Path, out: Path, outtype: str = "f16", pre: str | None = None) -> Path:
    """A PEFT LoRA adapter folder -> a GGUF LoRA file for llama.cpp / Ollama (`ADAPTER`), against `base`'s config."""
    args = [str(adapter), "--base", str(base), "--outtype", outtype]
    return _write("convert_lora_to_gguf.py", args, out, f"convert the LoRA adapter {adapter} to GGUF", pre)


def _run(argv: list[str], what: str, cwd: Path | None = None, pre: str | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "TQDM_DISABLE": "1", "HF_HUB_OFFLINE": "1"}
    if pre is not None:
        env["TWIN_DPO_GGUF_PRE"] = pre
    env.pop("NO_LOCAL_GGUF", None)  # the converter must use the gguf-py it was written against
    done = subprocess.run(argv, capture_output=True, text=True, cwd=cwd, env=env)
    if done.returncode != 0:
        lines = [ln for ln in done.stderr.strip().splitlines() if ln.strip()]
        reason = next((ln for ln in reversed(lines) if "Error" in ln or "error" in ln), lines[-1] if lines else "")
        if UNKNOWN_PRE in done.stderr:
            raise UnknownPreTokenizer(f"GGUF: llama.cpp's converter could not {what}: {UNKNOWN_PRE}")
        raise ExportFailed(f"GGUF: llama.cpp's converter could not {what}: {reason.strip()}")
    return done
