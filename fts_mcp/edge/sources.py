"""Where the runtime reads adapters: a store folder or a store URL (any static HTTP server or CDN).

Every file's sha256 is checked against the manifest before use; URL stores are cached locally by version.
Pure Python (urllib): the runtime process imports torch, but nothing here needs it.
"""

from __future__ import annotations

import json
import os
import urllib.error
import urllib.request
from pathlib import Path

from fts_mcp.edge.store import AdapterStore, Manifest, UnknownAdapter, parse_ref, version_key
from fts_mcp.errors import FtsError, InvalidArgument
from fts_mcp.io import sha256_file

TIMEOUT = 30


class CorruptAdapter(FtsError):
    code = "corrupt_adapter"


class StoreSource:
    def __init__(self, location: str, cache_dir: Path) -> None:
        self.remote = location.startswith(("http://", "https://"))
        self.location = location.rstrip("/")
        self.cache_dir = cache_dir
        self.local = None if self.remote else AdapterStore(Path(location))
        self._verified: dict[Path, tuple[int, int]] = {}  # file -> (size, mtime_ns) whose sha256 matched

    def _get(self, path: str) -> bytes:
        url = f"{self.location}/{path}"
        try:
            with urllib.request.urlopen(url, timeout=TIMEOUT) as response:
                return response.read()
        except urllib.error.HTTPError as exc:
            if exc.code == 404:
                raise InvalidArgument(f"{url} not found", param="model") from exc
            raise FtsError(f"store answered {exc.code} for {url}", param="model") from exc
        except (urllib.error.URLError, TimeoutError, OSError) as exc:
            raise FtsError(f"cannot reach the store at {url}: {exc}", param="model") from exc

    def catalogue(self) -> dict[str, dict]:
        """name -> {versions, aliases}."""
        if self.local is not None:
            return {n: {"versions": self.local.versions(n), "aliases": self.local.aliases(n)}
                    for n in self.local.names() if self.local.versions(n)}
        try:
            return json.loads(self._get("index.json"))["adapters"]
        except InvalidArgument:
            return {}

    def resolve(self, ref: str) -> Manifest:
        if self.local is not None:
            return self.local.resolve(ref)
        name, version, alias = parse_ref(ref)
        entry = self.catalogue().get(name)
        if entry is None:
            raise UnknownAdapter(f"no adapter named {name!r} in the store", param="model")
        if alias is not None:
            version = entry["aliases"].get(alias)
            if version is None:
                raise UnknownAdapter(f"{name} has no alias {alias!r}", param="model")
        version = version or entry["aliases"].get("latest") or max(entry["versions"], key=version_key)
        if version not in entry["versions"]:
            raise UnknownAdapter(f"{name} has no version {version}", param="model")
        return Manifest.model_validate_json(self._get(f"{name}/{version}/manifest.json"))

    def folder(self, manifest: Manifest) -> Path:
        """A local folder with the version's files, every sha256 checked (URL stores are downloaded once)."""
        if self.local is not None:
            folder = self.local.root / manifest.name / manifest.version
        else:
            folder = self.cache_dir / manifest.name / manifest.version
            for file_name, expected in manifest.files.items():
                target = folder / file_name
                if target.is_file() and target.stat().st_size == expected.bytes:
                    continue
                data = self._get(f"{manifest.name}/{manifest.version}/{file_name}")
                folder.mkdir(parents=True, exist_ok=True)
                tmp = target.with_suffix(target.suffix + ".part")
                tmp.write_bytes(data)
                os.replace(tmp, target)
        for file_name, expected in manifest.files.items():
            self._verify(folder / file_name, expected.sha256, f"{manifest.name}@{manifest.version}")
        return folder

    def _verify(self, path: Path, sha256: str, ref: str) -> None:
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
