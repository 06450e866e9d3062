"""Atomic artifact writes (temp file in the same folder, then rename) and artifact fingerprints.

Files are created as open() creates them: 0o666 less the umask (0644 under the usual 022), or what the folder's
default ACL says — not private as tempfile.mkstemp would leave them (0600), which a static web server running as
another user could not serve from the adapter store. As with every other tool, the umask decides; a folder that
must stay private is made private as a folder (FTS_HOME 0700 keeps every job's files to their owner).
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import stat
from pathlib import Path
from typing import Any

from pydantic import BaseModel


class ArtifactFile(BaseModel):
    """One file of a finished artifact (a job's output, a store version): where, how big, its sha256."""

    path: str
    bytes: int
    sha256: str


def create_beside(path: Path, suffix: str = ".tmp") -> tuple[int, Path]:
    """A new, empty file in `path`'s folder (so renaming it onto `path` is atomic), open for writing, with the
    permissions open() would give it; its name is hidden and unique, and it is never a link someone left there."""
    path.parent.mkdir(parents=True, exist_ok=True)
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0)
    while True:
        tmp = path.parent / f".{path.name}.{secrets.token_hex(6)}{suffix}"
        try:
            return os.open(tmp, flags, 0o666), tmp
        except FileExistsError:  # 48 random bits taken already: draw again
            continue


def match_new_file_mode(path: Path) -> None:
    """Give `path` the permissions a file newly created beside it gets (the umask and a default ACL applied), for a
    file a library wrote privately through a temp file of its own (safetensors leaves 0600)."""
    fd, probe = create_beside(path, ".mode")
    try:
        mode = stat.S_IMODE(os.fstat(fd).st_mode)
    finally:
        os.close(fd)
        probe.unlink(missing_ok=True)
    os.chmod(path, mode)


def write_bytes_atomic(path: Path, data: bytes) -> None:
    """Write `path` whole or not at all (a temp file beside it, then a rename), with open()'s permissions."""
    fd, tmp = create_beside(path)
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
