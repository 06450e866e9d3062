"""`estimate_resources`: memory of full vs LoRA vs QLoRA side by side, whether it fits, a configuration that
does, and time and cost. Pure: architecture numbers in, figures with their assumptions out."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, Field

from fts_mcp.errors import InvalidArgument
from fts_mcp.models.architecture import Architecture
from fts_mcp.planning.batch import BatchPlan, plan_batch
from fts_mcp.planning.gpus import Gpu
from fts_mcp.planning.memory import (
    CE_CHUNK_TOKENS,
    EFFICIENCY_PER_DOUBLING,
    LOGIT_BYTES,
    SEQUENCES,
    AdapterDtype,
    CrossEntropy,
    Method,
    MethodEstimate,
    Objective,
    Optimizer,
    Precision,
    gpus_needed,
    memory,
    padded_tokens,
    scaling_efficiency,
    throughput,
)

METHODS: tuple[Method, ...] = ("full", "lora", "qlora")
PAGED: dict[str, Optimizer] = {"adamw_32bit": "paged_adamw_32bit", "adamw_8bit": "paged_adamw_8bit"}

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


class RunSettings(BaseModel):
    """What the run does. Defaults are what fts-mcp's training recipe does unless told otherwise."""

    seq_len: int
    micro_batch: int
    lora_r: int = 16
    target_modules: str | list[str] = "all-linear"
    gradient_checkpointing: bool | Literal["auto"] = Field(
        "auto", description="'auto': off when the run fits the GPU without it, else on (the recipe's rule)")
    optimizer: Optimizer = "adamw_32bit"
    cross_entropy: CrossEntropy = "chunked"
    padding_free: bool = Field(True, description="micro-batches hold only real tokens: time counts no padding")
    adapter_dtype: AdapterDtype | None = Field(None, description="null: the recipe's (bf16 for QLoRA, fp32 for LoRA)")
    precision: Precision = Field("mixed", description="full fine-tuning: fp32 master weights (mixed) or pure bf16")
    workers: int = Field(1, ge=1, le=64, description="data-parallel GPUs (DDP, training.workers): each holds the "
                                                     "whole run, so memory per GPU is unchanged")
    objective: Objective = Field("sft", description="start_qlora_job's method: dpo puts two sequences per example "
                                                    "through the model and adds a reference forward pass")

    def memory_kwargs(self) -> dict[str, Any]:
        return {"lora_r": self.lora_r, "target_modules": self.target_modules, "optimizer": self.optimizer,
                "cross_entropy": self.cross_entropy, "adapter_dtype": self.adapter_dtype,
                "precision": self.precision, "objective": self.objective}


class Suggestion(BaseModel):
    method: Method
    fits: bool
    micro_batch: int | None = None
    gradient_accumulation_steps: int | None = Field(None, description="keeps the requested effective batch")
    gradient_checkpointing: bool | None = None
    lora_r: int | None = None
    optimizer: Optimizer | None = None
    total_gb: float | None = None
    changes: list[str] = Field(default_factory=list, description="what differs from the request; empty: as asked")
    reason: str


class ResourceEstimate(BaseModel):
    model: str
    parameters: int
    architecture: Architecture
    shape_source: str = Field(description="config.json path, 'explicit', or the reference shape assumed")
    gpu: str | None
    gpu_memory_gb: float | None
    settings: RunSettings
    estimates: list[MethodEstimate]
    suggestions: list[Suggestion] = Field(default_factory=list,
                                          description="per method, a configuration that fits the GPU")
    recommended_method: Method | None = Field(None, description="the method that fits with the least compromise")
    notes: list[str] = Field(default_factory=list, description="the assumptions used, then remarks")


def shape_for_params(params: int) -> tuple[Architecture, str]:
    name = min(REFERENCE_SHAPES, key=lambda k: abs(REFERENCE_SHAPES[k].params - params))
    return REFERENCE_SHAPES[name], name


def checkpointing(arch: Architecture, method: Method, s: RunSettings, gpu_memory_gb: float | None) -> tuple[bool, str]:
    """The checkpointing an estimate assumes, and why: as asked, or the recipe's "auto" rule (plan_batch)."""
    if s.gradient_checkpointing != "auto":
        return s.gradient_checkpointing, f"checkpointing {'on' if s.gradient_checkpointing else 'off'} as asked"
    if gpu_memory_gb is None:
        return True, ("checkpointing auto, no GPU given: estimated on; the recipe turns it off when the run fits "
                      "without it (activations_without_checkpointing_gb)")
    plan = plan_batch(arch, method, budget_gb=gpu_memory_gb, seq_len=s.seq_len, micro_batch=s.micro_batch,
                      gradient_accumulation_steps=1, gradient_checkpointing="auto", **s.memory_kwargs())
    return plan.gradient_checkpointing, plan.reason


def suggest(arch: Architecture, method: Method, gpu_memory_gb: float, s: RunSettings) -> Suggestion:
    """The first configuration that fits, trading in order: checkpointing (by the recipe's rule, plan_batch), a
    smaller micro-batch (more accumulation), the paged version of the optimizer, a smaller rank."""
    optimizers: list[Optimizer] = [s.optimizer] + ([] if s.optimizer.startswith("paged") else [PAGED[s.optimizer]])
    ranks = [s.lora_r] if method == "full" else sorted({s.lora_r, min(s.lora_r, 8)}, reverse=True)
    asked = s.gradient_checkpointing
    for optimizer in optimizers:
        for r in ranks:
            kwargs = {**s.memory_kwargs(), "optimizer": optimizer, "lora_r": r}
            for batch in (s.micro_batch, None):  # the asked micro-batch first, then the largest that fits below it
                plan = plan_batch(arch, method, budget_gb=gpu_memory_gb, seq_len=s.seq_len, micro_batch=batch,
                                  gradient_accumulation_steps=None, gradient_checkpointing=asked or "auto",
                                  effective_batch=s.micro_batch, max_micro_batch=s.micro_batch, **kwargs)
                if plan.fits:
                    break
            if not plan.fits:
                continue
            changes = []
            if plan.micro_batch != s.micro_batch:
                changes.append(f"micro-batch {plan.micro_batch} x {plan.gradient_accumulation_steps} accumulation")
            if asked is False and plan.gradient_checkpointing:
                changes.append("gradient checkpointing on")
            if optimizer != s.optimizer:
                changes.append(f"optimizer {optimizer} (states leave the GPU under pressure)")
            if method != "full" and r != s.lora_r:
                changes.append(f"rank {r}")
            return Suggestion(method=method, fits=True, micro_batch=plan.micro_batch,
                              gradient_accumulation_steps=plan.gradient_accumulation_steps,
                              gradient_checkpointing=plan.gradient_checkpointing,
                              lora_r=None if method == "full" else r, optimizer=optimizer,
                              total_gb=round(plan.total_gb, 2), changes=changes,
                              reason=("fits as asked" if not changes else "fits with " + ", ".join(changes))
                              + f": {plan.total_gb:.1f} of {gpu_memory_gb:g} GB" + _auto_reason(asked, plan))
    return Suggestion(method=method, fits=False, reason=f"does not fit in {gpu_memory_gb:g} GB even at micro-batch 1 "
                      f"with checkpointing and a paged optimizer at sequence {s.seq_len}; use more GPUs (see "
                      "gpus_needed), a shorter sequence" + ("" if method == "qlora" else ", or QLoRA"))


def _auto_reason(asked: bool | Literal["auto"], plan: BatchPlan) -> str:
    if asked != "auto":
        return ""
    return ", checkpointing off (fits without it)" if not plan.gradient_checkpointing else \
        ", checkpointing on (does not fit without it)"


def estimate(arch: Architecture, *, model: str, shape_source: str, methods: tuple[Method, ...], settings: RunSettings,
             gpu: Gpu | None, gpu_memory_gb: float | None, price_per_gpu_hour: float | None,
             training_tokens: int | None, utilization: float | None,
             tokens_per_example: float | None = None,
             cpu_utilization: dict[str, float] | None = None) -> ResourceEstimate:
    """`training_tokens` are real tokens; with padded batches the time adds the padding (padded_tokens), using
    the mean `tokens_per_example` when known. `cpu_utilization`: the device is a CPU, which reaches these shares
    of its matmul rate per method (unless `utilization` is given)."""
    if settings.seq_len * settings.micro_batch > 64 * 1024 * 1024:
        raise InvalidArgument("seq_len x micro_batch is over 64M tokens per step; use realistic values",
                              param="micro_batch")
    memory_gb = gpu_memory_gb if gpu_memory_gb is not None else (gpu.memory_gb if gpu else None)
    computed = training_tokens
    if settings.objective == "dpo":  # TRL's DPOTrainer pads; each example is two sequences
        settings = settings.model_copy(update={"padding_free": False})
    if training_tokens is not None and not settings.padding_free:
        computed = padded_tokens(training_tokens, micro_batch=settings.micro_batch, seq_len=settings.seq_len,
                                 tokens_per_example=tokens_per_example) * SEQUENCES[settings.objective]
    estimates, suggestions = [], []
    for method in methods:
        on, why = checkpointing(arch, method, settings, memory_gb)
        m, trainable = memory(arch, method, seq_len=settings.seq_len, micro_batch=settings.micro_batch,
                              gradient_checkpointing=on, **settings.memory_kwargs())
        result = MethodEstimate(method=method, trainable_params=trainable, gradient_checkpointing=on, memory=m,
                                notes=[why])
        if memory_gb is not None:
            result.fits = m.total_gb <= memory_gb
            result.gpus_needed = gpus_needed(m, memory_gb)
            suggestions.append(suggest(arch, method, memory_gb, settings))
            room = memory_gb - m.total_gb
            if result.fits and m.optimizer_paged_gb > room:
                result.notes.append(f"{m.optimizer_paged_gb:.1f} GB of paged optimizer states, {room:.1f} GB left on "
                                    "the GPU: the rest moves to host memory and back each optimizer step (slower, "
                                    "not out of memory)")
        if gpu is not None:
            price = price_per_gpu_hour if price_per_gpu_hour is not None else gpu.usd_per_hour
            util = utilization if utilization is not None or cpu_utilization is None else cpu_utilization[method]
            result.throughput = throughput(arch, method, gpu, result.gpus_needed or 1, on, training_tokens, price,
                                           util, computed_tokens=computed, workers=settings.workers,
                                           objective=settings.objective)
            if not gpu.bf16:
                result.notes.append(f"{gpu.name} has no bf16: training runs in fp16 with loss scaling")
        if method == "qlora":
            saved = m.quantization_constants_without_double_quant_gb - m.quantization_constants_gb
            result.notes.append(f"double quantization saves {saved:.2f} GB of quantization constants here")
        estimates.append(result)
    return ResourceEstimate(
        model=model, parameters=arch.params, architecture=arch, shape_source=shape_source,
        gpu=gpu.name if gpu else None, gpu_memory_gb=memory_gb, settings=settings, estimates=estimates,
        suggestions=suggestions,
        recommended_method=_recommended(suggestions, adapters_first=cpu_utilization is not None),
        notes=assumptions(settings, methods) + _notes(arch, estimates))


def _recommended(suggestions: list[Suggestion], *, adapters_first: bool = False) -> Method | None:
    """Full fine-tuning only if it fits as asked (never first on a CPU, `adapters_first`: it trains every weight
    at a fraction of a GPU's speed); else LoRA if it fits; else QLoRA if it fits."""
    fitting = {s.method: s for s in suggestions if s.fits}
    if "full" in fitting and not fitting["full"].changes and not adapters_first:
        return "full"
    return next((m for m in ("lora", "qlora", "full") if m in fitting), None)


def assumptions(s: RunSettings, methods: tuple[Method, ...]) -> list[str]:
    """The recipe this estimate models, one line per choice (each an input of estimate_resources)."""
    lines = [{
        "chunked": f"cross_entropy 'chunked' (the recipe's loss): logits_gb holds one chunk of {CE_CHUNK_TOKENS:,} "
                   "tokens x vocab, never the full logits",
        "liger": "cross_entropy 'liger' (fused linear + cross-entropy): logits_gb holds one bf16 chunk of about "
                 "tokens x hidden / vocab rows plus the hidden-state gradient",
        "full": "cross_entropy 'full' (plain Hugging Face loss): logits_gb is micro-batch x sequence x vocab at "
                f"{LOGIT_BYTES} bytes",
    }[s.cross_entropy]]
    if s.padding_free:
        lines.append("padding-free batches: memory counts the worst case (micro_batch x seq_len real tokens); time "
                     "counts only real tokens")
    else:
        lines.append("padded batches: time adds the padding, each micro-batch padded to its longest example "
                     "(lengths assumed spread evenly up to twice the mean, capped at seq_len)")
    if set(methods) & {"lora", "qlora"}:
        dtypes = ("LoRA adapters and their gradients in " + s.adapter_dtype if s.adapter_dtype else
                  "LoRA adapters and their gradients as the recipe trains them: bf16 on a 4-bit base (QLoRA, as TRL "
                  "and the QLoRA paper do), fp32 on a 16-bit base (LoRA, PEFT's default)")
        lines.append(dtypes + "; the frozen base computes in bf16 (QLoRA: stored as NF4 with double quantization)")
    if "full" in methods:
        lines.append("full fine-tuning in mixed precision: fp32 master weights and gradients, bf16 compute"
                     if s.precision == "mixed" else
                     "full fine-tuning in pure bf16: bf16 weights and gradients; torch AdamW's moments in bf16 "
                     "(bitsandbytes' 32-bit ones stay fp32)")
    lines.append({
        "adamw_32bit": "optimizer adamw_32bit (torch AdamW): two moments per trainable parameter in its dtype, "
                       "resident on the GPU",
        "adamw_8bit": "optimizer adamw_8bit: 2 bytes of states per trainable parameter, resident on the GPU",
        "paged_adamw_8bit": "optimizer paged_adamw_8bit: states in CUDA unified memory, evicted to host under "
                            "pressure; reported as optimizer_paged_gb, not counted in total_gb or fits",
        "paged_adamw_32bit": "optimizer paged_adamw_32bit: two fp32 moments in CUDA unified memory, evicted to host "
                             "under pressure; reported as optimizer_paged_gb, not counted in total_gb or fits",
    }[s.optimizer])
    if s.objective == "dpo":
        lines.append("preference tuning (dpo): a micro-batch of n pairs puts 2n padded sequences (prompt + chosen, "
                     "prompt + rejected; tokens_per_example counts one) through the model, plus a reference forward "
                     "pass without gradients (reference_forward_gb; 2 more FLOPs per parameter and token)")
    if s.workers > 1:
        lines.append(f"data parallel over {s.workers} GPUs: memory is per GPU and unchanged (each holds the model, "
                     f"the adapters' optimizer states and micro_batch examples; a step sees {s.workers} x micro_batch "
                     f"x accumulation); time divides by {s.workers} x a scaling efficiency of "
                     f"{scaling_efficiency(s.workers)} ({EFFICIENCY_PER_DOUBLING} per doubling, assumed: not "
                     "measured on GPUs; tools/bench_train.py --workers N measures your host); cost counts every GPU")
    if s.gradient_checkpointing == "auto":
        lines.append("gradient checkpointing 'auto': per method, off when it fits without, else on (each "
                     "estimate's gradient_checkpointing and first note)")
    return lines


def _notes(arch: Architecture, estimates: list[MethodEstimate]) -> list[str]:
    notes = ["peak_allocated_gb is comparable with torch.cuda.max_memory_allocated; total_gb adds the CUDA "
             "context and allocator slack, which is what must fit"]
    by = {e.method: e for e in estimates}
    if "full" in by:
        m = by["full"].memory
        states = m.weights_gb + m.gradients_gb + m.optimizer_gb + m.optimizer_paged_gb
        weights_only = 4 * arch.params / 1e9
        notes.append(f"full fine-tuning with AdamW holds {states / arch.params * 1e9:.0f} bytes per parameter of "
                     f"weights, gradients and optimizer states before activations ({m.total_gb:,.0f} GB in all "
                     f"here), not the {weights_only:,.0f} GB the fp32 weights alone take, the figure often quoted")
    if "qlora" in by and "lora" in by:
        notes.append("the often-quoted LoRA and QLoRA figures count weights only "
                     f"({by['lora'].memory.weights_gb:,.0f} GB and {by['qlora'].memory.weights_gb:,.0f} GB here); "
                     "activations and logits come on top and grow with micro-batch x sequence")
    return notes


MethodChoice = Literal["full", "lora", "qlora", "all"]
