"""The wire between a job running on a Ray cluster and the server that owns it: frames in the Ray job's log.

The server and the cluster share no filesystem, and the Jobs API gives one channel from a running job back to
its submitter: the log. So the job prints everything the server must record as frames, one line each
(`@fts-frame ` and a JSON object), between the ordinary lines of its log:

| frame | what it carries |
|---|---|
| `report` | `figures` (step, loss, phase...) and whether they are an `event` (a point of the loss curve) |
| `rewind` | `step`: a resumed run continues from a checkpoint there (later events of an earlier attempt go) |
| `tree`, `tree_end` | a folder as a tar stream in base64 chunks, then its size and sha256, and where it goes (`dest`) |
| `tree_ref` | the same folder put in object storage instead (`FTS_RAY_STORAGE`), by id, with its size and sha256 |
| `checkpoint` | `path`: the checkpoint folder just sent is the latest resumable one |
| `result` | how the job ended: `state` (succeeded, failed, stopped), `error`, `artifacts` |

Large folders (a merged 16-bit model, checkpoints of a big base) are better not sent through a log: with
`Storage` (an object store or filesystem both sides reach, as Ray Train's own `storage_path`), a folder is
uploaded as one object under the Ray job's prefix and only its reference travels in the log; the server fetches
it, checks it the same way and deletes it.

Paths in frames are relative to the job's two roots: `work/` (the job's folder) and `output/` (a merge job's
output folder). `Receiver` is the server's side: it checks every frame as input from a remote party (paths stay
inside the roots, tar members are plain files and folders, sizes and hashes match), then places each folder
atomically.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import os
import re
import shutil
import tarfile
import tempfile
import time
from collections.abc import Callable
from pathlib import Path, PurePosixPath
from typing import Any, BinaryIO

from fts_mcp.errors import FtsError
from fts_mcp.files import sha256_file
from fts_mcp.jobs.records import Artifacts

MARK = "@fts-frame "  # also written by `entry.fail`, which may not import this module
CHUNK_BYTES = 48 * 1024  # 64 KiB of base64 per log line
LINE_LIMIT = 1024 * 1024  # a longer log line is cut there (a frame that long is refused)
MAX_MEMBERS = 100_000  # entries in one folder
TREE_ID = re.compile(r"[0-9a-f]{12}")  # whole-string: fullmatch
FETCH_ATTEMPTS = 4
ROOTS = ("work", "output")
# What the server keeps in a job's folder itself; a job cannot send these.
SERVER_OWNED = frozenset({"spec.json", "result.json", "worker.log", ".incoming", "ray-package"})
PATH_FIELDS = ("adapter_dir", "checkpoint_dir", "loss_curve", "metrics", "output_dir")

Emit = Callable[[dict[str, Any]], None]


class BadFrame(FtsError):
    """A frame from the cluster is malformed or points outside the job's folders."""

    code = "bad_frame"


def encode(frame: dict[str, Any]) -> str:
    return MARK + json.dumps(frame, separators=(",", ":")) + "\n"


def decode(line: str) -> dict[str, Any] | None:
    """The frame on this log line, or None for an ordinary line."""
    if not line.startswith(MARK):
        return None
    try:
        frame = json.loads(line[len(MARK):])
    except ValueError:
        raise BadFrame(f"unreadable frame: {line[:120]!r}") from None
    if not isinstance(frame, dict) or not isinstance(frame.get("t"), str):
        raise BadFrame(f"a frame is a JSON object with a 't' field, got {line[:120]!r}")
    return frame


def check_dest(dest: Any) -> PurePosixPath:
    """A relative path under `work/` or `output/`, with no `..`, absolute part or server-owned name."""
    if not isinstance(dest, str) or not dest or "\\" in dest or "\x00" in dest:
        raise BadFrame(f"bad destination {dest!r}")
    path = PurePosixPath(dest)
    if path.is_absolute() or path.parts[0] not in ROOTS or any(p in ("..", ".", "") for p in path.parts):
        raise BadFrame(f"destination {dest!r} is not inside work/ or output/")
    if path.parts[0] == "work" and len(path.parts) > 1 and path.parts[1] in SERVER_OWNED:
        raise BadFrame(f"destination {dest!r} would replace the server's own {path.parts[1]}")
    return path


class Storage:
    """Objects under one Ray job's prefix in FTS_RAY_STORAGE (any URI pyarrow's filesystems open: s3://, gs://,
    hdfs://, abfs://, or a folder both sides mount)."""

    def __init__(self, uri: str, prefix: str) -> None:
        from pyarrow import fs  # lazy: only jobs that use storage need pyarrow

        self.uri, self.prefix = uri, prefix
        self.fs, base = fs.FileSystem.from_uri(uri)
        self.base = f"{base.rstrip('/')}/{prefix}"

    def key(self, name: str) -> str:
        return f"{self.base}/{name}"

    def upload(self, source: BinaryIO, name: str) -> None:
        self.fs.create_dir(self.base, recursive=True)
        with self.fs.open_output_stream(self.key(name)) as target:
            shutil.copyfileobj(source, target, CHUNK_BYTES * 16)

    def download(self, name: str, local: Path, limit: int) -> tuple[int, str]:
        """Copy an object to `local`, stopping past `limit` bytes; (bytes, sha256)."""
        digest, size = hashlib.sha256(), 0
        with self.fs.open_input_stream(self.key(name)) as source, local.open("wb") as target:
            while chunk := source.read(CHUNK_BYTES * 16):
                size += len(chunk)
                if size > limit:
                    raise BadFrame("the job sent back more than the server accepts from one job")
                digest.update(chunk)
                target.write(chunk)
        return size, digest.hexdigest()

    def delete(self, name: str) -> None:
        self.fs.delete_file(self.key(name))

    def clear(self) -> None:
        self.fs.delete_dir(self.base)


# ---- the cluster's side -------------------------------------------------------------------------------------


def send_tree(emit: Emit, folder: Path, dest: str, *, skip: Callable[[Path], bool] = lambda p: False,
              storage: Storage | None = None) -> None:
    """Send `folder` (what `skip` leaves of it) as frames, to be placed at `dest` on the server: in the log, or
    through `storage` with only its reference in the log."""
    check_dest(dest)
    tree_id = hashlib.sha256(f"{dest}{os.getpid()}{os.urandom(8).hex()}".encode()).hexdigest()[:12]
    with tempfile.TemporaryFile() as packed:
        with tarfile.open(fileobj=packed, mode="w") as tar:
            for path in sorted(folder.rglob("*")):
                relative = path.relative_to(folder)
                if skip(relative) or any(skip(parent) for parent in relative.parents if parent != Path(".")):
                    continue
                if path.is_file() and not path.is_symlink():
                    tar.add(path, arcname=str(relative), recursive=False)
                elif path.is_dir() and not path.is_symlink():
                    tar.add(path, arcname=str(relative), recursive=False)
        packed.seek(0)
        digest, size, n = hashlib.sha256(), 0, 0
        while chunk := packed.read(CHUNK_BYTES):
            digest.update(chunk)
            size += len(chunk)
            if storage is None:
                emit({"t": "tree", "id": tree_id, "dest": dest, "n": n, "data": base64.b64encode(chunk).decode()})
                n += 1
        if storage is not None:
            packed.seek(0)
            storage.upload(packed, f"{tree_id}.tar")
            emit({"t": "tree_ref", "id": tree_id, "dest": dest, "bytes": size, "sha256": digest.hexdigest()})
            return
    emit({"t": "tree_end", "id": tree_id, "dest": dest, "chunks": n, "bytes": size, "sha256": digest.hexdigest()})


def relative_artifacts(artifacts: Artifacts, work: Path, output: Path | None) -> dict[str, Any]:
    """The artifacts with their paths made relative to the job's roots (`work/...`, `output/...`)."""
    def rel(value: str | None) -> str | None:
        if not value:
            return value
        path = Path(value)
        for root, base in (("output", output), ("work", work)):
            if base is not None and (path == base or path.is_relative_to(base)):
                return str(PurePosixPath(root, *path.relative_to(base).parts))
        raise BadFrame(f"artifact {value} is outside the job's folders")

    data = artifacts.model_dump()
    for name in PATH_FIELDS:
        data[name] = rel(data[name])
    for file in data["files"]:
        file["path"] = rel(file["path"])
    return data


# ---- the server's side --------------------------------------------------------------------------------------


class Receiver:
    """Turns the frames of one job's log into files in its folder, and hands the other frames back.

    One folder arrives at a time (the sender is sequential), as an uncompressed tar of plain files and folders;
    `max_bytes` bounds everything one job may send back, so a misbehaving cluster cannot fill the server's disk.
    """

    def __init__(self, job_dir: Path, output_dir: Path | None, *, max_bytes: int = 64 * 2**30,
                 storage: Storage | None = None) -> None:
        self.job_dir = job_dir
        self.output_dir = output_dir
        self.storage = storage
        self.incoming = job_dir / ".incoming"
        self.budget = max_bytes  # bytes this job may still send
        self._open: dict[str, tuple[Any, Any, int, int]] = {}  # id -> (file, sha256, next chunk, bytes)

    def local(self, relative: str) -> Path:
        """Where a `work/...` or `output/...` path of the job lives here."""
        path = check_dest(relative)
        if path.parts[0] == "output":
            if self.output_dir is None:
                raise BadFrame(f"{relative!r}: this job has no output folder")
            return self.output_dir.joinpath(*path.parts[1:])
        return self.job_dir.joinpath(*path.parts[1:])

    def artifacts(self, data: Any) -> Artifacts:
        """The job's artifacts with their paths here, checked: each listed file is present with its hash."""
        try:
            artifacts = Artifacts.model_validate(data)
        except ValueError as exc:
            raise BadFrame(f"bad artifacts: {exc}") from None
        for name in PATH_FIELDS:
            value = getattr(artifacts, name)
            if value:
                setattr(artifacts, name, str(self.local(value)))
        for file in artifacts.files:
            file.path = str(self.local(file.path))
            path = Path(file.path)
            if not path.is_file() or path.stat().st_size != file.bytes or sha256_file(path) != file.sha256:
                raise BadFrame(f"artifact file {file.path} did not arrive whole")
        return artifacts

    def feed(self, frame: dict[str, Any]) -> dict[str, Any] | None:
        """Take a frame: folder chunks are handled here (None); any other frame is returned for the caller."""
        kind = frame["t"]
        if kind == "tree":
            self._chunk(frame)
            return None
        if kind == "tree_end":
            self._finish(frame)
            return None
        if kind == "tree_ref":
            self._fetch(frame)
            return None
        return frame

    def _fetch(self, frame: dict[str, Any]) -> None:
        """A folder put in storage: fetched within the job's budget, checked like one sent in the log, deleted."""
        tree_id, dest = self._tree_id(frame), check_dest(frame.get("dest"))
        if self.storage is None:
            raise BadFrame(f"folder {dest} was sent through storage, but this server has no FTS_RAY_STORAGE")
        if self._open:
            raise BadFrame(f"folder {dest} came while folder {next(iter(self._open))} was still arriving")
        self.incoming.mkdir(parents=True, exist_ok=True)
        packed = self.incoming / f"{tree_id}.tar"
        try:
            size, digest = self._download(f"{tree_id}.tar", packed)
            self.budget -= size
            if (size, digest) != (frame.get("bytes"), frame.get("sha256")):
                raise BadFrame(f"folder {dest} arrived damaged from storage ({size} bytes, sha256 {digest}; sent "
                               f"{frame.get('bytes')}, {frame.get('sha256')})")
            self._place(packed, dest)
        except OSError as exc:
            raise BadFrame(f"folder {dest} could not be fetched from {self.storage.uri}: {exc}") from None
        finally:
            packed.unlink(missing_ok=True)
        try:
            self.storage.delete(f"{tree_id}.tar")
        except OSError:
            pass  # the job's prefix is cleared when it ends

    def _tree_id(self, frame: dict[str, Any]) -> str:
        tree_id = frame.get("id")
        if not isinstance(tree_id, str) or not TREE_ID.fullmatch(tree_id):
            raise BadFrame(f"a folder's id is 12 hex digits, got {str(tree_id)[:40]!r}")
        return tree_id

    def _download(self, name: str, packed: Path) -> tuple[int, str]:
        """From storage, retried: one failed request (a 5xx, a reset connection) does not fail a job."""
        for attempt in range(FETCH_ATTEMPTS):
            try:
                return self.storage.download(name, packed, self.budget)
            except OSError:
                if attempt == FETCH_ATTEMPTS - 1:
                    raise
                time.sleep(2.0 * 2**attempt)
        raise AssertionError("unreachable")

    def _chunk(self, frame: dict[str, Any]) -> None:
        tree_id, n = self._tree_id(frame), frame.get("n")
        check_dest(frame.get("dest"))
        if n == 0:
            if self._open:
                raise BadFrame(f"folder {tree_id} began before folder {next(iter(self._open))} ended")
            self.incoming.mkdir(parents=True, exist_ok=True)
            self._open[tree_id] = ((self.incoming / f"{tree_id}.tar").open("wb"), hashlib.sha256(), 0, 0)
        if tree_id not in self._open or self._open[tree_id][2] != n:
            raise BadFrame(f"folder {tree_id}: chunk {n} out of order")
        fh, digest, expected, size = self._open[tree_id]
        try:
            data = base64.b64decode(frame["data"], validate=True)
        except (KeyError, TypeError, binascii.Error):
            raise BadFrame(f"folder {tree_id}: chunk {n} is not base64") from None
        size += len(data)
        self.budget -= len(data)
        if self.budget < 0:
            raise BadFrame("the job sent back more than the server accepts from one job")
        fh.write(data)
        digest.update(data)
        self._open[tree_id] = (fh, digest, expected + 1, size)

    def _finish(self, frame: dict[str, Any]) -> None:
        tree_id = self._tree_id(frame)
        dest = check_dest(frame.get("dest"))
        if tree_id not in self._open:
            raise BadFrame(f"folder {tree_id} ended without its chunks")
        fh, digest, chunks, size = self._open.pop(tree_id)
        fh.close()
        packed = self.incoming / f"{tree_id}.tar"
        try:
            if (chunks, size, digest.hexdigest()) != (frame.get("chunks"), frame.get("bytes"), frame.get("sha256")):
                raise BadFrame(f"folder {dest} arrived damaged ({chunks} chunks, {size} bytes, sha256 "
                               f"{digest.hexdigest()}; sent {frame.get('chunks')}, {frame.get('bytes')}, "
                               f"{frame.get('sha256')})")
            self._place(packed, dest)
        finally:
            packed.unlink(missing_ok=True)

    def _place(self, packed: Path, dest: PurePosixPath) -> None:
        whole_folder = dest == PurePosixPath("work")  # the job's folder itself: each entry replaces its namesake
        target = self.job_dir if whole_folder else self.local(str(dest))
        target.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.incoming-", dir=target.parent))  # same filesystem
        try:
            try:
                weighs = packed.stat().st_size
                with tarfile.open(packed, mode="r:") as tar:  # uncompressed only: no decompression bombs
                    members, size = [], 0
                    for member in tar:  # read lazily: a stream of headers alone cannot exhaust memory
                        if len(members) >= MAX_MEMBERS:
                            raise BadFrame(f"folder {dest} has more than {MAX_MEMBERS} entries")
                        if not (member.isfile() or member.isdir()) or member.issparse():
                            raise BadFrame(f"folder {dest}: {member.name!r} is not a plain file or folder")
                        size += member.size
                        if size > weighs:  # plain members hold their bytes: no sparse growth
                            raise BadFrame(f"folder {dest} unpacks to more than it weighs")
                        members.append(member)
                    tar.extractall(staging, members=members, filter="data")  # refuses absolute paths, `..`, links
            except tarfile.TarError as exc:
                raise BadFrame(f"folder {dest} is not a readable tar stream: {exc}") from None
            if whole_folder:
                for entry in sorted(staging.iterdir()):
                    if entry.name in SERVER_OWNED:
                        raise BadFrame(f"folder work/ would replace the server's own {entry.name}")
                    replace(entry, self.job_dir / entry.name)
            else:
                replace(staging, target)
        finally:
            shutil.rmtree(staging, ignore_errors=True)

    def _discard(self, tree_id: str) -> None:
        if tree_id in self._open:
            self._open.pop(tree_id)[0].close()

    def close(self) -> None:
        for tree_id in list(self._open):
            self._discard(tree_id)
        shutil.rmtree(self.incoming, ignore_errors=True)


def replace(source: Path, target: Path) -> None:
    """Put `source` at `target` by renames, so `target` is always either the old or the new one, whole."""
    if target.exists():
        old = target.with_name(f".{target.name}.old-{os.getpid()}")
        shutil.rmtree(old, ignore_errors=True) if old.is_dir() else old.unlink(missing_ok=True)
        target.rename(old)
        source.rename(target)
        shutil.rmtree(old, ignore_errors=True) if old.is_dir() else old.unlink(missing_ok=True)
    else:
        source.rename(target)


class LineBuffer:
    """Whole lines out of log text that arrives in pieces (a piece may end mid-line)."""

    def __init__(self) -> None:
        self.pending = ""

    def feed(self, text: str) -> list[str]:
        *complete, self.pending = (self.pending + text).split("\n")
        if len(self.pending) > LINE_LIMIT:  # no newline for a megabyte: cut it there (a frame that long is refused)
            complete.append(self.pending[:LINE_LIMIT])
            self.pending = ""
        return complete

    def flush(self) -> list[str]:
        rest, self.pending = self.pending, ""
        return [rest] if rest else []
