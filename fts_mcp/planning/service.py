"""Planning from the caller's side: advice and estimates, plus reading a model's config.json (never its weights).
Pure: no torch, no jobs."""

from __future__ import annotations

import functools
import os
import shutil
import subprocess
import time
from dataclasses import dataclass

import psutil

from fts_mcp.config import Settings
from fts_mcp.errors import InvalidArgument, ModelUnavailable
from fts_mcp.models.architecture import TIED_SHARE, Architecture, from_config, likely_tied, read_config
from fts_mcp.models.gguf import is_gguf
from fts_mcp.models.refs import hub_offline, resolve_model_argument
from fts_mcp.planning.advice import Advice, Criteria, recommend
from fts_mcp.planning.estimate import METHODS, MethodChoice, ResourceEstimate, RunSettings, estimate, shape_for_params
from fts_mcp.planning.families import known_family
from fts_mcp.planning.gpus import GPUS, Gpu, find_gpu, nearest_gpu

DEFAULT_TOKENS_PER_EXAMPLE = 512
# A CPU reaches a smaller share of its matmul peak in training than a GPU of its tensor peak: measured on 2 cores,
# LoRA on SmolLM2-135M ran at 124 tokens/s, 0.24 of the 0.28 TFLOP/s a float32 matmul reached (docs/benchmarks.md).
CPU_UTILIZATION = {"full": 0.25, "lora": 0.24, "qlora": 0.08}


@dataclass(frozen=True)
class Host:
    """What this machine trains on, as the estimator models it: a GPU from the catalogue, or the CPU as a device
    with the RAM available now and a matmul rate."""

    device: Gpu
    memory_gb: float
    cpu: bool
    description: str


def _host_gpu(settings: Settings) -> Host | None:
    """This host's first GPU slot's card, from nvidia-smi; None without one."""
    gpu_slots = [s for s in settings.slots if s.startswith("cuda:")]
    if not gpu_slots or shutil.which("nvidia-smi") is None:
        return None
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True, timeout=5, check=True).stdout
        name, mib = out.strip().splitlines()[0].rsplit(",", 1)
        memory_gb = float(mib) * 2**20 / 1e9
    except (OSError, subprocess.SubprocessError, ValueError, IndexError):
        return None
    words = name.upper().replace("NVIDIA", "").replace("GEFORCE", "").split()
    known = [g for g in GPUS.values() if g.name.split("-")[0].replace("RTX", "") in words
             or g.name.upper().replace("-", " ") in " ".join(words)]
    card = min(known, key=lambda g: abs(g.memory_gb - memory_gb)) if known else nearest_gpu(memory_gb)
    how = "" if known else f", timed as the known card nearest its memory, {card.name}"
    return Host(card, memory_gb, False, f"this host's GPU: {name.strip()} ({memory_gb:.0f} GB{how}; "
                                        f"{len(gpu_slots)} GPU slot{'s' * (len(gpu_slots) > 1)})")


@functools.lru_cache(maxsize=1)
def _matmul_tflops() -> float:
    """float32 matmul rate of this CPU, measured for about 0.3 s (what CPU training runs on)."""
    import numpy  # lazy: only a CPU-host estimate needs it, and the server must start fast

    a = numpy.random.default_rng(0).random((1024, 1024), dtype=numpy.float32)
    a @ a
    start, runs = time.perf_counter(), 0
    while time.perf_counter() - start < 0.3:
        a @ a
        runs += 1
    return runs * 2 * 1024**3 / (time.perf_counter() - start) / 1e12


def _host_cpu(settings: Settings) -> Host:
    stated = settings.env.get("FTS_CPU_TFLOPS")
    try:
        tflops, how = (float(stated), "FTS_CPU_TFLOPS") if stated else (_matmul_tflops(), "measured: float32 matmul")
    except ValueError:
        raise InvalidArgument(f"FTS_CPU_TFLOPS must be a number of TFLOP/s, got {stated!r}", param="gpu") from None
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    memory_gb = psutil.virtual_memory().available / 1e9
    device = Gpu(f"CPU ({cores} cores)", memory_gb, round(tflops, 3), 0.0)
    return Host(device, memory_gb, True, f"this host's CPU: {cores} cores, {memory_gb:.1f} GB of RAM available now, "
                                         f"{tflops:.2f} TFLOP/s ({how}); no GPU found")


def host(settings: Settings) -> Host:
    """The device jobs on this host train on: its first GPU, else its CPU."""
    return _host_gpu(settings) or _host_cpu(settings)


class Planning:
    """Planning answers: pure arithmetic and advice, plus reading a model's config.json (never its weights)."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings

    def recommend_ft_vs_rag(self, criteria: Criteria) -> Advice:
        return recommend(criteria)

    def estimate_resources(self, *, base_model: str | None = None, params: int | None = None,
                           shape: dict[str, int | None] | None = None, tied_embeddings: bool | None = None,
                           method: MethodChoice = "all",
                           settings: RunSettings, dataset_examples: int | None = None,
                           tokens_per_example: int | None = None, dataset_tokens: int | None = None,
                           epochs: float = 3.0, gpu: str | None = None, gpu_memory_gb: float | None = None,
                           price_per_gpu_hour: float | None = None, utilization: float | None = None
                           ) -> ResourceEstimate:
        shape = {k: v for k, v in (shape or {}).items() if v is not None}
        given = [name for name, present in (("base_model", base_model), ("params", params), ("layers...", shape))
                 if present]
        if len(given) != 1:
            raise InvalidArgument("give exactly one of base_model (folder or hub id), params (a parameter count) or "
                                  "the architecture numbers (layers, hidden, intermediate, heads, kv_heads, vocab); "
                                  f"got {', '.join(given) or 'none'}", param="base_model")
        if base_model is not None:
            try:
                local = resolve_model_argument(base_model, self.settings) if is_gguf(base_model) else base_model
                config, source = read_config(local, self.settings.roots, hub_offline(self.settings.env))
                arch = from_config(config, source=source)
            except ModelUnavailable:
                if (known := known_family(base_model)) is None:
                    raise
                entry, arch = known  # not downloaded and offline: the family's published shape
                source = f"built-in table: {entry} (the published config of that family; not read from the model)"
            model = base_model
        elif params is not None:
            arch, name = shape_for_params(params)
            model, source = f"{params / 1e9:.1f}B parameters", f"assumed: {name} shape (nearest parameter count)"
        else:
            needed = ("layers", "hidden", "intermediate", "heads", "vocab")
            missing = [k for k in needed if k not in shape]
            if missing:
                raise InvalidArgument(f"explicit architecture needs {', '.join(needed)} (kv_heads defaults to heads); "
                                      f"missing {', '.join(missing)}", param=missing[0])
            shape.setdefault("kv_heads", shape["heads"])
            arch, model, source = Architecture(**shape), "explicit architecture", "explicit"
            if tied_embeddings is None:  # numbers alone do not say; small models with big vocabularies tie
                guess = likely_tied(arch)
                arch = arch.model_copy(update={"tied_embeddings": guess})
                source += (f"; embeddings assumed {'tied' if guess else 'untied'} (vocab x hidden is "
                           f"{'at least' if guess else 'under'} {TIED_SHARE:.0%} of the parameters; pass "
                           "tied_embeddings to say)")
        if tied_embeddings is not None and tied_embeddings != arch.tied_embeddings:
            arch = arch.model_copy(update={"tied_embeddings": tied_embeddings})
            if source != "explicit":
                source += f"; tied_embeddings={str(tied_embeddings).lower()} as given"
        if gpu is not None and gpu_memory_gb is not None:
            raise InvalidArgument("give gpu (a known card) or gpu_memory_gb (any card), not both", param="gpu")
        card = find_gpu(gpu) if gpu is not None else None
        here = host(self.settings) if gpu is None and gpu_memory_gb is None else None
        if here is not None:  # nothing said about the device: plan for this machine, and say so
            card, gpu_memory_gb = here.device, here.memory_gb
        if dataset_tokens is not None and dataset_examples is not None:
            raise InvalidArgument("give dataset_examples (with tokens_per_example) or dataset_tokens, not both",
                                  param="dataset_tokens")
        tokens, mean = dataset_tokens, None
        if dataset_examples is not None:  # longer examples are truncated to seq_len
            mean = min(settings.seq_len, tokens_per_example or DEFAULT_TOKENS_PER_EXAMPLE)
            tokens = dataset_examples * mean
        training_tokens = int(tokens * epochs) if tokens is not None else None
        methods = METHODS if method == "all" else (method,)
        assumed = None
        if card is None and gpu_memory_gb is not None:  # a card known only by its memory: time it like its peer
            assumed = card = nearest_gpu(gpu_memory_gb)
        result = estimate(arch, model=model, shape_source=source, methods=methods, settings=settings, gpu=card,
                          gpu_memory_gb=gpu_memory_gb, price_per_gpu_hour=price_per_gpu_hour,
                          training_tokens=training_tokens, utilization=utilization, tokens_per_example=mean,
                          cpu_utilization=CPU_UTILIZATION if here is not None and here.cpu else None)
        if training_tokens is None and (card is not None):
            result.notes.insert(0, "time and cost need the amount of training: give dataset_examples (with "
                                   "tokens_per_example) or dataset_tokens")
        if assumed is not None:
            result.gpu = None
        if assumed is not None and training_tokens is not None:
            what = "speed" if price_per_gpu_hour is not None else "speed and price"
            result.notes.insert(0, f"time and cost assume the {what} of an {assumed.name} ({assumed.memory_gb:g} GB, "
                                   f"{assumed.tflops_bf16:g} {'bf16' if assumed.bf16 else 'fp16'} TFLOP/s), the known "
                                   f"card nearest {gpu_memory_gb:g} GB; pass gpu for your card's own figures")
        if here is not None:
            result.notes.insert(0, f"no gpu or gpu_memory_gb given: estimated for {here.description}; pass gpu or "
                                   "gpu_memory_gb to plan for another machine")
        return result
