"""One base model, many adapters: the edge runtime's engine.

The base is wrapped once by PEFT with a single adapter *slot* of the largest rank served (all linear layers).
Serving an adapter copies its factors into the slot — zero-padded to the slot's rank, which leaves
B @ A unchanged — and sets each layer's scaling: an in-place copy of a few MB instead of PEFT's
`load_adapter` (which builds new modules). Adapters wait in a host-memory LRU cache bounded in bytes (pinned
on CUDA so the copy runs at full bandwidth). One request runs at a time under a lock, so a request is never
answered with another request's adapter. Figures are kept with `prometheus_client`, one registry per engine.
"""

from __future__ import annotations

import json
import threading
import time
from collections import OrderedDict
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from jinja2 import TemplateError
from peft import LoraConfig, get_peft_model
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from safetensors import SafetensorError
from safetensors.torch import load_file
from transformers import StoppingCriteria, StoppingCriteriaList

from fts_mcp.adapters.inspect import CONFIG, LORA_KEY, WEIGHTS, read_adapter
from fts_mcp.edge.sources import StoreSource
from fts_mcp.edge.store import CorruptAdapter
from fts_mcp.errors import FtsError, InvalidArgument, about
from fts_mcp.models import loading
from fts_mcp.paths import resolve_inside
from fts_mcp.training.data import encode_chat_prompt, encode_prompt

SLOT = "slot"
SWAP_BUCKETS_SECONDS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)


@dataclass
class Cached:
    key: str
    factors: dict[str, tuple[torch.Tensor, torch.Tensor]]  # module path -> (A padded, B padded), host memory
    scaling: float
    bytes: int


class DeadlineExceeded(FtsError):
    """A request ran past the runtime's --request-timeout (waiting included)."""

    code = "deadline_exceeded"


class Interrupt(StoppingCriteria):
    """Ends generation between tokens when the client has gone or the request's deadline has passed."""

    def __init__(self, cancel: threading.Event | None, deadline: float | None) -> None:
        self.cancel, self.deadline, self.reason = cancel, deadline, None

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        if self.cancel is not None and self.cancel.is_set():
            self.reason = "cancelled"
        elif self.deadline is not None and time.monotonic() > self.deadline:
            self.reason = "deadline"
        return torch.full((input_ids.shape[0],), self.reason is not None, dtype=torch.bool, device=input_ids.device)


class Metrics:
    """The runtime's Prometheus figures (served at /metrics)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.swap = Histogram("fts_edge_swap_seconds", "Time to move an adapter into the device slot",
                              buckets=SWAP_BUCKETS_SECONDS, registry=self.registry)
        self.hits = Counter("fts_edge_cache_hits", "Adapter requests served from the host cache",
                            registry=self.registry)
        self.misses = Counter("fts_edge_cache_misses", "Adapter requests read from the store",
                              registry=self.registry)
        self.evictions = Counter("fts_edge_cache_evictions", "Adapters evicted from the host cache",
                                 registry=self.registry)
        self.requests = Counter("fts_edge_requests", "Completion requests by adapter", ["adapter"],
                                registry=self.registry)
        self.tokens = Counter("fts_edge_completion_tokens", "Generated tokens by adapter", ["adapter"],
                              registry=self.registry)
        self.cached = Gauge("fts_edge_cached_adapters", "Adapters in the host cache", registry=self.registry)
        self.cached_bytes = Gauge("fts_edge_cached_bytes", "Bytes of adapters in the host cache",
                                  registry=self.registry)


class Engine:
    def __init__(self, base: str, source: StoreSource, *, quantize: str = "auto", max_rank: int = 64,
                 max_cached_bytes: int = 2 << 30, roots: tuple[Path, ...] = (), trust_remote_code: bool = False
                 ) -> None:
        self.base_name = base
        self.source = source
        self.roots = roots  # folders load_lora_adapter may read besides the store
        self.max_rank = max_rank
        self.max_cached_bytes = max_cached_bytes
        self.device = loading.device()
        self.dtype = loading.compute_dtype(self.device)
        self.tokenizer = loading.load_tokenizer(base, trust_remote_code=trust_remote_code, param="--base")
        nf4 = quantize == "nf4" or (quantize == "auto" and self.device.type == "cuda")
        model = loading.load_model(base, trust_remote_code=trust_remote_code, quantization="nf4" if nf4 else "none",
                                   dtype=self.dtype, on=self.device, param="--base")
        self.model = get_peft_model(model, LoraConfig(r=max_rank, lora_alpha=max_rank, lora_dropout=0.0,
                                                      target_modules="all-linear"), adapter_name=SLOT).eval()
        prefix = "base_model.model."
        self.context = getattr(model.config, "max_position_embeddings", None)
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
        """An adapter's factors, padded to the slot's rank, in host memory. A config or weights file that is not
        what a LoRA adapter holds is refused as corrupt (502), never a server error."""
        try:
            config = json.loads((folder / CONFIG).read_text())
            r = int(config["r"])
            alpha = float(config.get("lora_alpha", r))
            if r < 1 or not alpha > 0:
                raise ValueError(f"r={r}, lora_alpha={alpha}")
            tensors = load_file(folder / WEIGHTS)
        except (OSError, ValueError, KeyError, TypeError, AttributeError, SafetensorError) as exc:
            raise CorruptAdapter(f"{key} cannot be read as a LoRA adapter ({type(exc).__name__}: {str(exc)[:200]})",
                                 param="model") from exc
        if config.get("use_dora"):
            raise InvalidArgument(f"{key} is a DoRA adapter; the runtime serves plain LoRA", param="model")
        if r > self.max_rank:
            raise InvalidArgument(f"{key} has rank {r}, above this runtime's --max-rank {self.max_rank}",
                                  param="model")
        scaling = alpha / (r ** 0.5) if config.get("use_rslora") else alpha / r
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
            if tensor.dim() != 2 or not tensor.is_floating_point():
                raise CorruptAdapter(f"{key}: {name} is not a floating-point matrix", param="model")
            pair = factors.setdefault(path, [None, None])
            pair[0 if match.group(3) == "A" else 1] = tensor
        padded: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        size = 0
        for path, (a, b) in factors.items():
            if a is None or b is None or a.shape[0] != r or b.shape[1] != r:
                raise CorruptAdapter(f"{key}: {path} does not hold a rank-{r} lora_A / lora_B pair", param="model")
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
            self.metrics.hits.inc()
            self.cache.move_to_end(key)
            return self.cache[key]
        self.metrics.misses.inc()
        entry = self._read(key, folder)
        self.cache[key] = entry
        while sum(c.bytes for c in self.cache.values()) > self.max_cached_bytes and len(self.cache) > 1:
            evicted, _ = self.cache.popitem(last=False)
            self.metrics.evictions.inc()
            if self.active is not None and self.active.key == evicted:
                self.active = None
        self._gauge_cache()
        return entry

    def _gauge_cache(self) -> None:
        self.metrics.cached.set(len(self.cache))
        self.metrics.cached_bytes.set(sum(c.bytes for c in self.cache.values()))

    def resolve(self, model: str) -> tuple[str, Path] | None:
        """The adapter a request's `model` names: (key, folder); None for the base model itself."""
        if model in (self.base_name, Path(self.base_name).name, "base"):
            return None
        if model in self.named:
            return model, self.named[model]
        manifest = self.source.resolve(model)
        return f"{manifest.name}@{manifest.version}", self.source.folder(manifest)

    def load_named(self, name: str, path: str) -> float:
        """vLLM's load_lora_adapter: a store reference or a version's folder in this runtime's store (verified
        against its manifest), or an adapter folder inside the roots this runtime was given (checked like any
        adapter before it is read). Returns load ms."""
        started = time.perf_counter()
        with about("lora_path"):
            folder = self._named_folder(path)
        with self.lock:
            self.cache.pop(name, None)
            self._cached(name, folder)
            self.named[name] = folder
        return (time.perf_counter() - started) * 1000

    def _named_folder(self, path: str) -> Path:
        if not path.startswith(("/", ".", "~")):
            return self.source.folder(self.source.resolve(path, param="lora_path"))
        store = self.source.local
        resolved = Path(path).expanduser().resolve()
        if store is not None and resolved.is_relative_to(store.root):
            parts = resolved.relative_to(store.root).parts
            if len(parts) != 2:
                raise InvalidArgument(f"{path!r} is inside the store but is not a version folder (name/vN)",
                                      param="lora_path")
            return self.source.folder(store.manifest(*parts))
        if not self.roots:
            raise InvalidArgument("this runtime loads adapters from its store only; give a store reference "
                                  "such as name@v1", param="lora_path")
        folder = resolve_inside(path, self.roots, param="lora_path")
        read_adapter(folder, param="lora_path")
        return folder

    def unload_named(self, name: str) -> None:
        if name not in self.named:
            raise InvalidArgument(f"no adapter loaded as {name!r}; loaded: {', '.join(self.named) or 'none'}",
                                  param="lora_name")
        with self.lock:
            del self.named[name]
            self.cache.pop(name, None)
            self._gauge_cache()
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
        seconds = time.perf_counter() - started
        self.metrics.swap.observe(seconds)
        return seconds * 1000

    # ---- generation ----------------------------------------------------------------------------------------

    def prompt_ids(self, prompt: str | None, messages: list[dict] | None, max_tokens: int) -> list[int]:
        """The prompt's tokens, refused (naming the argument) when prompt + completion exceed the context."""
        param = "messages" if messages is not None else "prompt"
        try:
            ids = encode_chat_prompt(self.tokenizer, messages) if messages is not None else \
                encode_prompt(self.tokenizer, prompt or "")
        except (TemplateError, ValueError, TypeError, KeyError, IndexError) as exc:
            raise InvalidArgument(f"the model's chat template refuses these messages: {str(exc)[:300]}",
                                  param=param) from exc
        if self.context is not None and len(ids) + max_tokens > self.context:
            if len(ids) >= self.context:
                raise InvalidArgument(f"the prompt is {len(ids):,} tokens; {self.base_name} reads at most "
                                      f"{self.context:,} tokens, prompt and completion together", param=param)
            raise InvalidArgument(f"prompt ({len(ids):,} tokens) + max_tokens ({max_tokens:,}) exceed the model's "
                                  f"context of {self.context:,} tokens; ask for at most "
                                  f"{self.context - len(ids):,} tokens", param="max_tokens")
        return ids

    def generate(self, model: str, *, prompt: str | None = None, messages: list[dict] | None = None,
                 max_tokens: int = 64, temperature: float = 0.0, top_p: float = 1.0,
                 stop: list[str] | None = None, cancel: threading.Event | None = None,
                 deadline: float | None = None) -> dict[str, Any]:
        """One completion. `cancel` (the client went away) and `deadline` (a monotonic time) end it between
        tokens; waiting for the device counts towards the deadline."""
        target = self.resolve(model)
        ids = self.prompt_ids(prompt, messages, max_tokens)
        wait = -1 if deadline is None else max(0.0, deadline - time.monotonic())
        if not self.lock.acquire(timeout=wait):
            raise DeadlineExceeded("the request waited past its deadline for the device; retry, or raise "
                                   "--request-timeout", param="model")
        try:
            if cancel is not None and cancel.is_set():  # the client left while waiting for the device
                return {"text": "", "finish_reason": "cancelled", "adapter": target[0] if target else "base",
                        "swap_ms": None, "usage": {"prompt_tokens": len(ids), "completion_tokens": 0,
                                                   "total_tokens": len(ids)}}
            swap_ms = None
            if target is None:
                context = self.model.disable_adapter()
            else:
                swap_ms = self._swap(self._cached(*target))
                context = nullcontext()
            key = target[0] if target else "base"
            interrupt = Interrupt(cancel, deadline)
            with context:
                text, finish, new_tokens = loading.generate(
                    self.model, self.tokenizer, ids, max_tokens=max_tokens, temperature=temperature, top_p=top_p,
                    stopping_criteria=StoppingCriteriaList([interrupt]))
        finally:
            self.lock.release()
        self.metrics.requests.labels(adapter=key).inc()
        self.metrics.tokens.labels(adapter=key).inc(new_tokens)
        if interrupt.reason == "deadline":
            raise DeadlineExceeded(f"generation ran past the request's deadline after {new_tokens} tokens; ask for "
                                   "fewer max_tokens, or raise --request-timeout", param="max_tokens")
        if interrupt.reason == "cancelled":
            finish = "cancelled"
        for marker in stop or []:
            if marker and marker in text:
                text, finish = text[: text.index(marker)], "stop"
        return {"text": text, "finish_reason": finish, "adapter": key, "swap_ms": swap_ms,
                "usage": {"prompt_tokens": len(ids), "completion_tokens": new_tokens,
                          "total_tokens": len(ids) + new_tokens}}
