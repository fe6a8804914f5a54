"""Files on disk: atomic writes, JSON, the cache folder, one content hasher. Shared by every stage.

Every write goes to a temporary name beside its target and is renamed into place when complete, so a
kill or a full disk never leaves a half-written file where a reader looks.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from pipeline.errors import UserError

CHECKOUT = Path(__file__).resolve().parent.parent


def cache_root() -> Path:
    """`$TWIN_DPO_CACHE`, else `.cache/` in the project checkout, else ~/.cache/twin-dpo."""
    if os.environ.get("TWIN_DPO_CACHE"):
        return Path(os.environ["TWIN_DPO_CACHE"]).expanduser()
    if (CHECKOUT / "pyproject.toml").is_file() and os.access(CHECKOUT, os.W_OK):
        return CHECKOUT / ".cache"
    return Path.home() / ".cache" / "twin-dpo"


def write_text_atomic(path: Path, text: str) -> None:
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with tmp.open("w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def write_json_atomic(path: Path, data: Any) -> None:
    write_text_atomic(path, json.dumps(data, indent=2, default=str) + "\n")


@contextmanager
def atomic_dir(target: Path) -> Iterator[Path]:
    """Yield a temporary sibling folder; it replaces `target` only if the block finishes."""
    target = Path(target)
    tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        yield tmp
        if target.exists():
            old = target.with_name(f".{target.name}.old-{os.getpid()}")
            target.rename(old)
            tmp.rename(target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def read_json(path: Path) -> Any:
    return json.loads(Path(path).read_text(encoding="utf-8"))


def hasher():
    """A fast 128-bit content hash (xxh3, which ships with datasets), sha256 where xxhash is missing."""
    try:
        import xxhash

        return xxhash.xxh3_128()
    except ImportError:  # pragma: no cover - xxhash comes with datasets
        import hashlib

        return hashlib.sha256()


def feed_file(h, path: Path) -> None:
    """Stream a file's bytes into the hash object `h`, 16 MB at a time."""
    with Path(path).open("rb") as handle:
        while chunk := handle.read(1 << 24):
            h.update(chunk)


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    feed_file(digest, path)
    return digest.hexdigest()


def pip_download(requirement: str, dest: Path, sha256: str, what: str, source: bool = False) -> Path:
    """Download one pinned distribution with pip into `dest` (no install, no dependencies) and check its sha256.

    `source` takes the sdist instead of a wheel. The file is returned only when its hash matches; a download that
    fails or a file with another hash is one line naming `what` it was for."""
    Path(dest).mkdir(parents=True, exist_ok=True)
    kind = "--no-binary=:all:" if source else "--only-binary=:all:"
    done = subprocess.run(
        [sys.executable, "-m", "pip", "download", "--quiet", "--disable-pip-version-check", "--no-deps", kind]
        + ["--dest", str(dest), requirement],
        capture_output=True,
        text=True,
    )
    files = [p for p in Path(dest).iterdir() if p.suffix in (".whl", ".gz")]
    if done.returncode != 0 or len(files) != 1:
        last = (done.stderr.strip().splitlines() or ["nothing downloaded"])[-1]
        raise UserError(f"could not download {requirement} for {what}: {last}; check the network or proxy")
    got = sha256_file(files[0])
    if got != sha256:
        raise UserError(f"{files[0].name} has sha256 {got}, expected {sha256}; not using it")
    return files[0]


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if abs(n) < 1024 or unit == "GB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} GB"


def dir_size(path: Path) -> int:
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())


def looks_like_hub_id(text: str) -> bool:
    """`org/name` as the Hugging Face Hub spells a model or dataset (not a local path)."""
    parts = text.split("/")
    return len(parts) == 2 and all(parts) and not text.startswith((".", "/", "~")) and "." not in parts[0]
