"""The adapter store: `name/version/` folders with PEFT's files and a manifest, plus moving aliases.

Layout (servable as-is by any static HTTP server or CDN):

    index.json                         {"adapters": {name: {"versions": [...], "aliases": {...}}}}
    <name>/aliases.json                {"latest": "v2", "prod": "v1"}
    <name>/<version>/manifest.json     name, version, base model, rank, alpha, targets, dtype, files (bytes, sha256)
    <name>/<version>/adapter_config.json
    <name>/<version>/adapter_model.safetensors
    <name>/<version>/tokenizer*.json, chat_template.jinja ...   the tokenizer the adapter was trained with
    <name>/<version>/training_base.json  the base it was trained on (NF4 or 16-bit), when known
    <name>/<version>/adapter.gguf      the same adapter as a GGUF LoRA for llama.cpp and Ollama, when asked for

Versions are immutable: publishing other bytes under an existing version is refused, the same bytes are a
no-op. A version appears whole or not at all (written to a temp folder, then renamed); alias and index files
are read-modified-written under a file lock, so several processes may publish at once. Pure Python: weight
conversion to 16 bits happens in a short-lived subprocess (`fts_mcp.edge.convert`), torch never loads here.

The store's own files are untrusted input too: every reference is checked against the name, version and
alias grammar where it enters (`parse_ref`, whole-string matches: no trailing newline slips through), every path
is proven to lie inside the store, and a manifest whose name or version disagrees with its folder, or that
declares files larger than an adapter's, is refused as corrupt. `base` is no adapter's name: a runtime reads it
as the base model.

Files are written 0644 and folders 0755 (less the umask), so any static HTTP server can serve the store.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from contextlib import ExitStack
from pathlib import Path
from typing import Any

from filelock import FileLock
from pydantic import BaseModel, Field, ValidationError

from fts_mcp.adapters.inspect import CONFIG, WEIGHTS, AdapterInfo, read_adapter
from fts_mcp.adapters.llamacpp import EXPORT_SECONDS, GGUF_FILE
from fts_mcp.errors import FtsError, InvalidArgument
from fts_mcp.files import match_new_file_mode, sha256_file, write_json_atomic
from fts_mcp.models.base import FILE as BASE_FILE
from fts_mcp.models.base import TrainingBase, read_training_base, write_training_base
from fts_mcp.models.dtypes import Dtype
from fts_mcp.models.refs import COMPANION_FILES, companion_files

log = logging.getLogger(__name__)

# Whole-string grammars: always `fullmatch` (`$` would let a trailing newline through).
NAME_RE = re.compile(r"[a-z0-9][a-z0-9._-]{0,63}")
VERSION_RE = re.compile(r"v[1-9][0-9]{0,8}")
ALIAS_RE = re.compile(r"[a-z][a-z0-9_-]{0,31}")
BASE = "base"  # what a request's `model` calls the base model; never an adapter's name
RESERVED_NAMES = frozenset({BASE})
MAX_ADAPTER_BYTES = 4 << 30  # the largest weights file a manifest may declare (a runtime may set its own)
MAX_SIDE_FILE_BYTES = 64 << 20  # each other file of a version: config, tokenizer, chat template, training base
# The only files a stored version may hold: PEFT's two, the tokenizer files saved beside them, the training base,
# and the GGUF export of the same weights.
ADAPTER_FILES = frozenset({CONFIG, WEIGHTS, *COMPANION_FILES, BASE_FILE, GGUF_FILE})
WEIGHT_FILES = frozenset({WEIGHTS, GGUF_FILE})  # bounded by max_adapter_bytes; the others by MAX_SIDE_FILE_BYTES
REF_FORMS = ("a store reference is name, name@v3 or name:alias; names are 1-64 lowercase letters, digits, '.', "
             "'_' or '-', starting with a letter or digit")


class UnknownAdapter(InvalidArgument):
    """The reference names no adapter, version or alias in the store."""

    code = "model_not_found"


class CorruptAdapter(FtsError):
    """A stored file or manifest is not what the store says it is."""

    code = "corrupt_adapter"


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
    dtype: Dtype
    files: dict[str, StoredFile]
    created: str
    source_job: str | None = None
    metrics: dict[str, Any] | None = None
    training_base: TrainingBase | None = Field(None, description="the base it was trained on; what serving, "
                                                                 "evaluating and merging load by default")
    gguf_outtype: str | None = Field(None, description=f"the tensor type of {GGUF_FILE}, when the version has one")

    @property
    def bytes(self) -> int:
        return sum(f.bytes for f in self.files.values())


class StoreEntry(BaseModel):
    name: str
    versions: list[str]
    aliases: dict[str, str]
    latest: Manifest | None = None


def _shown(value: str) -> str:
    return repr(value if len(value) <= 80 else value[:77] + "...")


def is_name(name: str) -> bool:
    """Whether `name` may name an adapter: the store's grammar, and not a name reserved for the base model."""
    return isinstance(name, str) and NAME_RE.fullmatch(name) is not None and name not in RESERVED_NAMES


def parse_ref(ref: str, *, param: str = "model") -> tuple[str, str | None, str | None]:
    """'name', 'name@v3' or 'name:prod' -> (name, version, alias), each checked against its grammar."""
    if not isinstance(ref, str) or not ref:
        raise InvalidArgument(f"expected a store reference; {REF_FORMS}", param=param)
    name, version, alias = ref, None, None
    if "@" in ref:
        name, version = ref.split("@", 1)
        if not VERSION_RE.fullmatch(version):
            raise InvalidArgument(f"{_shown(ref)}: versions look like v1, v2, ...", param=param)
    elif ":" in ref:
        name, alias = ref.split(":", 1)
        if not ALIAS_RE.fullmatch(alias):
            raise InvalidArgument(f"{_shown(ref)}: aliases are lowercase words such as prod or latest", param=param)
    if name in RESERVED_NAMES:
        raise InvalidArgument(f"{_shown(ref)}: {name!r} is the base model, not an adapter of the store", param=param)
    if not NAME_RE.fullmatch(name):
        raise InvalidArgument(f"{_shown(ref)} is not a store reference; {REF_FORMS}", param=param)
    return name, version, alias


def pick_version(name: str, version: str | None, alias: str | None, versions: list[str], aliases: dict[str, str],
                 *, param: str = "model", known: list[str] | None = None) -> str:
    """The one resolution rule, for local and HTTP stores alike: an alias, a version, or `latest` (else the
    highest version) for a bare name."""
    if not versions:
        raise UnknownAdapter(f"no adapter named {name!r} in the store; available: {', '.join(known or []) or 'none'}",
                             param=param)
    if alias is not None:
        if alias not in aliases:
            raise UnknownAdapter(f"{name} has no alias {alias!r}; aliases: {', '.join(aliases) or 'none'}",
                                 param=param)
        version = aliases[alias]
    if version is None:
        version = aliases.get("latest", versions[-1])
    if version not in versions:
        raise UnknownAdapter(f"{name} has no version {version}; versions: {', '.join(versions)}", param=param)
    return version


def version_key(version: str) -> int:
    return int(version[1:])


def check_aliases(raw: object, source: str) -> dict[str, str]:
    """An aliases mapping read from a store file or index: alias -> version, both well formed."""
    if not isinstance(raw, dict) or not all(isinstance(k, str) and ALIAS_RE.fullmatch(k) and isinstance(v, str)
                                            and VERSION_RE.fullmatch(v) for k, v in raw.items()):
        raise CorruptAdapter(f"{source} is not a mapping of aliases to versions", param="model")
    return raw


def check_manifest(manifest: Manifest, name: str, version: str, source: str, *,
                   max_adapter_bytes: int = MAX_ADAPTER_BYTES) -> Manifest:
    """A manifest must describe the folder it sits in, list only an adapter's own files, by plain name, and declare
    sizes an adapter can have: the weights at most `max_adapter_bytes`, each other file MAX_SIDE_FILE_BYTES."""
    if manifest.name != name or manifest.version != version:
        raise CorruptAdapter(f"{source} says it is {manifest.name}@{manifest.version}, but it is stored as "
                             f"{name}@{version}; refused", param="model")
    strange = sorted(f for f in manifest.files if f not in ADAPTER_FILES)
    if strange or CONFIG not in manifest.files or WEIGHTS not in manifest.files:
        raise CorruptAdapter(f"{source} lists {', '.join(map(_shown, strange)) or 'no adapter weights'}; a stored "
                             f"version holds {CONFIG}, {WEIGHTS}, tokenizer files and {GGUF_FILE} only",
                             param="model")
    for file_name, stored in manifest.files.items():
        limit = max_adapter_bytes if file_name in WEIGHT_FILES else MAX_SIDE_FILE_BYTES
        shown = f"{limit:,} bytes" if limit < 1 << 20 else f"{limit >> 20:,} MiB"
        if not 0 <= stored.bytes <= limit:
            raise CorruptAdapter(f"{source} declares {file_name} as {stored.bytes:,} bytes; it may hold at most "
                                 f"{shown} (a larger adapter needs a runtime with a higher max_adapter_bytes); "
                                 "refused", param="model")
    return manifest


class AdapterStore:
    def __init__(self, root: Path) -> None:
        self.root = Path(root).resolve()

    def path(self, name: str, version: str | None = None) -> Path:
        """The folder of a name (or one version), proven to lie inside the store."""
        if not is_name(name) or (version is not None and not VERSION_RE.fullmatch(version)):
            raise InvalidArgument(f"{_shown(name if version is None else f'{name}@{version}')} is not a store "
                                  f"reference; {REF_FORMS}", param="model")
        folder = (self.root / name / (version or "")).resolve()
        if not folder.is_relative_to(self.root):
            raise CorruptAdapter(f"{name}{'@' + version if version else ''} leads outside the store; refused",
                                 param="model")
        return folder

    def lock(self) -> FileLock:
        """Held while alias and index files are read, modified and written (several processes may publish)."""
        self.root.mkdir(parents=True, exist_ok=True)
        return FileLock(self.root / ".lock", timeout=60)

    # ---- reading -------------------------------------------------------------------------------------------

    def names(self) -> list[str]:
        if not self.root.is_dir():
            return []
        return sorted(p.name for p in self.root.iterdir()
                      if is_name(p.name) and not p.is_symlink() and p.is_dir())

    def versions(self, name: str) -> list[str]:
        folder = self.path(name)
        if not folder.is_dir():
            return []
        return sorted((p.name for p in folder.iterdir() if VERSION_RE.fullmatch(p.name) and not p.is_symlink()
                       and p.is_dir()), key=version_key)

    def aliases(self, name: str) -> dict[str, str]:
        path = self.path(name) / "aliases.json"
        if not path.is_file():
            return {}
        try:
            raw = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise CorruptAdapter(f"{path} is not valid JSON ({exc})", param="model") from exc
        return check_aliases(raw, str(path))

    def manifest(self, name: str, version: str) -> Manifest:
        path = self.path(name, version) / "manifest.json"
        if path.is_symlink():
            raise CorruptAdapter(f"{name}@{version}: manifest.json is a link, not a file of the store; refused",
                                 param="model")
        if not path.is_file():
            raise UnknownAdapter(f"{name}@{version} is not in the store", param="version")
        try:
            manifest = Manifest.model_validate_json(path.read_text())
        except (ValidationError, UnicodeDecodeError) as exc:
            raise CorruptAdapter(f"{path} is not a valid manifest", param="model") from exc
        return check_manifest(manifest, name, version, str(path))

    def resolve(self, ref: str, *, param: str = "model") -> Manifest:
        """A reference -> its manifest. Plain names mean the `latest` alias (or the highest version)."""
        name, version, alias = parse_ref(ref, param=param)
        versions = self.versions(name)
        version = pick_version(name, version, alias, versions, self.aliases(name) if versions else {}, param=param,
                               known=self.names())
        return self.manifest(name, version)

    def entries(self, name: str | None = None) -> list[StoreEntry]:
        """Every adapter (or one), with its versions, aliases and latest manifest. Listing everything skips a name
        whose files are corrupt (the others stay usable); asking for that name says what is wrong."""
        names = [parse_ref(name, param="name")[0]] if name else self.names()
        out = []
        for n in names:
            try:
                versions = self.versions(n)
                if versions:
                    out.append(StoreEntry(name=n, versions=versions, aliases=self.aliases(n),
                                          latest=self.resolve(n, param="name")))
            except CorruptAdapter as exc:
                if name:
                    raise
                log.warning("adapter store: skipping %s: %s", n, exc.message)
        return out

    # ---- publishing ----------------------------------------------------------------------------------------

    def publish(self, adapter_dir: Path, name: str, *, version: str | None = None, alias: str | None = None,
                dtype: Dtype = "bfloat16", base_config: Path | None = None, source_job: str | None = None,
                metrics: dict[str, Any] | None = None, training_base: TrainingBase | None = None,
                gguf: Callable[[Path], str] | None = None) -> tuple[Manifest, bool]:
        """Publish an adapter folder. Returns (manifest, created); the same bytes again return created=False.
        `training_base`: the base it was trained on, when the folder does not record it itself. `gguf`: writes the
        GGUF export into the folder it is given (as GGUF_FILE), before the store's lock is taken (it is slow), and
        returns its tensor type; it is part of the version's bytes, so a refusal publishes nothing."""
        if not isinstance(name, str) or not NAME_RE.fullmatch(name):
            raise InvalidArgument(f"{name!r}: names are 1-64 lowercase letters, digits, '.', '_' or '-'", param="name")
        if name in RESERVED_NAMES:
            raise InvalidArgument(f"{name!r} is what a runtime calls the base model; choose another name",
                                  param="name")
        if version is not None and not VERSION_RE.fullmatch(version):
            raise InvalidArgument(f"{version!r}: versions look like v1, v2, ... (or leave it out for the next one)",
                                  param="version")
        if alias is not None and (not ALIAS_RE.fullmatch(alias) or alias == "latest"):
            raise InvalidArgument(f"{alias!r}: aliases are lowercase words such as prod or staging ('latest' moves by "
                                  "itself)", param="alias")
        info = read_adapter(adapter_dir, param="adapter")
        if info.base_model and name == Path(info.base_model).name:
            raise InvalidArgument(f"{name!r} is the name of the base model this adapter was trained on "
                                  f"({info.base_model}); a runtime serving that base reads it as the base model: "
                                  "choose another name", param="name")
        training_base = read_training_base(adapter_dir) or training_base
        self.root.mkdir(parents=True, exist_ok=True)
        self.path(name).mkdir(exist_ok=True)
        with ExitStack() as exports:
            exported, gguf_outtype = None, None
            if gguf is not None:  # slow (torch, in a subprocess): before the lock, in a folder of its own
                work = Path(exports.enter_context(tempfile.TemporaryDirectory(dir=self.path(name), prefix=".export-")))
                gguf_outtype = gguf(work)
                exported = work / GGUF_FILE
            return self._publish(adapter_dir, name, info, version=version, alias=alias, dtype=dtype,
                                 base_config=base_config, source_job=source_job, metrics=metrics,
                                 training_base=training_base, exported=exported, gguf_outtype=gguf_outtype)

    def _publish(self, adapter_dir: Path, name: str, info: AdapterInfo, *, version: str | None, alias: str | None,
                 dtype: Dtype, base_config: Path | None, source_job: str | None, metrics: dict[str, Any] | None,
                 training_base: TrainingBase | None, exported: Path | None, gguf_outtype: str | None
                 ) -> tuple[Manifest, bool]:
        with self.lock(), tempfile.TemporaryDirectory(dir=self.path(name), prefix=".publish-") as tmp:
            self._clear_leftovers(name, keep=Path(tmp))
            staging = Path(tmp) / "v"
            staging.mkdir()
            shutil.copyfile(adapter_dir / CONFIG, staging / CONFIG)
            for companion in companion_files(adapter_dir):  # the tokenizer and chat template it was trained with
                shutil.copyfile(companion, staging / companion.name)
            convert_weights(adapter_dir / WEIGHTS, staging / WEIGHTS, dtype)
            match_new_file_mode(staging / WEIGHTS)  # safetensors writes it 0600: a web server must read it
            if training_base is not None:
                write_training_base(staging, training_base)
            if exported is not None:
                os.replace(exported, staging / GGUF_FILE)
                match_new_file_mode(staging / GGUF_FILE)
            files = {p.name: StoredFile(bytes=p.stat().st_size, sha256=sha256_file(p))
                     for p in sorted(staging.iterdir())}
            for file_name, stored in files.items():  # what a reader would refuse as corrupt is not published
                limit = MAX_ADAPTER_BYTES if file_name in WEIGHT_FILES else MAX_SIDE_FILE_BYTES
                if stored.bytes > limit:
                    raise InvalidArgument(f"{file_name} would be {stored.bytes:,} bytes; a stored version's "
                                          f"{file_name} may hold at most {limit:,}",
                                          param="gguf" if file_name == GGUF_FILE else "adapter")
            existing = self.versions(name)

            def plain(stored: dict[str, StoredFile]) -> dict[str, StoredFile]:
                return {k: f for k, f in stored.items() if k != GGUF_FILE}

            def same_bytes(stored: dict[str, StoredFile]) -> bool:
                """The same files; a version that also holds a GGUF export is the same bytes for a plain publish."""
                return stored == files or (exported is None and plain(stored) == files)
            same = next((v for v in existing if same_bytes(self.manifest(name, v).files)), None)
            if version is None and same is not None:
                manifest, created = self.manifest(name, same), False
            elif version is not None and version in existing:
                manifest = self.manifest(name, version)
                if not same_bytes(manifest.files):
                    why = "already exists with other bytes"
                    if plain(manifest.files) == plain(files) and exported is not None:  # the same adapter
                        why = f"holds a {manifest.gguf_outtype or 'different'} GGUF export of them" \
                            if GGUF_FILE in manifest.files else "holds no GGUF export of them"
                    raise InvalidArgument(f"{name}@{version} {why}; versions are immutable: publish without version "
                                          "to get the next one", param="version")
                created = False
            else:
                version = version or f"v{version_key(existing[-1]) + 1 if existing else 1}"
                manifest = Manifest(
                    name=name, version=version, base_model=info.base_model,
                    base_config_sha256=sha256_file(base_config) if base_config and base_config.is_file() else None,
                    r=info.r, alpha=info.alpha, target_modules=info.target_modules, dtype=dtype, files=files,
                    created=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), source_job=source_job,
                    metrics=metrics, training_base=training_base, gguf_outtype=gguf_outtype)
                write_json_atomic(staging / "manifest.json", manifest.model_dump())
                staging.rename(self.path(name, version))
                created = True
            aliases = self.aliases(name)
            if created and (not aliases.get("latest")
                            or version_key(manifest.version) >= version_key(aliases["latest"])):
                aliases["latest"] = manifest.version
            if alias:
                aliases[alias] = manifest.version
            write_json_atomic(self.path(name) / "aliases.json", aliases)
            self._write_index()
        return manifest, created

    def set_alias(self, name: str, alias: str, version: str) -> None:
        if not ALIAS_RE.fullmatch(alias):
            raise InvalidArgument(f"{_shown(alias)}: aliases are lowercase words such as prod or staging",
                                  param="alias")
        with self.lock():
            if version not in self.versions(name):
                raise InvalidArgument(f"{name} has no version {version}", param="version")
            write_json_atomic(self.path(name) / "aliases.json", {**self.aliases(name), alias: version})
            self._write_index()

    def _clear_leftovers(self, name: str, keep: Path) -> None:
        """Staging folders of a publish that was killed (with the lock held, nobody else is publishing), and export
        folders older than any export runs (exports run outside the lock)."""
        old = time.time() - 2 * EXPORT_SECONDS
        for stale in [*self.path(name).glob(".publish-*"), *self.path(name).glob(".export-*")]:
            if stale != keep and stale.is_dir() and not stale.is_symlink() and \
                    (stale.name.startswith(".publish-") or stale.stat().st_mtime < old):
                shutil.rmtree(stale, ignore_errors=True)

    def _write_index(self) -> None:
        """Rewrite index.json from the folders; call with the lock held."""
        write_json_atomic(self.root / "index.json", {"adapters": {
            n: {"versions": self.versions(n), "aliases": self.aliases(n)} for n in self.names() if self.versions(n)}})


def convert_weights(source: Path, target: Path, dtype: Dtype) -> None:
    """Rewrite the adapter weights in `dtype` (PEFT saves fp32; 16 bits halves them). Runs torch in a subprocess."""
    done = subprocess.run([sys.executable, "-m", "fts_mcp.edge.convert", str(source), str(target), dtype],
                          capture_output=True, text=True, timeout=600, check=False)
    if done.returncode != 0:
        raise FtsError(f"converting {source} to {dtype} failed: {done.stderr.strip()[-400:]}", param="adapter")
