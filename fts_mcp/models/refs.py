"""Naming a base model: a local folder inside the roots, a `.gguf` file (inside the roots, or shipped by an installed
package; converted once, see `fts_mcp.models.gguf`), or a hub id read through huggingface-hub's cache. No torch."""

from __future__ import annotations

import os
import re
from pathlib import Path

from fts_mcp.config import Settings
from fts_mcp.errors import InvalidArgument, ModelUnavailable
from fts_mcp.models import gguf
from fts_mcp.paths import resolve_inside

HUB_ID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,95}(/[A-Za-z0-9][A-Za-z0-9._-]{0,95})?")  # fullmatch, not $


def looks_like_path(value: str) -> bool:
    """Absolute, home- or dot-relative paths, `.gguf` files and any existing folder are local; `org/name` is a hub
    id."""
    if value.startswith(("/", ".", "~", os.sep)) or gguf.is_gguf(value):
        return True
    try:
        return Path(value).is_dir()
    except (OSError, ValueError):  # too long, NUL...: not a folder, and resolve_model_argument names it
        return False


def resolve_model_argument(value: str, settings: Settings, *, param: str = "base_model") -> str:
    """Check the form of a base model argument; returns an absolute folder path or the hub id. A `.gguf` file
    becomes its converted folder (the first time, after a conversion of tens of seconds for a small model)."""
    if looks_like_path(value):
        if gguf.is_gguf(value):
            return str(gguf.import_gguf(resolve_gguf(value, settings, param=param), settings.home,
                                        trust_remote_code=settings.trust_remote_code, param=param))
        folder = resolve_inside(value, settings.roots, param=param)
        if not (folder / "config.json").is_file():
            raise InvalidArgument(f"{folder} has no config.json; expected a model folder written by save_pretrained",
                                  param=param)
        return str(folder)
    if not HUB_ID_RE.fullmatch(value) or ".." in value:
        raise InvalidArgument(f"{value!r} is neither a folder inside the allowed roots nor a hub id such as "
                              "'meta-llama/Llama-3.2-1B'", param=param)
    return value


def resolve_gguf(value: str, settings: Settings, *, param: str = "base_model") -> Path:
    """A `.gguf` argument: a file inside the roots, or one an installed package ships (what list_models shows)."""
    try:
        candidate = Path(value).expanduser().resolve()
    except (OSError, ValueError, RuntimeError):
        candidate = None
    if candidate is not None and gguf.is_packaged(candidate):
        return candidate
    path = resolve_inside(value, settings.roots, param=param)
    if not path.is_file():
        raise InvalidArgument(f"{path} is not a file; expected a GGUF model file", param=param)
    return path


def hub_offline(env: dict[str, str]) -> bool:
    return env.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")


def check_available(model: str, settings: Settings, *, param: str = "base_model") -> None:
    """Raise `ModelUnavailable` when a hub id is not cached and the host is offline (never wait on the network)."""
    if Path(model).is_absolute():
        return
    from huggingface_hub import try_to_load_from_cache  # lazy: keeps server start-up light

    cached = try_to_load_from_cache(model, "config.json")
    if isinstance(cached, str):
        return
    if hub_offline(settings.env):
        raise ModelUnavailable(
            f"{model!r} is not in the local Hugging Face cache and this host is offline (HF_HUB_OFFLINE=1); "
            f"download it first (`hf download {model}`) or pass a local model folder", param=param)


# Files beside the weights that make a model or adapter folder usable the way it was trained: the tokenizer and
# its chat template (`apply_chat_template` needs them) and the generation config.
COMPANION_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                   "chat_template.jinja", "chat_template.json", "generation_config.json", "tokenizer.model",
                   "vocab.json", "merges.txt", "spiece.model")


def companion_files(folder: Path) -> list[Path]:
    """The tokenizer, chat template and generation config files present in `folder`."""
    return [folder / name for name in COMPANION_FILES if (folder / name).is_file()]
