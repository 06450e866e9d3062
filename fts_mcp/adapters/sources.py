"""Where the runtime (and the one-shot tools) read adapters: a store folder, or a store URL (any static HTTP
server or CDN in front of a store folder).

Nothing a store sends is trusted: references and the index's names are checked against the store grammar,
a manifest must describe the version it was fetched as and declare sizes an adapter can have, only an adapter's
own files are fetched, by plain name, into a folder proven to lie inside the cache, never more bytes than the
manifest declares, written to a temp name and renamed only once its sha256 matches. Every load re-checks sha256
(cached by size and mtime).

A slow store is bounded too (`FetchLimits`): every fetch has an overall deadline, not only a timeout per read, and
runs on a fetch thread of its own, one at a time per file, shared by every caller asking meanwhile; a caller waits
for it at most its deadline. A failed fetch is remembered for a few seconds and its error answered at once; while
the index cannot be read again, the last good one serves. Pure Python (httpx): nothing here needs torch.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import os
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from concurrent.futures import TimeoutError as WaitedTooLong
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import TypeVar

import httpx
from pydantic import ValidationError

from fts_mcp.adapters.store import (
    MAX_ADAPTER_BYTES,
    AdapterStore,
    CorruptAdapter,
    Manifest,
    StoredFile,
    UnknownAdapter,
    check_aliases,
    check_manifest,
    parse_ref,
    pick_version,
    version_key,
)
from fts_mcp.errors import FtsError, InvalidArgument
from fts_mcp.files import create_beside, sha256_file

log = logging.getLogger(__name__)

MAX_INDEX_BYTES = 16 << 20
T = TypeVar("T")


@dataclass(frozen=True, kw_only=True)
class FetchLimits:
    """How long an HTTP store may take and how much it may send, and how long its failures are remembered."""

    deadline: float = 15.0
    """Seconds one fetch of the index or of a manifest may take from start to end, however the store paces its
    bytes (a store that trickles one byte at a time is cut off here)."""
    read_timeout: float = 10.0
    """Seconds to wait for the store to accept a connection or send its next bytes."""
    min_rate: int = 1 << 20
    """Bytes per second an adapter file must average: its fetch may take `deadline + bytes / min_rate` seconds."""
    retry_after: float = 5.0
    """Seconds a failed fetch is remembered and its error answered at once, without asking the store again."""
    corrupt_retry_after: float = 60.0
    """Seconds a file whose bytes did not match its manifest is not downloaded again."""
    index_ttl: float = 5.0
    """Seconds an index is used before it is read again: an alias that moved is served within this."""
    stale_wait: float = 1.0
    """Seconds a caller waits for a fresh index when an older good one can answer instead."""
    max_adapter_bytes: int = MAX_ADAPTER_BYTES
    """The largest weights file a manifest may declare; a larger one is refused before anything is downloaded."""

    def __post_init__(self) -> None:
        for name in ("deadline", "read_timeout", "min_rate", "max_adapter_bytes"):
            if not getattr(self, name) > 0:
                raise InvalidArgument(f"{name} must be above 0, not {getattr(self, name)!r}", param=name)
        for name in ("retry_after", "corrupt_retry_after", "index_ttl", "stale_wait"):
            if not getattr(self, name) >= 0:
                raise InvalidArgument(f"{name} must be 0 or more, not {getattr(self, name)!r}", param=name)


class MissingFile(InvalidArgument):
    """The store answered 404: it has no such file."""


class StoreSource:
    def __init__(self, location: str | Path, cache_dir: Path, *, limits: FetchLimits | None = None) -> None:
        location = str(location)
        self.remote = location.startswith(("http://", "https://"))
        self.location = location.rstrip("/")
        self.cache_dir = Path(cache_dir).resolve()
        self.local = None if self.remote else AdapterStore(Path(location))
        self.limits = limits or FetchLimits()
        self._verified: dict[Path, tuple[int, int]] = {}  # file -> (size, mtime_ns) whose sha256 matched
        self._index: tuple[float, dict[str, dict]] | None = None  # (when read, catalogue): the last good index
        self._manifests: dict[tuple[str, str], Manifest] = {}  # versions are immutable: fetched once
        self._lock = threading.Lock()  # the two tables below
        self._running: dict[str, Future] = {}  # store path -> its fetch under way
        self._failed: dict[str, tuple[float, FtsError]] = {}  # store path -> (until when, why) its fetch failed

    # ---- HTTP ----------------------------------------------------------------------------------------------

    def _stream(self, path: str, limit: int, sink: Callable[[bytes], None], seconds: float) -> None:
        """GET `path` into `sink`, refusing more than `limit` bytes and giving up after `seconds` in all."""
        url = f"{self.location}/{path}"
        deadline = time.monotonic() + seconds
        timeout = httpx.Timeout(min(self.limits.read_timeout, seconds))
        try:
            with httpx.stream("GET", url, timeout=timeout, follow_redirects=False) as response:
                if response.status_code == 404:
                    raise MissingFile(f"{url} not found", param="model")
                if response.status_code != 200:
                    raise FtsError(f"store answered {response.status_code} for {url}", param="model")
                got = 0
                for chunk in response.iter_bytes():
                    if time.monotonic() > deadline:
                        raise FtsError(f"the store at {self.location} did not send {path} within {seconds:g} s",
                                       param="model")
                    got += len(chunk)
                    if got > limit:
                        raise CorruptAdapter(f"{url} sent more than the {limit:,} bytes expected; refused",
                                             param="model")
                    sink(chunk)
        except httpx.TimeoutException as exc:
            raise FtsError(f"the store at {self.location} went {timeout.read:g} s without sending anything of "
                           f"{path}", param="model") from exc
        except httpx.HTTPError as exc:
            raise FtsError(f"cannot reach the store at {url}: {exc}", param="model") from exc
        except httpx.InvalidURL as exc:
            raise InvalidArgument(f"{path!r} cannot be fetched from the store at {self.location}: {exc}",
                                  param="model") from exc

    def _get_json(self, path: str) -> object:
        parts: list[bytes] = []
        self._stream(path, MAX_INDEX_BYTES, parts.append, self.limits.deadline)
        try:
            return json.loads(b"".join(parts))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise CorruptAdapter(f"{self.location}/{path} is not valid JSON", param="model") from exc

    def _shared(self, path: str, fetch: Callable[[], T], wait: float, *, corrupt_pause: float | None = None) -> T:
        """`fetch()` — the fetch of `path` — on a fetch thread: one at a time per path, shared by every caller
        asking meanwhile, each waiting for it at most `wait` seconds. A failure is remembered and raised at once
        for `limits.retry_after` seconds (`corrupt_pause` for bytes that proved wrong)."""
        with self._lock:
            failed = self._failed.get(path)
            if failed is not None and time.monotonic() < failed[0]:
                raise copy.copy(failed[1])
            future = self._running.get(path)
            if future is None:
                future = self._running[path] = Future()
                # a daemon thread: a fetch still running when the process ends must not hold up its exit
                threading.Thread(target=self._run, args=(path, fetch, future, corrupt_pause), daemon=True,
                                 name="fts-store-fetch").start()
        try:
            return future.result(timeout=wait)
        except WaitedTooLong:
            raise FtsError(f"the store at {self.location} did not send {path} within {wait:g} s",
                           param="model") from None

    def _run(self, path: str, fetch: Callable[[], T], future: Future, corrupt_pause: float | None) -> None:
        """A fetch thread: run `fetch`, remember how it ended, hand the outcome to every caller waiting."""
        try:
            result = fetch()
        except FtsError as exc:
            pause = corrupt_pause if corrupt_pause is not None and isinstance(exc, CorruptAdapter) \
                else self.limits.retry_after
            log.warning("%s (not asked again for %g s)", exc.message, pause)
            with self._lock:
                self._failed[path] = (time.monotonic() + pause, exc)
                del self._running[path]
            future.set_exception(exc)
        except Exception as exc:  # noqa: BLE001 - a thread's boundary: the callers waiting hear of it
            with self._lock:
                del self._running[path]
            future.set_exception(exc)
        else:
            with self._lock:
                self._failed.pop(path, None)
                del self._running[path]
            future.set_result(result)

    # ---- references ----------------------------------------------------------------------------------------

    def catalogue(self, *, wait: float | None = None) -> dict[str, dict]:
        """name -> {versions, aliases}; names and versions that break the store grammar are left out.

        An HTTP store's index is read again once older than `limits.index_ttl`, waiting for it at most `wait`
        seconds (by default `limits.stale_wait` when an older good index can answer instead, else
        `limits.deadline`). A read that fails or takes longer serves the last good index; without one, it raises."""
        if self.local is not None:
            return {e.name: {"versions": e.versions, "aliases": e.aliases} for e in self.local.entries()}
        last = self._index
        if last is not None and time.monotonic() - last[0] <= self.limits.index_ttl:
            return last[1]
        if wait is None:
            wait = self.limits.stale_wait if last is not None else self.limits.deadline
        try:
            return self._shared("index.json", self._read_index, wait)
        except FtsError:
            if last is None:
                raise
            return last[1]

    def _read_index(self) -> dict[str, dict]:
        """Fetch and check index.json (none yet: an empty store), and keep it as the last good index."""
        try:
            raw = self._get_json("index.json")
        except MissingFile:
            raw = {"adapters": {}}
        adapters = raw.get("adapters") if isinstance(raw, dict) else None
        if not isinstance(adapters, dict):
            raise CorruptAdapter(f"{self.location}/index.json has no adapters mapping", param="model")
        out = {}
        for name, entry in adapters.items():
            try:
                parse_ref(name)
                versions = sorted({parse_ref(f"{name}@{v}")[1] for v in entry["versions"]}, key=version_key)
                aliases = check_aliases(entry.get("aliases", {}), f"{self.location}/index.json")
            except (InvalidArgument, CorruptAdapter, KeyError, TypeError, AttributeError):
                continue
            out[name] = {"versions": versions, "aliases": aliases}
        self._index = (time.monotonic(), out)
        return out

    def resolve(self, ref: str, *, param: str = "model") -> Manifest:
        if self.local is not None:
            return self.local.resolve(ref, param=param)
        name, version, alias = parse_ref(ref, param=param)
        catalogue = self.catalogue()
        entry = catalogue.get(name, {"versions": [], "aliases": {}})
        version = pick_version(name, version, alias, entry["versions"], entry["aliases"], param=param,
                               known=sorted(catalogue))
        if (name, version) not in self._manifests:
            path = f"{name}/{version}/manifest.json"
            self._manifests[(name, version)] = self._shared(path, partial(self._read_manifest, name, version),
                                                            self.limits.deadline)
        return self._manifests[(name, version)]

    def _read_manifest(self, name: str, version: str) -> Manifest:
        source = f"{self.location}/{name}/{version}/manifest.json"
        raw = self._get_json(f"{name}/{version}/manifest.json")
        try:
            manifest = Manifest.model_validate(raw)
        except ValidationError as exc:
            raise CorruptAdapter(f"{source} is not a valid manifest", param="model") from exc
        return check_manifest(manifest, name, version, source, max_adapter_bytes=self.limits.max_adapter_bytes)

    def peek(self, ref: str) -> Manifest | None:
        """`ref`'s manifest when it is known without asking an HTTP store (a local store is read); else None."""
        if self.local is not None:
            return self.local.resolve(ref)
        last = self._index
        name, version, alias = parse_ref(ref)
        entry = last[1].get(name) if last is not None else None
        if entry is None:
            return None
        try:
            version = pick_version(name, version, alias, entry["versions"], entry["aliases"])
        except UnknownAdapter:
            return None
        return self._manifests.get((name, version))

    # ---- files ---------------------------------------------------------------------------------------------

    def folder(self, manifest: Manifest) -> Path:
        """A local folder with the version's files, every sha256 checked (URL stores are downloaded once)."""
        ref = f"{manifest.name}@{manifest.version}"
        check_manifest(manifest, manifest.name, manifest.version, ref, max_adapter_bytes=self.limits.max_adapter_bytes)
        if self.local is not None:
            folder = self.local.path(manifest.name, manifest.version)
        else:
            folder = (self.cache_dir / manifest.name / manifest.version).resolve()
            if not folder.is_relative_to(self.cache_dir):
                raise CorruptAdapter(f"{ref} leads outside the cache; refused", param="model")
            for file_name, expected in manifest.files.items():
                target = folder / file_name
                if target.parent != folder:
                    raise CorruptAdapter(f"{ref}: {file_name!r} is not a plain file name; refused", param="model")
                if not (target.is_file() and target.stat().st_size == expected.bytes):
                    path = f"{manifest.name}/{manifest.version}/{file_name}"
                    seconds = self.limits.deadline + expected.bytes / self.limits.min_rate
                    self._shared(path, partial(self._download, path, target, expected, ref, seconds), seconds,
                                 corrupt_pause=self.limits.corrupt_retry_after)
        for file_name, expected in manifest.files.items():
            self._verify(folder / file_name, expected.sha256, ref)
        return folder

    def _download(self, path: str, target: Path, expected: StoredFile, ref: str, seconds: float) -> None:
        if target.is_file() and target.stat().st_size == expected.bytes:
            return  # another caller's download of it ended just before this one began
        digest = hashlib.sha256()
        tmp = None
        try:
            fd, tmp = create_beside(target, ".part")
            with os.fdopen(fd, "wb") as fh:
                def sink(chunk: bytes) -> None:
                    digest.update(chunk)
                    fh.write(chunk)
                self._stream(path, expected.bytes, sink, seconds)
            if digest.hexdigest() != expected.sha256:
                raise CorruptAdapter(f"{ref}: {target.name} does not match its sha256 in the manifest; refused",
                                     param="model")
            os.replace(tmp, target)
        except OSError as exc:
            raise FtsError(f"cannot write {target.name} into the adapter cache {target.parent}: "
                           f"{exc.strerror or exc}", param="model") from exc
        finally:
            if tmp is not None:
                tmp.unlink(missing_ok=True)

    def _verify(self, path: Path, sha256: str, ref: str) -> None:
        if path.is_symlink():  # the folder is inside the store; each file must be too
            raise CorruptAdapter(f"{ref}: {path.name} is a link, not a file of the store; refused", param="model")
        try:
            stat = path.stat()
        except FileNotFoundError as exc:
            raise CorruptAdapter(f"{ref}: {path.name} is missing", param="model") from exc
        if self._verified.get(path) == (stat.st_size, stat.st_mtime_ns):
            return
        if sha256_file(path) != sha256:
            self._verified.pop(path, None)
            if self.remote:
                path.unlink(missing_ok=True)  # fetch again next time
            raise CorruptAdapter(f"{ref}: {path.name} does not match its sha256 in the manifest; refused",
                                 param="model")
        self._verified[path] = (stat.st_size, stat.st_mtime_ns)
