"""Memory, time and cost of a fine-tune, by method. Pure arithmetic on the model's shape.

The breakdown follows what PyTorch allocates for a Hugging Face causal LM trained with transformers + PEFT +
bitsandbytes (bf16 compute, SDPA attention, LoRA adapters kept in fp32 as PEFT does by default):

* weights: 16-bit (LoRA), NF4 at 0.5 byte/param for the block linears plus 16-bit embeddings and head (QLoRA),
  or fp32 master weights (full fine-tuning in mixed precision);
* quantization constants: one fp32 absmax per 64 weights (0.5 bit/param), or with double quantization an
  8-bit absmax plus one fp32 per 256 blocks (8/64 + 32/(64*256) = 0.127 bit/param);
* gradients and optimizer states for what trains (AdamW 32-bit: 8 bytes/param; 8-bit: 2 bytes/param);
* activations: with gradient checkpointing each layer keeps its input (2*hidden bytes per token) and one layer
  is recomputed at a time; without it every layer keeps everything (about 2*(8h + 2kv + 5i) + 8h bytes/token);
* logits: batch x sequence x vocab at 12 bytes (bf16 logits, fp32 copy for the loss, fp32 and bf16 gradients),
  often the largest single term for small models with big vocabularies;
* framework overhead (not in torch's allocated figure): CUDA context and allocator slack.
"""

from __future__ import annotations

import math
from typing import Literal

from pydantic import BaseModel, Field

from fts_mcp.errors import InvalidArgument
from fts_mcp.planning.architecture import Architecture
from fts_mcp.planning.gpus import Gpu

Method = Literal["full", "lora", "qlora"]
Optimizer = Literal["adamw_32bit", "adamw_8bit", "paged_adamw_8bit", "paged_adamw_32bit"]

GB = 1e9
BITS_CONSTANTS = 32 / 64  # fp32 absmax per 64-weight block
BITS_CONSTANTS_DOUBLE = 8 / 64 + 32 / (64 * 256)  # 8-bit absmax, fp32 per 256 blocks
LOGIT_BYTES = 12
CUDA_CONTEXT_GB = 1.0
ALLOCATOR_SLACK = 0.05
# Share of the GPU's dense bf16 peak a run achieves. QLoRA's is calibrated on Llama-3.1-8B on an H200
# (2,897 tokens/s measured with gradient checkpointing); the others are typical of well-tuned runs.
UTILIZATION = {"full": 0.40, "lora": 0.35, "qlora": 0.13}


class Memory(BaseModel):
    """GB (10^9 bytes) per component, for one GPU holding the whole run."""

    weights_gb: float
    quantization_constants_gb: float = Field(description="with double quantization when the method is qlora")
    quantization_constants_without_double_quant_gb: float
    adapters_gb: float = Field(description="trainable LoRA weights (fp32)")
    gradients_gb: float
    optimizer_gb: float
    activations_gb: float
    activations_without_checkpointing_gb: float
    logits_gb: float
    peak_allocated_gb: float = Field(description="comparable with torch.cuda.max_memory_allocated")
    framework_overhead_gb: float
    total_gb: float = Field(description="what the GPU must hold: peak allocated + framework overhead")


class Throughput(BaseModel):
    flops_per_token: float
    utilization: float = Field(description="assumed share of the GPU's dense bf16 peak")
    tokens_per_second: float
    training_tokens: int | None = None
    hours: float | None = None
    cost_usd: float | None = None


class MethodEstimate(BaseModel):
    method: Method
    trainable_params: int
    memory: Memory
    fits: bool | None = Field(None, description="fits on one GPU of the given kind (null without a GPU)")
    gpus_needed: int | None = Field(None, description="GPUs with weights and optimizer sharded (FSDP/ZeRO-3); "
                                                      "null when even sharding cannot fit this micro-batch")
    throughput: Throughput | None = None
    notes: list[str] = Field(default_factory=list)


def lora_params(arch: Architecture, r: int, targets: str | list[str]) -> int:
    shapes = arch.linear_shapes()
    if targets != "all-linear":
        known = sorted({name for name, _, _ in shapes})
        unknown = sorted(set(targets) - set(known))
        if unknown:
            raise InvalidArgument(f"unknown target modules {unknown}; this architecture has {known} "
                                  "(or use 'all-linear')", param="target_modules")
        shapes = [s for s in shapes if s[0] in targets]
    return arch.layers * sum(r * (i + o) for _, i, o in shapes)


def activation_bytes_per_token(arch: Architecture, checkpointing: bool) -> float:
    kv = arch.kv_heads * arch.dim_head
    inner = arch.intermediate * min(arch.experts, 2)
    mlp_terms = 5 if arch.gated_mlp else 3
    one_layer = 2 * (8 * arch.hidden + 2 * kv + mlp_terms * inner) + 8 * arch.hidden
    if checkpointing:
        return arch.layers * 2 * arch.hidden + one_layer
    return arch.layers * one_layer


def optimizer_bytes(optimizer: Optimizer) -> int:
    return 2 if "8bit" in optimizer else 8


def memory(arch: Architecture, method: Method, *, seq_len: int, micro_batch: int, lora_r: int,
           target_modules: str | list[str], gradient_checkpointing: bool, optimizer: Optimizer,
           double_quant: bool = True) -> tuple[Memory, int]:
    n = arch.params
    quantizable = arch.layers * arch.block_linear_params
    tokens = seq_len * micro_batch
    constants = quantizable * BITS_CONSTANTS_DOUBLE / 8
    constants_plain = quantizable * BITS_CONSTANTS / 8
    if method == "full":
        trainable = n
        weights, adapters, grads = 4 * n, 0, 4 * n
        constants = constants_plain = 0
    else:
        trainable = lora_params(arch, lora_r, target_modules)
        adapters, grads = 4 * trainable, 4 * trainable
        if method == "lora":
            weights, constants, constants_plain = 2 * n, 0, 0
        else:
            weights = quantizable / 2 + 2 * (n - quantizable)
            constants = constants if double_quant else constants_plain
    opt = optimizer_bytes(optimizer) * trainable
    act = tokens * activation_bytes_per_token(arch, gradient_checkpointing)
    act_plain = tokens * activation_bytes_per_token(arch, False)
    logits = tokens * arch.vocab * LOGIT_BYTES
    peak = weights + constants + adapters + grads + opt + act + logits
    overhead = CUDA_CONTEXT_GB * GB + ALLOCATOR_SLACK * peak
    gb = lambda value: round(value / GB, 6)  # noqa: E731 - kB resolution: tiny models stay visible
    return Memory(
        weights_gb=gb(weights), quantization_constants_gb=gb(constants),
        quantization_constants_without_double_quant_gb=gb(constants_plain), adapters_gb=gb(adapters),
        gradients_gb=gb(grads), optimizer_gb=gb(opt), activations_gb=gb(act),
        activations_without_checkpointing_gb=gb(act_plain), logits_gb=gb(logits), peak_allocated_gb=gb(peak),
        framework_overhead_gb=gb(overhead), total_gb=gb(peak + overhead),
    ), trainable


def gpus_needed(m: Memory, gpu_memory_gb: float) -> int | None:
    """GPUs when weights, gradients and optimizer states are sharded (FSDP / ZeRO-3); each GPU still holds its
    own activations and logits, the CUDA context and the allocator slack."""
    if m.total_gb <= gpu_memory_gb:
        return 1
    shardable = m.weights_gb + m.quantization_constants_gb + m.adapters_gb + m.gradients_gb + m.optimizer_gb
    per_gpu = m.activations_gb + m.logits_gb
    room = (gpu_memory_gb - CUDA_CONTEXT_GB) / (1 + ALLOCATOR_SLACK) - per_gpu
    if room <= 0:
        return None
    return max(2, math.ceil(shardable / room))


def throughput(arch: Architecture, method: Method, gpu: Gpu, gpus: int, gradient_checkpointing: bool,
               training_tokens: int | None, price: float, utilization: float | None) -> Throughput:
    per_token = (6 if method == "full" else 4) + (2 if gradient_checkpointing else 0)
    flops = per_token * arch.matmul_params
    util = utilization if utilization is not None else UTILIZATION[method]
    tps = util * gpu.tflops_bf16 * 1e12 * gpus / flops
    hours = training_tokens / tps / 3600 if training_tokens else None
    return Throughput(flops_per_token=flops, utilization=util, tokens_per_second=round(tps, 1),
                      training_tokens=training_tokens, hours=hours,
                      cost_usd=round(hours * gpus * price, 2) if hours is not None else None)
