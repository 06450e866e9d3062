"""Memory, time and cost of a fine-tune, by method. Pure arithmetic on the model's shape.

The breakdown follows what PyTorch allocates for a Hugging Face causal LM trained with transformers + PEFT +
bitsandbytes (bf16 compute, SDPA attention), for the recipe fts-mcp runs unless told otherwise:

* weights: 16-bit (LoRA), NF4 at 0.5 byte/param for the block linears plus 16-bit embeddings and head (QLoRA);
  full fine-tuning keeps fp32 master weights and gradients (`precision="mixed"`, 16 bytes/param with AdamW) or
  bf16 weights and gradients with AdamW moments in bf16 (`precision="bf16"`, 8 bytes/param, torchtune's way);
* quantization constants: one fp32 absmax per 64 weights (0.5 bit/param), or with double quantization an
  8-bit absmax plus one fp32 per 256 blocks (8/64 + 32/(64*256) = 0.127 bit/param);
* LoRA adapters and their gradients in `adapter_dtype`; by default what the recipe trains: bf16 on a 4-bit base
  (TRL casts QLoRA adapters to bf16, as the QLoRA paper's script does), fp32 on a 16-bit base (PEFT's default);
  optimizer states per trainable parameter: AdamW 32-bit (torch) keeps two moments in the parameter's dtype,
  bitsandbytes' paged 32-bit AdamW two fp32 moments, 8-bit AdamW 2 bytes;
* paged optimizers keep their states in CUDA unified memory, which the driver evicts to host memory under
  pressure (and the optimizer step touches one tensor at a time): they are reported as `optimizer_paged_gb` and
  not counted against the GPU;
* activations: with gradient checkpointing each layer keeps its input (2*hidden bytes per token) and one layer
  is recomputed at a time; without it every layer keeps everything (about 2*(8h + 2kv + 5i) + 8h bytes/token);
  a padding-free micro-batch holds at most micro_batch x seq_len real tokens, the worst case counted here;
* logits: `cross_entropy="full"` (the plain Hugging Face loss) holds batch x sequence x vocab at 12 bytes (bf16
  logits, fp32 copy for the loss, fp32 and bf16 gradients), often the largest single term for small models with
  big vocabularies; `"chunked"` (the recipe's loss) holds one chunk of 1,024 tokens x vocab at a time;
  `"liger"` (fused linear + cross-entropy) a bf16 chunk of about tokens x hidden / vocab rows, plus the
  hidden-state gradient it computes in the forward pass;
* framework overhead (not in torch's allocated figure): CUDA context and allocator slack;
* preference tuning (`objective="dpo"`): each example is two sequences (prompt + chosen, prompt + rejected), so
  activations and logits count 2 x micro_batch sequences, and a reference forward pass without gradients (the base
  with the adapter off) holds one layer's transient tensors (gate, up and activation of the MLP, hidden states)
  and one loss chunk without gradients at a time while the policy's are kept (`reference_forward_gb`); its
  compute is 2 FLOPs per parameter and token on top of training's.
"""

from __future__ import annotations

import math
from typing import Literal

from pydantic import BaseModel, Field

from fts_mcp.errors import InvalidArgument
from fts_mcp.models.architecture import Architecture
from fts_mcp.planning.gpus import Gpu

Method = Literal["full", "lora", "qlora"]
Optimizer = Literal["adamw_32bit", "adamw_8bit", "paged_adamw_8bit", "paged_adamw_32bit"]
CrossEntropy = Literal["chunked", "liger", "full"]
AdapterDtype = Literal["fp32", "bf16"]
Precision = Literal["mixed", "bf16"]
Objective = Literal["sft", "dpo"]  # the training method: supervised, or preference pairs (two sequences + reference)
SEQUENCES = {"sft": 1, "dpo": 2}  # sequences a training example puts through the model

GB = 1e9
BITS_CONSTANTS = 32 / 64  # fp32 absmax per 64-weight block
BITS_CONSTANTS_DOUBLE = 8 / 64 + 32 / (64 * 256)  # 8-bit absmax, fp32 per 256 blocks
LOGIT_BYTES = 12
REFERENCE_LOGIT_BYTES = 6  # bf16 logits and their fp32 log-softmax, no gradients
CE_CHUNK_TOKENS = 1024  # tokens per chunk of the recipe's chunked cross-entropy
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
    adapters_gb: float = Field(description="trainable LoRA weights, in the adapter dtype")
    gradients_gb: float
    optimizer_gb: float = Field(description="optimizer states resident on the GPU")
    optimizer_paged_gb: float = Field(0.0, description="paged optimizer states (CUDA unified memory, evicted to host "
                                                       "under pressure): not in peak_allocated_gb or total_gb")
    activations_gb: float
    activations_without_checkpointing_gb: float
    logits_gb: float = Field(description="what the cross-entropy holds: all logits, or one chunk of them")
    reference_forward_gb: float = Field(0.0, description="dpo: the no-gradient reference pass (one layer, one loss "
                                                         "chunk at a time)")
    peak_allocated_gb: float = Field(description="comparable with torch.cuda.max_memory_allocated")
    framework_overhead_gb: float
    total_gb: float = Field(description="what the GPU must hold: peak allocated + framework overhead")


class Throughput(BaseModel):
    flops_per_token: float
    utilization: float = Field(description="assumed share of the GPU's dense bf16 peak")
    tokens_per_second: float
    training_tokens: int | None = Field(None, description="real (non-padding) tokens trained on")
    computed_tokens: int | None = Field(None, description="tokens the GPU computes: training_tokens, plus padding "
                                                          "when batches are padded")
    workers: int = Field(1, description="data-parallel GPUs training together (DDP)")
    scaling_efficiency: float = Field(1.0, description="share of workers x one GPU's speed the run is assumed to get")
    hours: float | None = None
    cost_usd: float | None = None


class MethodEstimate(BaseModel):
    method: Method
    trainable_params: int
    gradient_checkpointing: bool = Field(True, description="the checkpointing this estimate assumes")
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


def logits_bytes(arch: Architecture, tokens: int, cross_entropy: CrossEntropy) -> float:
    """What the loss holds at its peak for `tokens` tokens of one micro-batch."""
    if cross_entropy == "full":
        return tokens * arch.vocab * LOGIT_BYTES
    if cross_entropy == "chunked":
        return min(tokens, CE_CHUNK_TOKENS) * arch.vocab * LOGIT_BYTES
    # Liger's fused linear cross-entropy: chunks of next_pow2(tokens / ceil(vocab / hidden)) rows, one bf16 buffer
    # that the kernel overwrites with its gradient, plus the bf16 hidden-state gradient and an fp32 loss per token.
    chunk = min(tokens, 2 ** math.ceil(math.log2(max(1, math.ceil(tokens / math.ceil(arch.vocab / arch.hidden))))))
    return chunk * arch.vocab * 2 + tokens * (2 * arch.hidden + 4)


def optimizer_bytes(optimizer: Optimizer, param_bytes: int = 4) -> int:
    """Optimizer state bytes per trainable parameter: 8-bit AdamW 2; bitsandbytes' paged 32-bit AdamW two fp32
    moments (8); torch's AdamW two moments in the parameter's own dtype (8 for fp32, 4 for bf16)."""
    if "8bit" in optimizer:
        return 2
    return 8 if optimizer == "paged_adamw_32bit" else 2 * param_bytes


def recipe_adapter_dtype(method: Method) -> AdapterDtype:
    """The dtype the training recipe keeps LoRA adapters in: bf16 on a 4-bit base (TRL's SFTTrainer casts them, as
    the QLoRA paper trained), else fp32 (PEFT's default)."""
    return "bf16" if method == "qlora" else "fp32"


def memory(arch: Architecture, method: Method, *, seq_len: int, micro_batch: int, lora_r: int = 16,
           target_modules: str | list[str] = "all-linear", gradient_checkpointing: bool,
           optimizer: Optimizer = "adamw_32bit", double_quant: bool = True, cross_entropy: CrossEntropy = "chunked",
           adapter_dtype: AdapterDtype | None = None, precision: Precision = "mixed",
           objective: Objective = "sft") -> tuple[Memory, int]:
    """Memory of one training step and the number of trainable parameters. `precision` applies to full
    fine-tuning (LoRA and QLoRA always compute with a bf16 base); `adapter_dtype` to LoRA and QLoRA (None: the
    recipe's, `recipe_adapter_dtype`); `objective` 'dpo' counts two sequences per example and the reference pass."""
    adapter_dtype = adapter_dtype or recipe_adapter_dtype(method)
    n = arch.params
    quantizable = arch.layers * arch.block_linear_params
    tokens = seq_len * micro_batch * SEQUENCES[objective]
    constants = quantizable * BITS_CONSTANTS_DOUBLE / 8
    constants_plain = quantizable * BITS_CONSTANTS / 8
    if method == "full":
        trainable = n
        param_bytes = 2 if precision == "bf16" else 4
        weights, adapters, grads = param_bytes * n, 0, param_bytes * n
        constants = constants_plain = 0
    else:
        trainable = lora_params(arch, lora_r, target_modules)
        param_bytes = 2 if adapter_dtype == "bf16" else 4
        adapters, grads = param_bytes * trainable, param_bytes * trainable
        if method == "lora":
            weights, constants, constants_plain = 2 * n, 0, 0
        else:
            weights = quantizable / 2 + 2 * (n - quantizable)
            constants = constants if double_quant else constants_plain
    states = optimizer_bytes(optimizer, param_bytes) * trainable
    opt, paged = (0, states) if optimizer.startswith("paged") else (states, 0)
    act = tokens * activation_bytes_per_token(arch, gradient_checkpointing)
    act_plain = tokens * activation_bytes_per_token(arch, False)
    logits = logits_bytes(arch, tokens, cross_entropy)
    reference = 0.0
    if objective == "dpo":  # no gradients: what one layer holds at once, and one loss chunk without its gradients
        inner = arch.intermediate * min(arch.experts, 2)
        reference = tokens * 2 * (3 * inner + 4 * arch.hidden) + \
            min(tokens, CE_CHUNK_TOKENS) * arch.vocab * REFERENCE_LOGIT_BYTES
    peak = weights + constants + adapters + grads + opt + act + logits + reference
    overhead = CUDA_CONTEXT_GB * GB + ALLOCATOR_SLACK * peak
    gb = lambda value: round(value / GB, 6)  # noqa: E731 - kB resolution: tiny models stay visible
    return Memory(
        weights_gb=gb(weights), quantization_constants_gb=gb(constants),
        quantization_constants_without_double_quant_gb=gb(constants_plain), adapters_gb=gb(adapters),
        gradients_gb=gb(grads), optimizer_gb=gb(opt), optimizer_paged_gb=gb(paged), activations_gb=gb(act),
        activations_without_checkpointing_gb=gb(act_plain), logits_gb=gb(logits), reference_forward_gb=gb(reference),
        peak_allocated_gb=gb(peak),
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


def padded_tokens(tokens: int, *, micro_batch: int, seq_len: int, tokens_per_example: float | None) -> int:
    """Tokens a padded run computes to train on `tokens` real ones: each micro-batch is padded to its longest
    example. Lengths are assumed spread evenly between 0 and twice the mean, so the longest of b examples is about
    2b/(b+1) times the mean (no padding at micro-batch 1), and no row is longer than seq_len."""
    factor = 2 * micro_batch / (micro_batch + 1)
    if tokens_per_example:
        factor = max(1.0, min(factor, seq_len / tokens_per_example))
    return round(tokens * factor)


# Data parallelism: each doubling of workers is assumed to keep this share of the ideal speed-up. A LoRA step
# all-reduces only the adapters' gradients (megabytes), so the loss is mostly the slowest rank's wait; not measured
# on GPUs here (tools/bench_train.py --workers N measures a host).
EFFICIENCY_PER_DOUBLING = 0.95


def scaling_efficiency(workers: int) -> float:
    return round(EFFICIENCY_PER_DOUBLING ** math.log2(workers), 3) if workers > 1 else 1.0


def throughput(arch: Architecture, method: Method, gpu: Gpu, gpus: int, gradient_checkpointing: bool,
               training_tokens: int | None, price: float, utilization: float | None, *,
               computed_tokens: int | None = None, workers: int = 1, objective: Objective = "sft") -> Throughput:
    """Time and cost; the GPU computes `computed_tokens` (padding included, both sequences of a preference pair)
    to train on `training_tokens`. With `workers` data-parallel replicas (each on `gpus` GPUs) the time divides by
    workers x scaling efficiency and the cost counts every GPU. 'dpo' adds the reference's forward pass."""
    per_token = (6 if method == "full" else 4) + (2 if gradient_checkpointing else 0) + (2 if objective == "dpo" else 0)
    flops = per_token * arch.matmul_params
    util = utilization if utilization is not None else UTILIZATION[method]
    efficiency = scaling_efficiency(workers)
    tps = util * gpu.tflops_bf16 * 1e12 * gpus * workers * efficiency / flops
    computed = computed_tokens if computed_tokens is not None else training_tokens
    hours = computed / tps / 3600 if computed else None
    return Throughput(flops_per_token=flops, utilization=util, tokens_per_second=round(tps, 1),
                      training_tokens=training_tokens, computed_tokens=computed, workers=workers,
                      scaling_efficiency=efficiency, hours=hours,
                      cost_usd=round(hours * gpus * workers * price, 2) if hours is not None else None)
