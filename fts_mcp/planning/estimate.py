"""`estimate_resources`: memory of full vs LoRA vs QLoRA side by side, whether it fits, a configuration that
does, and time and cost. Pure: architecture numbers in, figures with their assumptions out."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field

from fts_mcp.errors import InvalidArgument
from fts_mcp.planning.architecture import Architecture
from fts_mcp.planning.gpus import Gpu
from fts_mcp.planning.memory import Method, MethodEstimate, Optimizer, gpus_needed, memory, throughput

METHODS: tuple[Method, ...] = ("full", "lora", "qlora")

# Llama-family shapes, for an estimate from a parameter count alone (activations and logits depend on shape).
REFERENCE_SHAPES = {
    "Llama-3.2-1B": Architecture(layers=16, hidden=2048, intermediate=8192, heads=32, kv_heads=8, vocab=128_256,
                                 tied_embeddings=True),
    "Llama-3.2-3B": Architecture(layers=28, hidden=3072, intermediate=8192, heads=24, kv_heads=8, vocab=128_256,
                                 tied_embeddings=True),
    "Llama-3.1-8B": Architecture(layers=32, hidden=4096, intermediate=14_336, heads=32, kv_heads=8, vocab=128_256),
    "Llama-2-13B": Architecture(layers=40, hidden=5120, intermediate=13_824, heads=40, kv_heads=40, vocab=32_000),
    "CodeLlama-34B": Architecture(layers=48, hidden=8192, intermediate=22_016, heads=64, kv_heads=8, vocab=32_000),
    "Llama-3.1-70B": Architecture(layers=80, hidden=8192, intermediate=28_672, heads=64, kv_heads=8, vocab=128_256),
    "Llama-3.1-405B": Architecture(layers=126, hidden=16_384, intermediate=53_248, heads=128, kv_heads=8,
                                   vocab=128_256),
}


class Settings(BaseModel):
    seq_len: int
    micro_batch: int
    lora_r: int
    target_modules: str | list[str]
    gradient_checkpointing: bool
    optimizer: Optimizer


class Suggestion(BaseModel):
    method: Method
    fits: bool
    micro_batch: int | None = None
    gradient_accumulation_steps: int | None = Field(None, description="keeps the requested effective batch")
    gradient_checkpointing: bool | None = None
    lora_r: int | None = None
    optimizer: Optimizer | None = None
    total_gb: float | None = None
    reason: str


class ResourceEstimate(BaseModel):
    model: str
    parameters: int
    architecture: Architecture
    shape_source: str = Field(description="config.json path, 'explicit', or the reference shape assumed")
    gpu: str | None
    gpu_memory_gb: float | None
    settings: Settings
    estimates: list[MethodEstimate]
    suggestions: list[Suggestion] = Field(default_factory=list,
                                          description="per method, a configuration that fits the GPU")
    recommended_method: Method | None = Field(None, description="the method that fits with the least compromise")
    notes: list[str] = Field(default_factory=list)


def shape_for_params(params: int) -> tuple[Architecture, str]:
    name = min(REFERENCE_SHAPES, key=lambda k: abs(REFERENCE_SHAPES[k].params - params))
    return REFERENCE_SHAPES[name], name


def suggest(arch: Architecture, method: Method, gpu_memory_gb: float, s: Settings) -> Suggestion:
    """The first configuration that fits, trading in order: checkpointing on, smaller micro-batch (more
    accumulation), 8-bit paged AdamW, a smaller rank."""
    batches = [b for b in (s.micro_batch, 8, 4, 2, 1) if b <= s.micro_batch]
    optimizers: list[Optimizer] = [s.optimizer] if "8bit" in s.optimizer else [s.optimizer, "paged_adamw_8bit"]
    ranks = [s.lora_r] if method == "full" else sorted({s.lora_r, min(s.lora_r, 8)}, reverse=True)
    for optimizer in optimizers:
        for r in ranks:
            for batch in sorted(set(batches), reverse=True):
                m, _ = memory(arch, method, seq_len=s.seq_len, micro_batch=batch, lora_r=r,
                              target_modules=s.target_modules, gradient_checkpointing=True, optimizer=optimizer)
                if m.total_gb <= gpu_memory_gb:
                    changes = []
                    if batch != s.micro_batch:
                        changes.append(f"micro-batch {batch} x {max(1, s.micro_batch // batch)} accumulation")
                    if not s.gradient_checkpointing:
                        changes.append("gradient checkpointing on")
                    if optimizer != s.optimizer:
                        changes.append("8-bit paged AdamW")
                    if method != "full" and r != s.lora_r:
                        changes.append(f"rank {r}")
                    return Suggestion(method=method, fits=True, micro_batch=batch,
                                      gradient_accumulation_steps=max(1, s.micro_batch // batch),
                                      gradient_checkpointing=True, lora_r=None if method == "full" else r,
                                      optimizer=optimizer, total_gb=round(m.total_gb, 2),
                                      reason="fits as asked" if not changes else "fits with " + ", ".join(changes))
    return Suggestion(method=method, fits=False, reason=f"does not fit in {gpu_memory_gb:g} GB even at micro-batch 1 "
                      f"with checkpointing and 8-bit AdamW at sequence {s.seq_len}; use more GPUs (see gpus_needed), "
                      "a shorter sequence" + ("" if method == "qlora" else ", or QLoRA"))


def estimate(arch: Architecture, *, model: str, shape_source: str, methods: tuple[Method, ...], settings: Settings,
             gpu: Gpu | None, gpu_memory_gb: float | None, price_per_gpu_hour: float | None,
             training_tokens: int | None, utilization: float | None) -> ResourceEstimate:
    if settings.seq_len * settings.micro_batch > 64 * 1024 * 1024:
        raise InvalidArgument("seq_len x micro_batch is over 64M tokens per step; use realistic values",
                              param="micro_batch")
    memory_gb = gpu_memory_gb if gpu_memory_gb is not None else (gpu.memory_gb if gpu else None)
    estimates, suggestions = [], []
    for method in methods:
        m, trainable = memory(arch, method, seq_len=settings.seq_len, micro_batch=settings.micro_batch,
                              lora_r=settings.lora_r, target_modules=settings.target_modules,
                              gradient_checkpointing=settings.gradient_checkpointing, optimizer=settings.optimizer)
        result = MethodEstimate(method=method, trainable_params=trainable, memory=m)
        if memory_gb is not None:
            result.fits = m.total_gb <= memory_gb
            result.gpus_needed = gpus_needed(m, memory_gb)
            suggestions.append(suggest(arch, method, memory_gb, settings))
        if gpu is not None:
            price = price_per_gpu_hour if price_per_gpu_hour is not None else gpu.usd_per_hour
            result.throughput = throughput(arch, method, gpu, result.gpus_needed or 1,
                                           settings.gradient_checkpointing, training_tokens, price, utilization)
            if not gpu.bf16:
                result.notes.append(f"{gpu.name} has no bf16: training runs in fp16 with loss scaling")
        if method == "qlora":
            saved = m.quantization_constants_without_double_quant_gb - m.quantization_constants_gb
            result.notes.append(f"double quantization saves {saved:.2f} GB of quantization constants here")
        if "paged" in settings.optimizer:
            result.notes.append("paged optimizer states can spill to host memory during spikes")
        estimates.append(result)
    return ResourceEstimate(
        model=model, parameters=arch.params, architecture=arch, shape_source=shape_source,
        gpu=gpu.name if gpu else None, gpu_memory_gb=memory_gb, settings=settings, estimates=estimates,
        suggestions=suggestions, recommended_method=_recommended(suggestions), notes=_notes(arch, estimates))


def _recommended(suggestions: list[Suggestion]) -> Method | None:
    """Full fine-tuning only if it fits as asked; else LoRA if it fits; else QLoRA if it fits."""
    fitting = {s.method: s for s in suggestions if s.fits}
    if "full" in fitting and fitting["full"].reason == "fits as asked":
        return "full"
    return next((m for m in ("lora", "qlora", "full") if m in fitting), None)


def _notes(arch: Architecture, estimates: list[MethodEstimate]) -> list[str]:
    notes = ["peak_allocated_gb is comparable with torch.cuda.max_memory_allocated; total_gb adds the CUDA "
             "context and allocator slack, which is what must fit",
             "LoRA adapters, their gradients and AdamW states are fp32 (PEFT's default): 16 bytes per trainable "
             "parameter"]
    by = {e.method: e for e in estimates}
    if "full" in by:
        weights_only = 4 * arch.params / 1e9
        notes.append(f"full fine-tuning with AdamW needs about 16 bytes per parameter before activations "
                     f"({by['full'].memory.total_gb:,.0f} GB in all here), not the {weights_only:,.0f} GB the "
                     "fp32 weights alone take, the figure often quoted")
    if "qlora" in by and "lora" in by:
        notes.append("the often-quoted LoRA and QLoRA figures count weights only "
                     f"({by['lora'].memory.weights_gb:,.0f} GB and {by['qlora'].memory.weights_gb:,.0f} GB here); "
                     "activations and logits come on top and grow with micro-batch x sequence")
    return notes


MethodChoice = Literal["full", "lora", "qlora", "all"]
