"""One base model, many adapters: the edge runtime's engine.

The base is wrapped once by PEFT with a single adapter *slot* of the largest rank served (all linear layers).
Serving an adapter copies its factors into the slot — zero-padded to the slot's rank, which leaves
B @ A unchanged — and sets each layer's scaling: an in-place copy of a few MB instead of PEFT's
`load_adapter` (which builds new modules). Adapters wait in a host-memory LRU cache bounded in bytes (pinned
on CUDA so the copy runs at full bandwidth). One request runs at a time under a lock, so a request is never
answered with another request's adapter.
"""

from __future__ import annotations

import json
import threading
import time
from collections import OrderedDict
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from peft import LoraConfig, get_peft_model
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

from fts_mcp.adapters.inspect import CONFIG, LORA_KEY, WEIGHTS
from fts_mcp.edge.sources import StoreSource
from fts_mcp.errors import InvalidArgument
from fts_mcp.training.data import encode_chat_prompt, encode_prompt

SLOT = "slot"
SWAP_BUCKETS_MS = (0.5, 1, 2, 5, 10, 20, 50, 100, 250, 500, 1000, 2500)


@dataclass
class Cached:
    key: str
    factors: dict[str, tuple[torch.Tensor, torch.Tensor]]  # module path -> (A padded, B padded), host memory
    scaling: float
    bytes: int


@dataclass
class Metrics:
    swaps: list[float] = field(default_factory=list)  # ms, bounded below
    hits: int = 0
    misses: int = 0
    requests: dict[str, int] = field(default_factory=dict)

    def observe_swap(self, ms: float) -> None:
        self.swaps.append(ms)
        del self.swaps[:-10_000]


class Engine:
    def __init__(self, base: str, source: StoreSource, *, quantize: str = "auto", max_rank: int = 64,
                 max_cached_bytes: int = 2 << 30) -> None:
        self.base_name = base
        self.source = source
        self.max_rank = max_rank
        self.max_cached_bytes = max_cached_bytes
        self.device = torch.device("cuda:0" if torch.cuda.is_available() else "cpu")
        self.dtype = (torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16) \
            if self.device.type == "cuda" else torch.float32
        self.tokenizer = AutoTokenizer.from_pretrained(base)
        quant = None
        if quantize == "nf4" or (quantize == "auto" and self.device.type == "cuda"):
            quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                       bnb_4bit_compute_dtype=self.dtype, bnb_4bit_quant_storage=self.dtype)
        model = AutoModelForCausalLM.from_pretrained(base, dtype=self.dtype, quantization_config=quant,
                                                     device_map={"": str(self.device)})
        self.model = get_peft_model(model, LoraConfig(r=max_rank, lora_alpha=max_rank, lora_dropout=0.0,
                                                      target_modules="all-linear"), adapter_name=SLOT).eval()
        prefix = "base_model.model."
        self.slots = {name[len(prefix):] if name.startswith(prefix) else name: module
                      for name, module in self.model.named_modules() if SLOT in getattr(module, "lora_A", {})}
        self.lock = threading.Lock()
        self.cache: OrderedDict[str, Cached] = OrderedDict()
        self.named: dict[str, Path] = {}  # admin-loaded adapters (vLLM's load_lora_adapter): name -> folder
        self.active: Cached | None = None
        self.metrics = Metrics()
        self._clear_slot()

    # ---- adapters in host memory ---------------------------------------------------------------------------

    def _read(self, key: str, folder: Path) -> Cached:
        config = json.loads((folder / CONFIG).read_text())
        if config.get("use_dora"):
            raise InvalidArgument(f"{key} is a DoRA adapter; the runtime serves plain LoRA", param="model")
        r = int(config["r"])
        if r > self.max_rank:
            raise InvalidArgument(f"{key} has rank {r}, above this runtime's --max-rank {self.max_rank}",
                                  param="model")
        alpha = float(config.get("lora_alpha", r))
        scaling = alpha / (r ** 0.5) if config.get("use_rslora") else alpha / r
        tensors = load_file(folder / WEIGHTS)
        factors: dict[str, list[torch.Tensor | None]] = {}
        for name, tensor in tensors.items():
            match = LORA_KEY.search(name)
            if not match:
                continue
            path = name.split(".lora_")[0]
            path = path[len("base_model.model."):] if path.startswith("base_model.model.") else path
            if path not in self.slots:
                raise InvalidArgument(f"{key} adapts {path}, which the base model {self.base_name} does not have; "
                                      "it was trained for another base", param="model")
            pair = factors.setdefault(path, [None, None])
            pair[0 if match.group(3) == "A" else 1] = tensor
        padded: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        size = 0
        for path, (a, b) in factors.items():
            slot = self.slots[path]
            want_a, want_b = slot.lora_A[SLOT].weight.shape, slot.lora_B[SLOT].weight.shape
            if a.shape[1] != want_a[1] or b.shape[0] != want_b[0]:
                raise InvalidArgument(f"{key}: {path} has shape {tuple(b.shape[:1]) + tuple(a.shape[1:])}, the base "
                                      f"has {(want_b[0], want_a[1])}: it was trained for another base", param="model")
            pa = torch.zeros(want_a, dtype=self.dtype)
            pb = torch.zeros(want_b, dtype=self.dtype)
            pa[: a.shape[0]] = a.to(self.dtype)
            pb[:, : b.shape[1]] = b.to(self.dtype)
            if self.device.type == "cuda":
                pa, pb = pa.pin_memory(), pb.pin_memory()
            padded[path] = (pa, pb)
            size += pa.numel() * pa.element_size() + pb.numel() * pb.element_size()
        return Cached(key=key, factors=padded, scaling=scaling, bytes=size)

    def _cached(self, key: str, folder: Path) -> Cached:
        if key in self.cache:
            self.metrics.hits += 1
            self.cache.move_to_end(key)
            return self.cache[key]
        self.metrics.misses += 1
        entry = self._read(key, folder)
        self.cache[key] = entry
        while sum(c.bytes for c in self.cache.values()) > self.max_cached_bytes and len(self.cache) > 1:
            evicted, _ = self.cache.popitem(last=False)
            if self.active is not None and self.active.key == evicted:
                self.active = None
        return entry

    def resolve(self, model: str) -> tuple[str, Path] | None:
        """The adapter a request's `model` names: (key, folder); None for the base model itself."""
        if model in (self.base_name, Path(self.base_name).name, "base"):
            return None
        if model in self.named:
            return model, self.named[model]
        manifest = self.source.resolve(model)
        return f"{manifest.name}@{manifest.version}", self.source.folder(manifest)

    def load_named(self, name: str, path: str) -> float:
        """vLLM's load_lora_adapter: a folder path or a store reference, under `name`. Returns load ms."""
        started = time.perf_counter()
        folder = Path(path)
        if not (folder / CONFIG).is_file():
            manifest = self.source.resolve(path)
            folder = self.source.folder(manifest)
        with self.lock:
            self.cache.pop(name, None)
            self._cached(name, folder)
            self.named[name] = folder
        return (time.perf_counter() - started) * 1000

    def unload_named(self, name: str) -> None:
        if name not in self.named:
            raise InvalidArgument(f"no adapter loaded as {name!r}; loaded: {', '.join(self.named) or 'none'}",
                                  param="lora_name")
        with self.lock:
            del self.named[name]
            self.cache.pop(name, None)
            if self.active is not None and self.active.key == name:
                self.active = None

    # ---- the slot ------------------------------------------------------------------------------------------

    @torch.no_grad()
    def _clear_slot(self) -> None:
        for module in self.slots.values():
            module.lora_B[SLOT].weight.zero_()

    @torch.no_grad()
    def _swap(self, entry: Cached) -> float:
        if self.active is not None and self.active.key == entry.key:
            return 0.0
        started = time.perf_counter()
        previous = self.active.factors.keys() if self.active else self.slots.keys()
        for path in previous - entry.factors.keys():
            self.slots[path].lora_B[SLOT].weight.zero_()
        for path, (a, b) in entry.factors.items():
            module = self.slots[path]
            module.lora_A[SLOT].weight.copy_(a, non_blocking=True)
            module.lora_B[SLOT].weight.copy_(b, non_blocking=True)
            module.scaling[SLOT] = entry.scaling
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        self.active = entry
        ms = (time.perf_counter() - started) * 1000
        self.metrics.observe_swap(ms)
        return ms

    # ---- generation ----------------------------------------------------------------------------------------

    def generate(self, model: str, *, prompt: str | None = None, messages: list[dict] | None = None,
                 max_tokens: int = 64, temperature: float = 0.0, top_p: float = 1.0,
                 stop: list[str] | None = None) -> dict[str, Any]:
        target = self.resolve(model)
        ids = encode_chat_prompt(self.tokenizer, messages) if messages is not None else \
            encode_prompt(self.tokenizer, prompt or "")
        with self.lock:
            swap_ms = None
            if target is None:
                context = self.model.disable_adapter()
            else:
                swap_ms = self._swap(self._cached(*target))
                context = nullcontext()
            key = target[0] if target else "base"
            self.metrics.requests[key] = self.metrics.requests.get(key, 0) + 1
            with context, torch.no_grad():
                output = self.model.generate(
                    input_ids=torch.tensor([ids], device=self.device), max_new_tokens=max_tokens,
                    do_sample=temperature > 0, temperature=temperature if temperature > 0 else None,
                    top_p=top_p if temperature > 0 else None, pad_token_id=self.tokenizer.pad_token_id)
        new = output[0][len(ids):].tolist()
        eos = self.tokenizer.eos_token_id
        finish = "stop" if eos in new else "length"
        text = self.tokenizer.decode(new[: new.index(eos)] if eos in new else new, skip_special_tokens=True)
        for marker in stop or []:
            if marker and marker in text:
                text, finish = text[: text.index(marker)], "stop"
        return {"text": text, "finish_reason": finish, "adapter": key, "swap_ms": swap_ms,
                "usage": {"prompt_tokens": len(ids), "completion_tokens": len(new),
                          "total_tokens": len(ids) + len(new)}}

    def prometheus(self) -> str:
        lines = ["# HELP fts_edge_swap_ms Time to move an adapter into the slot (ms).",
                 "# TYPE fts_edge_swap_ms histogram"]
        swaps = list(self.metrics.swaps)
        for bound in SWAP_BUCKETS_MS:
            lines.append(f'fts_edge_swap_ms_bucket{{le="{bound}"}} {sum(1 for s in swaps if s <= bound)}')
        lines += [f'fts_edge_swap_ms_bucket{{le="+Inf"}} {len(swaps)}', f"fts_edge_swap_ms_sum {sum(swaps):.3f}",
                  f"fts_edge_swap_ms_count {len(swaps)}",
                  "# TYPE fts_edge_cache_hits_total counter", f"fts_edge_cache_hits_total {self.metrics.hits}",
                  "# TYPE fts_edge_cache_misses_total counter", f"fts_edge_cache_misses_total {self.metrics.misses}",
                  "# TYPE fts_edge_loaded_adapters gauge", f"fts_edge_loaded_adapters {len(self.cache)}",
                  "# TYPE fts_edge_cached_bytes gauge",
                  f"fts_edge_cached_bytes {sum(c.bytes for c in self.cache.values())}",
                  "# TYPE fts_edge_requests_total counter"]
        lines += [f'fts_edge_requests_total{{adapter="{k}"}} {v}' for k, v in sorted(self.metrics.requests.items())]
        return "\n".join(lines) + "\n"
