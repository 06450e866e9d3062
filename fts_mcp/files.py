"""Atomic artifact writes (temp file in the same folder, then rename) and artifact fingerprints."""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any

from pydantic import BaseModel


class ArtifactFile(BaseModel):
    """One file of a finished artifact (a job's output, a store version): where, how big, its sha256."""

    path: str
    bytes: int
    sha256: str


def write_bytes_atomic(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json_atomic(path: Path, data: Any) -> None:
    write_bytes_atomic(path, (json.dumps(data, indent=2, sort_keys=True) + "\n").encode())


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def artifact_files(folder: Path) -> list[ArtifactFile]:
    """Every file of a finished artifact folder with its size and sha256, for the job's `artifacts.files`."""
    return [artifact_file(p) for p in sorted(folder.iterdir()) if p.is_file()]


def artifact_file(path: Path) -> ArtifactFile:
    """One file of an artifact, with its size and sha256 as it is now."""
    return ArtifactFile(path=str(path), bytes=path.stat().st_size, sha256=sha256_file(path))
