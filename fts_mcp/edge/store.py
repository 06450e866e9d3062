"""The adapter store: `name/version/` folders with PEFT's files and a manifest, plus moving aliases.

Layout (servable as-is by any static HTTP server or CDN):

    index.json                         {"adapters": {name: {"versions": [...], "aliases": {...}}}}
    <name>/aliases.json                {"latest": "v2", "prod": "v1"}
    <name>/<version>/manifest.json     name, version, base model, rank, alpha, targets, dtype, files (bytes, sha256)
    <name>/<version>/adapter_config.json
    <name>/<version>/adapter_model.safetensors

Versions are immutable: publishing other bytes under an existing version is refused, the same bytes are a
no-op. A version appears whole or not at all (written to a temp folder, then renamed). Pure Python: weight
conversion to 16 bits happens in a short-lived subprocess (`fts_mcp.edge.convert`), torch never loads here.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, Field

from fts_mcp.adapters.inspect import CONFIG, WEIGHTS, read_adapter
from fts_mcp.errors import FtsError, InvalidArgument
from fts_mcp.io import sha256_file, write_json_atomic

NAME_RE = re.compile(r"^[a-z0-9][a-z0-9._-]{0,63}$")
VERSION_RE = re.compile(r"^v[1-9][0-9]{0,8}$")
ALIAS_RE = re.compile(r"^[a-z][a-z0-9_-]{0,31}$")
StoreDtype = Literal["bfloat16", "float16", "float32"]


class UnknownAdapter(InvalidArgument):
    """The reference names no adapter, version or alias in the store."""

    code = "model_not_found"


class StoredFile(BaseModel):
    bytes: int
    sha256: str


class Manifest(BaseModel):
    name: str
    version: str
    base_model: str | None
    base_config_sha256: str | None = Field(None, description="fingerprint of the base model's config.json")
    peft_type: str = "LORA"
    r: int
    alpha: float
    target_modules: list[str] | str
    dtype: StoreDtype
    files: dict[str, StoredFile]
    created: str
    source_job: str | None = None
    metrics: dict[str, Any] | None = None

    @property
    def bytes(self) -> int:
        return sum(f.bytes for f in self.files.values())


class StoreEntry(BaseModel):
    name: str
    versions: list[str]
    aliases: dict[str, str]
    latest: Manifest | None = None


def store_root(settings) -> Path:
    """The edge store folder: FTS_STORE, else FTS_HOME/store."""
    return Path(settings.env.get("FTS_STORE") or settings.home / "store")


def parse_ref(ref: str, *, param: str = "model") -> tuple[str, str | None, str | None]:
    """'name', 'name@v3' or 'name:prod' -> (name, version, alias)."""
    if "@" in ref:
        name, version = ref.split("@", 1)
        if not VERSION_RE.match(version):
            raise InvalidArgument(f"{ref!r}: versions look like v1, v2, ...", param=param)
        return name, version, None
    if ":" in ref:
        name, alias = ref.split(":", 1)
        return name, None, alias
    return ref, None, None


def version_key(version: str) -> int:
    return int(version[1:])


class AdapterStore:
    def __init__(self, root: Path) -> None:
        self.root = root

    # ---- reading -------------------------------------------------------------------------------------------

    def names(self) -> list[str]:
        if not self.root.is_dir():
            return []
        return sorted(p.name for p in self.root.iterdir() if p.is_dir() and NAME_RE.match(p.name))

    def versions(self, name: str) -> list[str]:
        folder = self.root / name
        if not folder.is_dir():
            return []
        return sorted((p.name for p in folder.iterdir() if p.is_dir() and VERSION_RE.match(p.name)), key=version_key)

    def aliases(self, name: str) -> dict[str, str]:
        path = self.root / name / "aliases.json"
        return json.loads(path.read_text()) if path.is_file() else {}

    def manifest(self, name: str, version: str) -> Manifest:
        path = self.root / name / version / "manifest.json"
        if not path.is_file():
            raise InvalidArgument(f"{name}@{version} is not in the store", param="version")
        return Manifest.model_validate_json(path.read_text())

    def resolve(self, ref: str, *, param: str = "model") -> Manifest:
        """A reference -> its manifest. Plain names mean the `latest` alias (or the highest version)."""
        name, version, alias = parse_ref(ref, param=param)
        versions = self.versions(name)
        if not versions:
            raise UnknownAdapter(f"no adapter named {name!r} in the store; available: "
                                 f"{', '.join(self.names()) or 'none'}", param=param)
        if alias is not None:
            aliases = self.aliases(name)
            if alias not in aliases:
                raise UnknownAdapter(f"{name} has no alias {alias!r}; aliases: {', '.join(aliases) or 'none'}",
                                     param=param)
            version = aliases[alias]
        if version is None:
            version = self.aliases(name).get("latest", versions[-1])
        if version not in versions:
            raise UnknownAdapter(f"{name} has no version {version}; versions: {', '.join(versions)}", param=param)
        return self.manifest(name, version)

    def entries(self, name: str | None = None) -> list[StoreEntry]:
        names = [name] if name else self.names()
        out = []
        for n in names:
            versions = self.versions(n)
            if not versions:
                continue
            out.append(StoreEntry(name=n, versions=versions, aliases=self.aliases(n), latest=self.resolve(n)))
        return out

    # ---- publishing ----------------------------------------------------------------------------------------

    def publish(self, adapter_dir: Path, name: str, *, version: str | None = None, alias: str | None = None,
                dtype: StoreDtype = "bfloat16", base_config: Path | None = None, source_job: str | None = None,
                metrics: dict[str, Any] | None = None) -> tuple[Manifest, bool]:
        """Publish an adapter folder. Returns (manifest, created); the same bytes again return created=False."""
        if not NAME_RE.match(name):
            raise InvalidArgument(f"{name!r}: names are 1-64 lowercase letters, digits, '.', '_' or '-'", param="name")
        if version is not None and not VERSION_RE.match(version):
            raise InvalidArgument(f"{version!r}: versions look like v1, v2, ... (or leave it out for the next one)",
                                  param="version")
        if alias is not None and (not ALIAS_RE.match(alias) or alias == "latest"):
            raise InvalidArgument(f"{alias!r}: aliases are lowercase words such as prod or staging ('latest' moves by "
                                  "itself)", param="alias")
        info = read_adapter(adapter_dir, param="adapter")
        self.root.mkdir(parents=True, exist_ok=True)
        (self.root / name).mkdir(exist_ok=True)
        with tempfile.TemporaryDirectory(dir=self.root / name, prefix=".publish-") as tmp:
            staging = Path(tmp) / "v"
            staging.mkdir()
            shutil.copyfile(adapter_dir / CONFIG, staging / CONFIG)
            convert_weights(adapter_dir / WEIGHTS, staging / WEIGHTS, dtype)
            files = {p.name: StoredFile(bytes=p.stat().st_size, sha256=sha256_file(p))
                     for p in sorted(staging.iterdir())}
            existing = self.versions(name)
            same = next((v for v in existing if self.manifest(name, v).files == files), None)
            if version is None and same is not None:
                manifest, created = self.manifest(name, same), False
            elif version is not None and version in existing:
                manifest = self.manifest(name, version)
                if manifest.files != files:
                    raise InvalidArgument(f"{name}@{version} already exists with other bytes; versions are immutable: "
                                          "publish without version to get the next one", param="version")
                created = False
            else:
                version = version or f"v{version_key(existing[-1]) + 1 if existing else 1}"
                manifest = Manifest(
                    name=name, version=version, base_model=info.base_model,
                    base_config_sha256=sha256_file(base_config) if base_config and base_config.is_file() else None,
                    r=info.r, alpha=info.alpha, target_modules=info.target_modules, dtype=dtype, files=files,
                    created=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), source_job=source_job,
                    metrics=metrics)
                write_json_atomic(staging / "manifest.json", manifest.model_dump())
                staging.rename(self.root / name / version)
                created = True
        aliases = self.aliases(name)
        if created and (not aliases.get("latest") or version_key(manifest.version) >= version_key(aliases["latest"])):
            aliases["latest"] = manifest.version
        if alias:
            aliases[alias] = manifest.version
        write_json_atomic(self.root / name / "aliases.json", aliases)
        self.write_index()
        return manifest, created

    def set_alias(self, name: str, alias: str, version: str) -> None:
        if version not in self.versions(name):
            raise InvalidArgument(f"{name} has no version {version}", param="version")
        write_json_atomic(self.root / name / "aliases.json", {**self.aliases(name), alias: version})
        self.write_index()

    def write_index(self) -> None:
        write_json_atomic(self.root / "index.json", {"adapters": {
            n: {"versions": self.versions(n), "aliases": self.aliases(n)} for n in self.names() if self.versions(n)}})


def convert_weights(source: Path, target: Path, dtype: StoreDtype) -> None:
    """Rewrite the adapter weights in `dtype` (PEFT saves fp32; 16 bits halves them). Runs torch in a subprocess."""
    done = subprocess.run([sys.executable, "-m", "fts_mcp.edge.convert", str(source), str(target), dtype],
                          capture_output=True, text=True, timeout=600, check=False)
    if done.returncode != 0:
        raise FtsError(f"converting {source} to {dtype} failed: {done.stderr.strip()[-400:]}", param="adapter")
