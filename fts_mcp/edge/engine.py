"""One base model, many adapters, one batch: the edge runtime's engine.

The base model is loaded once. Adapters live in three tiers: the store (local or HTTP), a host-memory LRU cache
bounded in bytes (pinned on CUDA), and `max_loras` device slots (`fts_mcp.edge.bank`). A scheduler thread runs
continuous batching: requests for any mix of adapters (and the base) share each forward pass, every row with its
own slot; new requests are prefilled and join between decode steps, finished ones leave, and a slot is reused
only once no running request holds it — so an answer never uses another request's adapter, and a request that
started on an adapter version finishes on it even if an alias moves meanwhile.

`model` may also stack adapters: `support+tone` serves the sum of both adapters' deltas, `0.7*support+0.3*tone`
weighs them — exactly, as one slot holding both adapters' factors side by side (ranks add up). `base` (or the base
model's own name) is the base: alone, or in a stack where it adds nothing. `parse_model` is the one reading of a
`model`, for the tenant check and the resolver alike.

`max_batch=1` serves one request at a time (the runtime's earlier behaviour; the benchmark's baseline).
Figures are kept with `prometheus_client`, one registry per engine.
"""

from __future__ import annotations

import inspect
import math
import queue
import re
import threading
import time
from collections import OrderedDict
from collections.abc import Collection, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from jinja2 import TemplateError
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from safetensors import SafetensorError
from safetensors.torch import load_file
from transformers import DynamicCache

from fts_mcp.adapters.inspect import LORA_KEY, WEIGHTS, read_adapter, read_adapter_config
from fts_mcp.adapters.sources import StoreSource
from fts_mcp.adapters.store import BASE, CorruptAdapter, parse_ref
from fts_mcp.edge.bank import BASE_SLOT, LoraBank
from fts_mcp.errors import FtsError, InvalidArgument, PathNotAllowed, about
from fts_mcp.models import loading
from fts_mcp.models.base import TrainingBase, read_training_base
from fts_mcp.models.prompts import encode_chat_prompt, encode_prompt
from fts_mcp.paths import resolve_inside

SWAP_BUCKETS_SECONDS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
LATENCY_BUCKETS_SECONDS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64)
MAX_STACKED = 8
MAX_WEIGHT = 100.0
# One term of a stack, whole (fullmatch): an optional weight and `*`, then a reference; spaces around them only.
TERM = re.compile(r" *(?:(?P<weight>[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?) *\* *)?(?P<ref>[^*+\s]+) *")
STACK_FORMS = "stack adapters as 'a+b' or '0.7*a+0.3*b'"


@dataclass
class Cached:
    key: str
    factors: dict[str, tuple[torch.Tensor, torch.Tensor]]  # module path -> (A (r, in), B (out, r) x scaling), host
    rank: int
    bytes: int


@dataclass(frozen=True)
class Term:
    """One part of a request's `model`: an adapter reference and its weight, or the base model (`ref` None)."""

    weight: float
    ref: str | None
    name: str | None  # the adapter's name, which a tenant's patterns are matched against


def _shown(value: str) -> str:
    return repr(value if len(value) <= 80 else value[:77] + "...")


def parse_model(model: str, base_names: Collection[str]) -> list[Term]:
    """A request's `model` as its terms, each checked: an adapter (`a`, `a@v2`, `a:prod`, or a name given to
    load_lora_adapter), a stack (`a+b`, `0.7*a+0.3*b`, at most MAX_STACKED, weights within +-MAX_WEIGHT), or the
    base model by any of `base_names`, which has no versions or aliases and adds nothing to a stack. The tenant
    check and the resolver both read `model` through this, so what a key is allowed is what is served."""
    if model in base_names:
        return [Term(1.0, None, None)]
    if "+" not in model and "*" not in model:
        texts, single = [model], True
    else:
        texts, single = model.split("+"), False
    if len(texts) > MAX_STACKED:
        raise InvalidArgument(f"at most {MAX_STACKED} adapters can be stacked", param="model")
    terms = []
    for text in texts:
        match = None if single else TERM.fullmatch(text)
        if not single and match is None:
            raise InvalidArgument(f"{_shown(text.strip())} in {_shown(model)} is not an adapter or weight*adapter; "
                                  f"{STACK_FORMS}", param="model")
        ref = text if single else match["ref"]
        weight = 1.0 if single or match["weight"] is None else float(match["weight"])
        if not (math.isfinite(weight) and abs(weight) <= MAX_WEIGHT):
            raise InvalidArgument(f"the weight {match['weight']} in {_shown(model)} must be a number between "
                                  f"{-MAX_WEIGHT:g} and {MAX_WEIGHT:g}", param="model")
        if ref in base_names:
            terms.append(Term(weight, None, None))
            continue
        name = ref.split("@", 1)[0].split(":", 1)[0]
        if name in base_names:
            raise InvalidArgument(f"{_shown(ref)}: {name} is the base model, which has no versions or aliases",
                                  param="model")
        terms.append(Term(weight, ref, parse_ref(ref, param="model")[0]))
    return terms


class DeadlineExceeded(FtsError):
    """A request ran past the runtime's --request-timeout (waiting included)."""

    code = "deadline_exceeded"


def metric_label(key: str) -> str:
    """The adapter label of a request's metrics: a stack counts under its members, whatever their weights (each
    distinct weight would otherwise be a new time series, without bound)."""
    return "+".join(term.split("*", 1)[-1] for term in key.split("+"))


class Metrics:
    """The runtime's Prometheus figures (served at /metrics)."""

    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.swap = Histogram("fts_edge_swap_seconds", "Time to copy an adapter into a device slot",
                              buckets=SWAP_BUCKETS_SECONDS, registry=r)
        self.queue_time = Histogram("fts_edge_queue_seconds", "Time from arrival to joining the batch",
                                    buckets=LATENCY_BUCKETS_SECONDS, registry=r)
        self.first_token = Histogram("fts_edge_time_to_first_token_seconds", "Time from arrival to the first token",
                                     buckets=LATENCY_BUCKETS_SECONDS, registry=r)
        self.latency = Histogram("fts_edge_request_seconds", "Time from arrival to the last token",
                                 buckets=LATENCY_BUCKETS_SECONDS, registry=r)
        self.batch = Histogram("fts_edge_batch_size", "Rows in each decode step", buckets=BATCH_BUCKETS, registry=r)
        self.tokens_per_second = Gauge("fts_edge_tokens_per_second", "Generated tokens per second, last decode step",
                                       registry=r)
        self.slot_hits = Counter("fts_edge_slot_hits", "Requests whose adapter was already in a device slot",
                                 registry=r)
        self.slot_loads = Counter("fts_edge_slot_loads", "Adapters copied into a device slot", registry=r)
        self.hits = Counter("fts_edge_cache_hits", "Adapters served from the host cache", registry=r)
        self.misses = Counter("fts_edge_cache_misses", "Adapters read from the store", registry=r)
        self.evictions = Counter("fts_edge_cache_evictions", "Adapters evicted from the host cache", registry=r)
        self.requests = Counter("fts_edge_requests", "Completion requests by adapter", ["adapter"], registry=r)
        self.tokens = Counter("fts_edge_completion_tokens", "Generated tokens by adapter", ["adapter"], registry=r)
        self.cached = Gauge("fts_edge_cached_adapters", "Adapters in the host cache", registry=r)
        self.cached_bytes = Gauge("fts_edge_cached_bytes", "Bytes of adapters in the host cache", registry=r)


@dataclass
class Ticket:
    """One sequence being generated: what the scheduler produces and a consumer reads (thread-safe). The app
    waits with `changed()` (asyncio), a thread with `wait()`."""

    model: str
    key: str  # the adapter (version) it runs with, "base", or a stack
    prompt_tokens: int
    arrived: float = field(default_factory=time.monotonic)
    first_token_at: float | None = None
    tokens: list[int] = field(default_factory=list)
    finish_reason: str | None = None  # stop | length | cancelled | deadline
    error: FtsError | None = None
    text: str | None = None  # the final text, once finished
    cancel: threading.Event = field(default_factory=threading.Event)
    _cond: threading.Condition = field(default_factory=threading.Condition)
    _listeners: list = field(default_factory=list)

    @property
    def done(self) -> bool:
        return self.finish_reason is not None or self.error is not None

    @contextmanager
    def producing(self) -> Iterator[Ticket]:
        """The producer's side: change tokens, finish_reason, text or error inside; readers see the change whole
        and are woken once it is made."""
        with self._cond:
            yield self
            self._cond.notify_all()
            for loop, event in list(self._listeners):
                loop.call_soon_threadsafe(event.set)

    def listen(self, loop: Any, event: Any) -> None:
        with self._cond:
            self._listeners.append((loop, event))

    def wait(self, timeout: float | None = None) -> bool:
        with self._cond:
            return self._cond.wait_for(lambda: self.done, timeout)

    def snapshot(self) -> tuple[list[int], str | None, str | None, FtsError | None]:
        with self._cond:
            return list(self.tokens), self.finish_reason, self.text, self.error


@dataclass
class Request:
    ticket: Ticket
    ids: list[int]
    target: tuple[str, Any] | None  # (key, loader) or None for the base
    max_tokens: int
    temperature: float
    top_p: float
    stop: list[str]
    generator: torch.Generator | None
    deadline: float | None
    ignore_eos: bool = False


@dataclass
class Row:
    request: Request
    slot: int
    length: int  # tokens in the cache for this row (prompt + generated so far, minus the pending one)
    released: bool = False  # its slot hold has been given back


class Engine:
    def __init__(self, base: str, source: StoreSource, *, quantize: str = "auto", max_rank: int = 64,
                 max_cached_bytes: int = 2 << 30, roots: tuple[Path, ...] = (), private: tuple[Path, ...] = (),
                 trust_remote_code: bool = False, max_loras: int = 8, max_batch: int = 32) -> None:
        if max_loras < 1 or max_batch < 1:
            raise InvalidArgument("max_loras and max_batch must be at least 1", param="max_loras")
        self.base_name = base
        self.base_names = frozenset({base, Path(base).name, BASE})  # what a `model` may call the base
        self.source = source
        self.roots = roots  # folders load_lora_adapter may read besides the store
        self.private = tuple(Path(p).resolve() for p in private)  # ... and never, but through the store (FTS_HOME)
        self.max_rank = max_rank
        self.max_cached_bytes = max_cached_bytes
        self.max_batch = max_batch
        self.device = loading.device()
        self.dtype = loading.compute_dtype(self.device)
        self.tokenizer = loading.load_tokenizer(base, trust_remote_code=trust_remote_code, param="--base")
        nf4 = quantize == "nf4" or (quantize == "auto" and self.device.type == "cuda")
        self.quantization = "nf4" if nf4 else "none"
        self.model = loading.load_model(base, trust_remote_code=trust_remote_code, quantization=self.quantization,
                                        dtype=self.dtype, on=self.device, param="--base").eval()
        self.trained_on: dict[Path, TrainingBase | None] = {}  # adapter folder -> the base it was trained on
        self.context = getattr(self.model.config, "max_position_embeddings", None)
        # transformers renamed forward's `past_key_values` to `cache` (the old name warns); take the model's own
        self.cache_arg = "cache" if "cache" in inspect.signature(type(self.model).forward).parameters \
            else "past_key_values"
        self.bank = LoraBank(self.model, slots=max_loras, rank=max_rank, dtype=self.dtype, device=self.device)
        self.slots = self.bank.layers  # module path -> layer an adapter may adapt
        self.cache: OrderedDict[str, Cached] = OrderedDict()
        self.named: dict[str, Path] = {}  # admin-loaded adapters (vLLM's load_lora_adapter): name -> folder
        self.loads: dict[str, int] = {}  # name -> how many times it was loaded (its key is name#count)
        self.slot_key: list[str | None] = [None] * self.bank.slots  # slot -> adapter key held
        self.slot_refs = [0] * self.bank.slots  # running rows using each slot
        self.slot_used = [0.0] * self.bank.slots  # last use, for LRU reuse of free slots
        self.lock = threading.RLock()  # host cache and slot tables
        self.metrics = Metrics()
        self.waiting: queue.SimpleQueue[Request] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._wake = threading.Event()
        self._closed = False

    # ---- adapters in host memory ---------------------------------------------------------------------------

    def _read(self, key: str, folder: Path) -> Cached:
        """An adapter's factors, scaling folded into B, in host memory. A config or weights file that is not what a
        LoRA adapter holds is refused as corrupt (502), never a server error."""
        try:
            config = read_adapter_config(folder, param="model")
            tensors = load_file(folder / WEIGHTS)
        except InvalidArgument as exc:
            raise CorruptAdapter(f"{key} cannot be read as a LoRA adapter ({exc.message[:200]})",
                                 param="model") from exc
        except (OSError, ValueError, SafetensorError) as exc:
            raise CorruptAdapter(f"{key} cannot be read as a LoRA adapter ({type(exc).__name__}: {str(exc)[:200]})",
                                 param="model") from exc
        if config.use_dora:
            raise InvalidArgument(f"{key} is a DoRA adapter; the runtime serves plain LoRA", param="model")
        r, scaling = config.r, config.scaling
        if r > self.max_rank:
            raise InvalidArgument(f"{key} has rank {r}, above this runtime's --max-rank {self.max_rank}",
                                  param="model")
        pairs: dict[str, list[torch.Tensor | None]] = {}
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
            pair = pairs.setdefault(path, [None, None])
            pair[0 if match.group(3) == "A" else 1] = tensor
        factors: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        size = 0
        for path, (a, b) in pairs.items():
            if a is None or b is None or a.shape[0] != r or b.shape[1] != r:
                raise CorruptAdapter(f"{key}: {path} does not hold a rank-{r} lora_A / lora_B pair", param="model")
            layer = self.slots[path]
            if a.shape[1] != layer.in_features or b.shape[0] != layer.out_features:
                raise InvalidArgument(f"{key}: {path} has shape {(b.shape[0], a.shape[1])}, the base has "
                                      f"{(layer.out_features, layer.in_features)}: it was trained for another base",
                                      param="model")
            a = a.to(self.dtype).contiguous()
            b = (b.float() * scaling).to(self.dtype).contiguous()
            if self.device.type == "cuda":
                a, b = a.pin_memory(), b.pin_memory()
            factors[path] = (a, b)
            size += a.numel() * a.element_size() + b.numel() * b.element_size()
        return Cached(key=key, factors=factors, rank=r, bytes=size)

    def _cached(self, key: str, folder: Path) -> Cached:
        with self.lock:
            if key in self.cache:
                self.metrics.hits.inc()
                self.cache.move_to_end(key)
                return self.cache[key]
        self.metrics.misses.inc()
        entry = self._read(key, folder)
        with self.lock:
            self._remember(entry)
        return entry

    def _remember(self, entry: Cached) -> None:
        self.cache[entry.key] = entry
        self.cache.move_to_end(entry.key)
        while sum(c.bytes for c in self.cache.values()) > self.max_cached_bytes and len(self.cache) > 1:
            self.cache.popitem(last=False)
            self.metrics.evictions.inc()
        self.metrics.cached.set(len(self.cache))
        self.metrics.cached_bytes.set(sum(c.bytes for c in self.cache.values()))

    def _stacked(self, key: str, parts: list[tuple[float, str, Path]]) -> Cached:
        """One entry holding several adapters side by side: A stacked along the rank, each B weighted, so the
        slot's delta is the weighted sum of theirs."""
        with self.lock:
            if key in self.cache:
                self.metrics.hits.inc()
                self.cache.move_to_end(key)
                return self.cache[key]
        entries = [(weight, self._cached(part, folder)) for weight, part, folder in parts]
        rank = sum(e.rank for _, e in entries)
        if rank > self.max_rank:
            raise InvalidArgument(f"the stacked adapters' ranks add up to {rank}, above this runtime's --max-rank "
                                  f"{self.max_rank}", param="model")
        factors, size = {}, 0
        for path in {p for _, e in entries for p in e.factors}:
            layer = self.slots[path]
            a_parts, b_parts = [], []
            for weight, e in entries:
                a, b = e.factors.get(path) or (torch.zeros(e.rank, layer.in_features, dtype=self.dtype),
                                               torch.zeros(layer.out_features, e.rank, dtype=self.dtype))
                a_parts.append(a)
                b_parts.append((b.float() * weight).to(self.dtype))
            factors[path] = (torch.cat(a_parts), torch.cat(b_parts, dim=1))
            size += sum(t.numel() * t.element_size() for t in factors[path])
        entry = Cached(key=key, factors=factors, rank=rank, bytes=size)
        with self.lock:
            self._remember(entry)
        return entry

    def terms(self, model: str) -> list[Term]:
        """`model` read as `parse_model` reads it for this runtime's base."""
        return parse_model(model, self.base_names)

    def resolve(self, model: str) -> tuple[str, Any] | None:
        """What a request's `model` names: (key, loader) — key an adapter version, a loaded name or a stack — or
        None for the base model itself. Unknown names raise (404); a weight that is not a number, 400."""
        terms = self.terms(model)
        adapters = [t for t in terms if t.ref is not None]  # the base adds nothing: 'base+a' is a stack of a alone
        if not adapters:
            return None
        if len(terms) == 1 and "*" not in model:
            key, folder = self._one(adapters[0].ref)
            return key, lambda: self._cached(key, folder)
        parts = [(t.weight, *self._one(t.ref)) for t in adapters]
        key = "+".join(f"{w:g}*{k}" for w, k, _ in parts)
        return key, lambda: self._stacked(key, parts)

    def base_warning(self, model: str, *, fetch: bool = True) -> str | None:
        """Why `model`'s answers may differ from its evaluation: an adapter in it was trained on another base (NF4
        vs 16-bit) than this runtime serves. Such adapters are served anyway, with this warning in /v1/models and
        in each answer. None for the base, an unknown model and adapters without a record. `fetch` off: only what
        is known without asking an HTTP store (a listing of every adapter must not fetch every manifest)."""
        try:
            terms = self.terms(model)
        except FtsError:
            return None
        for term in terms:
            if term.ref is None:
                continue
            try:
                trained = self._trained_on(term.ref, fetch=fetch)
            except FtsError:
                continue
            if trained is not None and trained.quantization != self.quantization:
                served = "the 4-bit NF4 base" if self.quantization == "nf4" else "the 16-bit base"
                return (f"{term.ref} was trained on {trained.describe()}, and this runtime serves {served}: its "
                        f"answers may differ from its evaluation; serve it from a runtime started with --quantize "
                        f"{trained.quantization}")
        return None

    def _trained_on(self, ref: str, *, fetch: bool) -> TrainingBase | None:
        """The base an adapter was trained on, as its folder (a loaded name) or its manifest records it."""
        if ref in self.named:
            folder = self.named[ref]
            if folder not in self.trained_on:
                self.trained_on[folder] = read_training_base(folder, param="model")
            return self.trained_on[folder]
        manifest = self.source.resolve(ref) if fetch else self.source.peek(ref)
        return manifest.training_base if manifest is not None else None

    def _one(self, model: str) -> tuple[str, Path]:
        if model in self.named:  # keyed by its load: a reload is another adapter, never the old slot's weights
            return f"{model}#{self.loads[model]}", self.named[model]
        manifest = self.source.resolve(model)
        return f"{manifest.name}@{manifest.version}", self.source.folder(manifest)

    def load_named(self, name: str, path: str) -> float:
        """vLLM's load_lora_adapter: a store reference or a version's folder in this runtime's store (verified
        against its manifest), or an adapter folder inside the roots this runtime was given (checked like any
        adapter before it is read), under `name` — a store reference's form, never the base's name. Returns load
        ms."""
        started = time.perf_counter()
        self._check_name(name)
        with about("lora_path"):
            folder = self._named_folder(path)
        with self.lock:
            generation = self.loads[name] = self.loads.get(name, 0) + 1
        entry = self._read(f"{name}#{generation}", folder)
        with self.lock:
            self._forget(name)
            self._remember(entry)
            self.named[name] = folder
        return (time.perf_counter() - started) * 1000

    def _check_name(self, name: str) -> None:
        """A loaded adapter's name follows the store's rule (`name`, `name@v3`, `name:prod`), so a request's `model`
        reads it the one way; `base` and the base model's own names stay the base."""
        adapter = parse_ref(name, param="lora_name")[0]
        if adapter in self.base_names:
            raise InvalidArgument(f"{_shown(name)}: {adapter} is this runtime's base model; choose another name",
                                  param="lora_name")

    def _named_folder(self, path: str) -> Path:
        """The folder `lora_path` names: a store reference, a version folder of the store (either verified against
        its manifest), or an adapter folder inside a root — never inside a private folder (FTS_HOME) but through
        the store, whatever a root covers. Every path is resolved (links, `..`) before it is judged."""
        if not path.startswith(("/", ".", "~")):
            return self.source.folder(self.source.resolve(path, param="lora_path"))
        store = self.source.local
        readable = ((store.root,) if store is not None else ()) + tuple(self.roots)
        if not readable:
            raise InvalidArgument("this runtime loads adapters from its store only; give a store reference "
                                  "such as name@v1", param="lora_path")
        folder = resolve_inside(path, readable, param="lora_path")
        if store is not None and folder.is_relative_to(store.root):
            parts = folder.relative_to(store.root).parts
            if len(parts) != 2:
                raise InvalidArgument(f"{_shown(path)} is inside the store but is not a version folder (name/vN)",
                                      param="lora_path")
            return self.source.folder(store.manifest(*parts))
        for private in self.private:
            if folder.is_relative_to(private):
                raise PathNotAllowed(f"{_shown(path)} resolves to {_shown(str(folder))}, inside FTS_HOME ({private}), "
                                     "whose jobs and caches this runtime does not read; publish the adapter to the "
                                     "store (deploy_adapter) and load it by reference", param="lora_path")
        read_adapter(folder, param="lora_path")
        return folder

    def unload_named(self, name: str) -> None:
        if name not in self.named:
            raise InvalidArgument(f"no adapter loaded as {name!r}; loaded: {', '.join(self.named) or 'none'}",
                                  param="lora_name")
        with self.lock:
            del self.named[name]
            self._forget(name)

    def _forget(self, key: str) -> None:
        """Drop a loaded name's adapter (every load of it, and stacks using it) from the host cache and from any
        slot no running row holds; a held slot keeps its key, which no new request resolves to any more."""

        def uses(k: str) -> bool:
            return any(part.split("*")[-1].split("#")[0] == key for part in k.split("+"))

        for cached in [k for k in self.cache if uses(k)]:
            del self.cache[cached]
        for slot, held in enumerate(self.slot_key):
            if held is not None and uses(held) and self.slot_refs[slot] == 0:
                self.slot_key[slot] = None
        self.metrics.cached.set(len(self.cache))
        self.metrics.cached_bytes.set(sum(c.bytes for c in self.cache.values()))

    # ---- device slots --------------------------------------------------------------------------------------

    def _claim_slot(self, target: tuple[str, Any] | None) -> int | None:
        """A slot holding the target's adapter (loading it into the least recently used free slot), or None
        when every slot is held by running rows."""
        if target is None:
            return BASE_SLOT
        key, load = target
        with self.lock:
            for slot in range(1, self.bank.slots):
                if self.slot_key[slot] == key:
                    self.metrics.slot_hits.inc()
                    return self._hold(slot)
            free = [s for s in range(1, self.bank.slots) if self.slot_refs[s] == 0]
            if not free:
                return None
            slot = min(free, key=lambda s: self.slot_used[s])
            self.slot_key[slot] = None
        entry = load()  # may read the store: outside the lock
        started = time.perf_counter()
        self.bank.load(slot, entry.factors)
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        self.metrics.swap.observe(time.perf_counter() - started)
        self.metrics.slot_loads.inc()
        with self.lock:
            self.slot_key[slot] = key
            return self._hold(slot)

    def _hold(self, slot: int) -> int:
        self.slot_refs[slot] += 1
        self.slot_used[slot] = time.monotonic()
        return slot

    def _release(self, slot: int) -> None:
        if slot != BASE_SLOT:
            with self.lock:
                self.slot_refs[slot] -= 1
                self.slot_used[slot] = time.monotonic()

    # ---- requests ------------------------------------------------------------------------------------------

    def prompt_ids(self, prompt: str | None, messages: list[dict] | None, max_tokens: int) -> list[int]:
        """The prompt's tokens, refused (naming the argument) when prompt + completion exceed the context."""
        param = "messages" if messages is not None else "prompt"
        try:
            ids = encode_chat_prompt(self.tokenizer, messages) if messages is not None else \
                encode_prompt(self.tokenizer, prompt or "")
        except (TemplateError, ValueError, TypeError, KeyError, IndexError) as exc:
            raise InvalidArgument(f"the model's chat template refuses these messages: {str(exc)[:300]}",
                                  param=param) from exc
        if not ids:
            raise InvalidArgument("the prompt is empty (no tokens) for this model", param=param)
        if self.context is not None and len(ids) + max_tokens > self.context:
            if len(ids) >= self.context:
                raise InvalidArgument(f"the prompt is {len(ids):,} tokens; {self.base_name} reads at most "
                                      f"{self.context:,} tokens, prompt and completion together", param=param)
            raise InvalidArgument(f"prompt ({len(ids):,} tokens) + max_tokens ({max_tokens:,}) exceed the model's "
                                  f"context of {self.context:,} tokens; ask for at most "
                                  f"{self.context - len(ids):,} tokens", param="max_tokens")
        return ids

    def submit(self, model: str, ids: list[int], *, max_tokens: int = 64, temperature: float = 0.0,
               top_p: float = 1.0, stop: list[str] | None = None, seed: int | None = None,
               deadline: float | None = None, target: tuple[str, Any] | None | bool = False,
               cancel: threading.Event | None = None, ignore_eos: bool = False) -> Ticket:
        """Queue one sequence; the scheduler starts it as soon as a batch row (and a slot for its adapter) is
        free. `target` is `resolve(model)` when the caller already has it; setting `cancel` ends it;
        `ignore_eos` generates exactly max_tokens (benchmarks)."""
        target = self.resolve(model) if target is False else target
        ticket = Ticket(model=model, key=target[0] if target else "base", prompt_tokens=len(ids),
                        cancel=cancel or threading.Event())
        generator = None
        if temperature > 0:
            generator = torch.Generator(device="cpu")
            if seed is None:
                generator.seed()  # its own random seed; the process's RNG is left alone
            else:
                generator.manual_seed(seed)
        self.waiting.put(Request(ticket=ticket, ids=ids, target=target, max_tokens=max_tokens,
                                 temperature=temperature, top_p=top_p, stop=[s for s in stop or [] if s],
                                 generator=generator, deadline=deadline, ignore_eos=ignore_eos))
        self._start()
        return ticket

    def generate(self, model: str, *, prompt: str | None = None, messages: list[dict] | None = None,
                 max_tokens: int = 64, temperature: float = 0.0, top_p: float = 1.0,
                 stop: list[str] | None = None, cancel: threading.Event | None = None,
                 deadline: float | None = None, seed: int | None = None) -> dict[str, Any]:
        """One completion, waiting for it (for callers without an event loop). `cancel` (the client went away) and
        `deadline` (a monotonic time) end it between tokens; waiting for a batch row counts towards the
        deadline."""
        target = self.resolve(model)
        ids = self.prompt_ids(prompt, messages, max_tokens)
        ticket = self.submit(model, ids, max_tokens=max_tokens, temperature=temperature, top_p=top_p, stop=stop,
                             seed=seed, deadline=deadline, target=target, cancel=cancel)
        ticket.wait()
        return self.outcome(ticket)

    def outcome(self, ticket: Ticket) -> dict[str, Any]:
        """A finished ticket as an answer; its error (or a passed deadline) raised."""
        tokens, finish, text, failure = ticket.snapshot()
        if failure is not None:
            raise failure
        if finish == "deadline":
            raise DeadlineExceeded(f"generation ran past the request's deadline after {len(tokens)} tokens; ask for "
                                   "fewer max_tokens, or raise --request-timeout", param="max_tokens")
        return {"text": text, "finish_reason": finish, "adapter": ticket.key,
                "usage": {"prompt_tokens": ticket.prompt_tokens, "completion_tokens": len(tokens),
                          "total_tokens": ticket.prompt_tokens + len(tokens)}}

    def text_of(self, tokens: list[int]) -> str:
        return loading.decode(self.tokenizer, tokens)[0]

    # ---- the scheduler -------------------------------------------------------------------------------------

    def close(self) -> None:
        """Stop the scheduler once the requests it holds are done (none are accepted after this)."""
        self._closed = True
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=60)

    def _start(self) -> None:
        if self._closed:
            raise FtsError("the runtime is shutting down", param="model")
        with self.lock:
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._loop, name="fts-edge-scheduler", daemon=True)
                self._thread.start()
        self._wake.set()

    def _loop(self) -> None:
        rows: list[Row] = []
        cache: DynamicCache | None = None
        mask = pending = None  # (B, L) attention mask over the cache; (B, 1) next input tokens
        held: list[Request] = []  # waiting for a free slot
        while True:
            if not rows and not held and self.waiting.empty():
                if self._closed:
                    return
                self._wake.wait(1.0)
                self._wake.clear()
                continue
            joining: list[Row] = []
            try:
                rows, cache, mask, pending = self._retire(rows, cache, mask, pending)
                joining, held = self._admit(rows, held)
            except Exception as exc:  # noqa: BLE001 - a failed step fails its requests, never the runtime
                self._fail_rows(rows + joining, exc)
                rows, cache, mask, pending = [], None, None, None
                continue
            if joining:
                try:  # the running batch's cache is untouched until the merge: a bad prompt fails only its own
                    merged = self._prefill(joining, rows, cache, mask, pending)
                except Exception as exc:  # noqa: BLE001
                    self._fail_rows(joining, exc)
                else:
                    rows, cache, mask, pending = self._retire(*merged)
            if rows:
                try:
                    cache, mask, pending = self._decode(rows, cache, mask, pending)
                except Exception as exc:  # noqa: BLE001
                    self._fail_rows(rows, exc)
                    rows, cache, mask, pending = [], None, None, None

    def _admit(self, rows: list[Row], held: list[Request]) -> tuple[list[Row], list[Request]]:
        """Requests that join the batch now (each with a slot for its adapter), and those still waiting."""
        incoming = list(held)
        while True:
            try:
                incoming.append(self.waiting.get_nowait())
            except queue.Empty:
                break
        joining, still = [], []
        for request in incoming:
            ticket = request.ticket
            if ticket.cancel.is_set() or (request.deadline is not None and time.monotonic() > request.deadline):
                self._close(ticket, "cancelled" if ticket.cancel.is_set() else "deadline", [])
                continue
            if len(rows) + len(joining) >= self.max_batch:
                still.append(request)
                continue
            try:
                slot = self._claim_slot(request.target)
            except Exception as exc:  # noqa: BLE001 - a store error, a corrupt adapter, device memory: this request's
                self._fail(ticket, exc if isinstance(exc, FtsError) else FtsError(
                    f"loading the adapter failed: {type(exc).__name__}: {str(exc)[:300]}", param="model"))
                continue
            if slot is None:
                still.append(request)
                continue
            self.metrics.queue_time.observe(time.monotonic() - ticket.arrived)
            joining.append(Row(request=request, slot=slot, length=len(request.ids)))
        return joining, still

    @torch.no_grad()
    def _prefill(self, joining: list[Row], rows: list[Row], cache, mask, pending):
        """Run the new prompts (left-padded, one batch), take their first tokens, and merge their cache into the
        running batch's."""
        longest = max(len(r.request.ids) for r in joining)
        ids = torch.zeros(len(joining), longest, dtype=torch.long)
        new_mask = torch.zeros(len(joining), longest, dtype=torch.long)
        for i, row in enumerate(joining):
            prompt = row.request.ids
            ids[i, longest - len(prompt):] = torch.tensor(prompt)
            new_mask[i, longest - len(prompt):] = 1
        ids, new_mask = ids.to(self.device), new_mask.to(self.device)
        positions = (new_mask.cumsum(-1) - 1).clamp(min=0)
        new_cache = DynamicCache(config=self.model.config)
        self.bank.use([r.slot for r in joining], self.device)
        logits = self.model(input_ids=ids, attention_mask=new_mask, position_ids=positions,
                            **{self.cache_arg: new_cache}, use_cache=True).logits[:, -1]
        first = self._sample(logits, joining)
        for row, token in zip(joining, first, strict=True):
            self._push(row, token)
            if row.request.ticket.first_token_at is not None:
                self.metrics.first_token.observe(row.request.ticket.first_token_at - row.request.ticket.arrived)
        new_pending = torch.tensor(first, device=self.device)[:, None]
        if not rows:
            return joining, new_cache, new_mask, new_pending
        # merge: left-pad the shorter cache so both end on the newest token
        old_len, new_len = mask.shape[1], new_mask.shape[1]
        width = max(old_len, new_len)
        for old_layer, new_layer in zip(cache.layers, new_cache.layers, strict=True):
            old_layer.keys, old_layer.values = (torch.cat([_left_pad(o, width), _left_pad(n, width)])
                                                for o, n in ((old_layer.keys, new_layer.keys),
                                                             (old_layer.values, new_layer.values)))
        mask = torch.cat([_left_pad(mask, width), _left_pad(new_mask, width)])
        return rows + joining, cache, mask, torch.cat([pending, new_pending])

    @torch.no_grad()
    def _decode(self, rows: list[Row], cache, mask, pending):
        """One token for every row."""
        started = time.perf_counter()
        mask = torch.cat([mask, torch.ones(len(rows), 1, dtype=mask.dtype, device=mask.device)], dim=1)
        positions = torch.tensor([[r.length] for r in rows], device=self.device)
        self.bank.use([r.slot for r in rows], self.device)
        logits = self.model(input_ids=pending, attention_mask=mask, position_ids=positions,
                            **{self.cache_arg: cache}, use_cache=True).logits[:, -1]
        tokens = self._sample(logits, rows)
        for row, token in zip(rows, tokens, strict=True):
            row.length += 1
            self._push(row, token)
        self.metrics.batch.observe(len(rows))
        self.metrics.tokens_per_second.set(len(rows) / max(time.perf_counter() - started, 1e-9))
        return cache, mask, torch.tensor(tokens, device=self.device)[:, None]

    def _sample(self, logits: torch.Tensor, rows: list[Row]) -> list[int]:
        """Greedy for temperature 0; otherwise temperature and nucleus sampling with the request's generator."""
        logits = logits.float()
        chosen = logits.argmax(-1).tolist()
        for i, row in enumerate(rows):
            request = row.request
            if request.temperature <= 0:
                continue
            probs = torch.softmax(logits[i] / request.temperature, -1).cpu()
            if request.top_p < 1:
                ordered, order = probs.sort(descending=True)
                keep = ordered.cumsum(0) - ordered < request.top_p
                probs = torch.zeros_like(probs).scatter(0, order[keep], ordered[keep])
            chosen[i] = int(torch.multinomial(probs, 1, generator=request.generator))
        return chosen

    def _push(self, row: Row, token: int) -> None:
        """Record a token; finish the sequence at end of text, max_tokens or a stop sequence."""
        request, ticket = row.request, row.request.ticket
        eos = self.tokenizer.eos_token_id
        with ticket.producing():
            if ticket.done:
                return
            if token == eos and not request.ignore_eos:
                self._close(ticket, "stop", ticket.tokens)
                return
            if ticket.first_token_at is None:
                ticket.first_token_at = time.monotonic()
            ticket.tokens.append(token)
            if request.stop:  # only the tail can hold a stop sequence that this token completed
                tail = self.text_of(ticket.tokens[-(4 * max(map(len, request.stop)) + 16):])
                if any(s in tail for s in request.stop):
                    text = self.text_of(ticket.tokens)
                    hits = [text.index(s) for s in request.stop if s in text]
                    self._close(ticket, "stop", ticket.tokens, text=text[: min(hits)])
                    return
            if len(ticket.tokens) >= request.max_tokens:
                self._close(ticket, "length", ticket.tokens)

    def _close(self, ticket: Ticket, reason: str, tokens: list[int], text: str | None = None) -> None:
        with ticket.producing():
            if ticket.done:
                return
            ticket.text = text if text is not None else self.text_of(tokens)
            ticket.finish_reason = reason
            label = metric_label(ticket.key)
            self.metrics.requests.labels(adapter=label).inc()
            self.metrics.tokens.labels(adapter=label).inc(len(ticket.tokens))
            self.metrics.latency.observe(time.monotonic() - ticket.arrived)

    def _fail(self, ticket: Ticket, failure: FtsError) -> None:
        with ticket.producing():
            if not ticket.done:
                ticket.error = failure

    def _finish(self, row: Row, *, error: FtsError | None = None) -> None:
        if error is not None:
            self._fail(row.request.ticket, error)
        if not row.released:  # once: a row may be finished by a failure after it was retired
            row.released = True
            self._release(row.slot)

    def _fail_rows(self, rows: list[Row], exc: Exception) -> None:
        failure = exc if isinstance(exc, FtsError) else FtsError(
            f"generation failed: {type(exc).__name__}: {str(exc)[:300]}")
        for row in rows:
            self._finish(row, error=failure)

    def _retire(self, rows: list[Row], cache, mask, pending):
        """Drop finished, cancelled and overdue rows from the batch (and their slots' hold)."""
        now = time.monotonic()
        keep = []
        for i, row in enumerate(rows):
            ticket, request = row.request.ticket, row.request
            if not ticket.done and ticket.cancel.is_set():
                self._close(ticket, "cancelled", ticket.tokens)
            elif not ticket.done and request.deadline is not None and now > request.deadline:
                self._close(ticket, "deadline", ticket.tokens)
            if ticket.done:
                self._finish(row)
            else:
                keep.append(i)
        if len(keep) == len(rows):
            return rows, cache, mask, pending
        if not keep:
            return [], None, None, None
        index = torch.tensor(keep, device=self.device)
        cache.batch_select_indices(index)
        mask, pending = mask[index], pending[index]
        unused = int((mask.cumsum(-1) == 0).sum(-1).min())  # left padding every remaining row has
        if unused:
            mask = mask[:, unused:]
            for layer in cache.layers:
                layer.keys, layer.values = layer.keys[..., unused:, :], layer.values[..., unused:, :]
        return [rows[i] for i in keep], cache, mask, pending


def _left_pad(t: torch.Tensor, width: int) -> torch.Tensor:
    """Zero-pad a (batch, ..., length[, dim]) cache or mask tensor on the left of its length axis to `width`."""
    axis = -2 if t.dim() == 4 else -1
    missing = width - t.shape[axis]
    if missing == 0:
        return t
    shape = list(t.shape)
    shape[axis] = missing
    return torch.cat([torch.zeros(shape, dtype=t.dtype, device=t.device), t], dim=axis)
