"""Where the runtime (and the one-shot tools) read adapters: a store folder, or a store URL (any static HTTP
server or CDN in front of a store folder).

Nothing a store sends is trusted: references and the index's names are checked against the store grammar,
a manifest must describe the version it was fetched as, only an adapter's own files are fetched, by plain
name, into a folder proven to lie inside the cache, never more bytes than the manifest declares, written to a
temp name and renamed only once its sha256 matches. Every load re-checks sha256 (cached by size and mtime).
Pure Python (httpx): nothing here needs torch.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import time
from pathlib import Path

import httpx
from pydantic import ValidationError

from fts_mcp.adapters.store import (
    AdapterStore,
    CorruptAdapter,
    Manifest,
    check_aliases,
    check_manifest,
    parse_ref,
    pick_version,
)
from fts_mcp.errors import FtsError, InvalidArgument
from fts_mcp.files import sha256_file

TIMEOUT = 30
INDEX_TTL_SECONDS = 5.0  # an HTTP store's index (aliases, versions) is re-read after this
MAX_INDEX_BYTES = 16 << 20


class StoreSource:
    def __init__(self, location: str | Path, cache_dir: Path) -> None:
        location = str(location)
        self.remote = location.startswith(("http://", "https://"))
        self.location = location.rstrip("/")
        self.cache_dir = Path(cache_dir).resolve()
        self.local = None if self.remote else AdapterStore(Path(location))
        self._verified: dict[Path, tuple[int, int]] = {}  # file -> (size, mtime_ns) whose sha256 matched
        self._index: tuple[float, object] | None = None  # (when fetched, index.json) of an HTTP store
        self._manifests: dict[tuple[str, str], Manifest] = {}  # versions are immutable: fetched once

    # ---- HTTP ----------------------------------------------------------------------------------------------

    def _stream(self, path: str, limit: int, sink) -> None:
        """GET `path` into `sink`, refusing more than `limit` bytes."""
        url = f"{self.location}/{path}"
        try:
            with httpx.stream("GET", url, timeout=TIMEOUT, follow_redirects=False) as response:
                if response.status_code == 404:
                    raise InvalidArgument(f"{url} not found", param="model")
                if response.status_code != 200:
                    raise FtsError(f"store answered {response.status_code} for {url}", param="model")
                got = 0
                for chunk in response.iter_bytes():
                    got += len(chunk)
                    if got > limit:
                        raise CorruptAdapter(f"{url} sent more than the {limit:,} bytes expected; refused",
                                             param="model")
                    sink(chunk)
        except httpx.HTTPError as exc:
            raise FtsError(f"cannot reach the store at {url}: {exc}", param="model") from exc

    def _get_json(self, path: str) -> object:
        parts: list[bytes] = []
        self._stream(path, MAX_INDEX_BYTES, parts.append)
        try:
            return json.loads(b"".join(parts))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise CorruptAdapter(f"{self.location}/{path} is not valid JSON", param="model") from exc

    # ---- references ----------------------------------------------------------------------------------------

    def catalogue(self) -> dict[str, dict]:
        """name -> {versions, aliases}; names and versions that break the store grammar are left out."""
        if self.local is not None:
            return {e.name: {"versions": e.versions, "aliases": e.aliases} for e in self.local.entries()}
        try:
            if self._index is None or time.monotonic() - self._index[0] > INDEX_TTL_SECONDS:
                self._index = (time.monotonic(), self._get_json("index.json"))
            raw = self._index[1]
        except InvalidArgument:
            return {}
        adapters = raw.get("adapters") if isinstance(raw, dict) else None
        if not isinstance(adapters, dict):
            raise CorruptAdapter(f"{self.location}/index.json has no adapters mapping", param="model")
        out = {}
        for name, entry in adapters.items():
            try:
                parse_ref(name)
                versions = [parse_ref(f"{name}@{v}")[1] for v in entry["versions"]]
                aliases = check_aliases(entry.get("aliases", {}), f"{self.location}/index.json")
            except (InvalidArgument, CorruptAdapter, KeyError, TypeError):
                continue
            out[name] = {"versions": versions, "aliases": aliases}
        return out

    def resolve(self, ref: str, *, param: str = "model") -> Manifest:
        if self.local is not None:
            return self.local.resolve(ref, param=param)
        name, version, alias = parse_ref(ref, param=param)
        catalogue = self.catalogue()
        entry = catalogue.get(name, {"versions": [], "aliases": {}})
        version = pick_version(name, version, alias, sorted(entry["versions"], key=lambda v: int(v[1:])),
                               entry["aliases"], param=param, known=sorted(catalogue))
        if (name, version) not in self._manifests:
            raw = self._get_json(f"{name}/{version}/manifest.json")
            try:
                manifest = Manifest.model_validate(raw)
            except ValidationError as exc:
                raise CorruptAdapter(f"{self.location}/{name}/{version}/manifest.json is not a valid manifest",
                                     param="model") from exc
            self._manifests[(name, version)] = check_manifest(manifest, name, version,
                                                              f"{self.location}/{name}/{version}/manifest.json")
        return self._manifests[(name, version)]

    # ---- files ---------------------------------------------------------------------------------------------

    def folder(self, manifest: Manifest) -> Path:
        """A local folder with the version's files, every sha256 checked (URL stores are downloaded once)."""
        ref = f"{manifest.name}@{manifest.version}"
        check_manifest(manifest, manifest.name, manifest.version, ref)
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
                    self._download(f"{manifest.name}/{manifest.version}/{file_name}", target, expected.bytes,
                                   expected.sha256, ref)
        for file_name, expected in manifest.files.items():
            self._verify(folder / file_name, expected.sha256, ref)
        return folder

    def _download(self, path: str, target: Path, size: int, sha256: str, ref: str) -> None:
        target.parent.mkdir(parents=True, exist_ok=True)
        digest = hashlib.sha256()
        fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".part")
        try:
            with os.fdopen(fd, "wb") as fh:
                def sink(chunk: bytes) -> None:
                    digest.update(chunk)
                    fh.write(chunk)
                self._stream(path, size, sink)
            if digest.hexdigest() != sha256:
                raise CorruptAdapter(f"{ref}: {target.name} does not match its sha256 in the manifest; refused",
                                     param="model")
            os.replace(tmp, target)
        finally:
            Path(tmp).unlink(missing_ok=True)

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
