"""Read a PEFT LoRA adapter folder without torch: its config, its tensors' shapes (from the safetensors header)
and its files' sha256. Used to refuse bad merges before any heavy work starts."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from pydantic import BaseModel
from safetensors import SafetensorError, safe_open

from fts_mcp.errors import InvalidArgument
from fts_mcp.files import sha256_file
from fts_mcp.models.architecture import Architecture

WEIGHTS = "adapter_model.safetensors"
CONFIG = "adapter_config.json"
LORA_KEY = re.compile(r"layers\.(\d+)\..*?([A-Za-z0-9_]+)\.lora_([AB])(?:\.[A-Za-z0-9_]+)?\.weight$")


class AdapterConfig(BaseModel):
    """What an adapter's `adapter_config.json` says, checked: the one reader of that file for every step."""

    base_model: str | None
    r: int
    alpha: float
    use_rslora: bool = False
    use_dora: bool = False
    target_modules: list[str] | str

    @property
    def scaling(self) -> float:
        """The factor PEFT multiplies B @ A by: alpha / r, or alpha / sqrt(r) for rank-stabilised LoRA."""
        return self.alpha / (self.r ** 0.5 if self.use_rslora else self.r)


class AdapterInfo(AdapterConfig):
    path: str
    peft_type: str
    shapes: dict[str, list[int]]
    sha256: dict[str, str]
    bytes: int


def safetensors_shapes(path: Path, *, param: str) -> dict[str, list[int]]:
    """Tensor name -> shape, from the file's header (safetensors' own reader: nothing is loaded); a truncated,
    padded or garbled file is refused."""
    try:
        with safe_open(str(path), framework="numpy") as fh:
            return {name: list(fh.get_slice(name).get_shape()) for name in fh.keys()}
    except (SafetensorError, OSError) as exc:
        raise InvalidArgument(f"{path} is corrupt: {exc}", param=param) from exc


def read_adapter_config(folder: Path, *, param: str = "adapter") -> AdapterConfig:
    """The folder's LoRA config, refused with the reason when it is missing, not JSON or not a LoRA adapter's."""
    config_path = folder / CONFIG
    if not config_path.is_file():
        raise InvalidArgument(f"{folder} has no {CONFIG}: expected a PEFT adapter folder (save_pretrained output)",
                              param=param)
    try:
        config: dict[str, Any] = json.loads(config_path.read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError, RecursionError) as exc:
        raise InvalidArgument(f"{config_path} is not valid JSON: {exc}", param=param) from exc
    if not isinstance(config, dict):
        raise InvalidArgument(f"{config_path} is not a JSON object", param=param)
    try:
        r, alpha = int(config["r"]), float(config.get("lora_alpha", config["r"]))
    except (KeyError, TypeError, ValueError) as exc:
        raise InvalidArgument(f"{config_path} has no usable r / lora_alpha ({type(exc).__name__}: {exc})",
                              param=param) from exc
    if not 1 <= r <= 65_536 or not 0 < alpha < 1e9:
        raise InvalidArgument(f"{config_path}: r={r}, lora_alpha={alpha} are not a LoRA adapter's", param=param)
    if config.get("peft_type") != "LORA":
        raise InvalidArgument(f"{folder} holds a {config.get('peft_type')!r} adapter; only LoRA adapters are "
                              "supported", param=param)
    targets = config.get("target_modules") or []
    return AdapterConfig(
        base_model=base if isinstance(base := config.get("base_model_name_or_path"), str) else None,
        r=r, alpha=alpha, use_rslora=config.get("use_rslora") is True, use_dora=config.get("use_dora") is True,
        target_modules=sorted(str(t) for t in targets) if isinstance(targets, list) else
        targets if isinstance(targets, str) else [])


def read_adapter(folder: Path, *, param: str = "adapter") -> AdapterInfo:
    """The config plus the weights' tensor shapes and the files' sha256 (checks before any heavy work)."""
    weights_path = folder / WEIGHTS
    config = read_adapter_config(folder, param=param)
    if not weights_path.is_file():
        legacy = " (adapter_model.bin is not accepted: re-save it with safetensors)" \
            if (folder / "adapter_model.bin").exists() else ""
        raise InvalidArgument(f"{folder} has no {WEIGHTS}{legacy}", param=param)
    shapes = safetensors_shapes(weights_path, param=param)
    if not any(".lora_A" in name for name in shapes):
        raise InvalidArgument(f"{weights_path} holds no lora_A / lora_B tensors", param=param)
    files = sorted(p for p in folder.iterdir() if p.is_file())
    return AdapterInfo(
        **config.model_dump(), path=str(folder), peft_type="LORA",
        shapes=shapes, sha256={p.name: sha256_file(p) for p in files if p.name in (CONFIG, WEIGHTS)},
        bytes=sum(p.stat().st_size for p in files))


def check_fits_base(info: AdapterInfo, arch: Architecture, *, base: str, param: str = "adapter") -> None:
    """Every lora_A (r x in) / lora_B (out x r) must match the base's layer of that name and index."""
    expected = {name: (i, o) for name, i, o in arch.linear_shapes()}
    for key, shape in info.shapes.items():
        match = LORA_KEY.search(key)
        if not match:
            continue
        layer, module, which = int(match.group(1)), match.group(2), match.group(3)
        if layer >= arch.layers:
            raise InvalidArgument(f"adapter {info.path} has layer {layer} but {base} has {arch.layers} layers: it was "
                                  "trained for another base model", param=param)
        if module not in expected:
            continue
        size_in, size_out = expected[module]
        want = size_in if which == "A" else size_out
        got = shape[1] if which == "A" else shape[0]
        if got != want:
            side = "input" if which == "A" else "output"
            raise InvalidArgument(f"adapter {info.path} was made for another base: its {module} (layer {layer}) has "
                                  f"{side} size {got}, {base} has {want}; merge it into the model it was trained on "
                                  f"({info.base_model or 'see its adapter_config.json'})", param=param)
