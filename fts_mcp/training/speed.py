"""The speed choices of a training run, made once before it trains and recorded with the job.

* **Padding-free batches** (on by default): a micro-batch's examples are laid end to end in one row with positions
  restarting per example, so no padding is computed; the attention keeps each example to itself (the model's
  mask follows the positions, or flash-attention's varlen kernels do). `supports_padding_free` checks that on the
  loaded model before relying on it. Losses are those of the padded batch, so the loss curve is unchanged.
* **Packing** (off by default): fill rows up to `max_seq_len` with whole examples (best-fit decreasing), also
  padding-free; fewer optimizer steps per epoch, since a step then holds more examples.
* **Gradient checkpointing and micro-batch from the memory estimate**: "auto" checkpointing is off when the run
  fits the device without it; an unset micro-batch is the largest that fits (at most 16), with accumulation
  keeping the effective batch at 16 examples (`fts_mcp.planning.batch.plan_batch`, the estimator's own model).
* **Loss**: TRL's fused LM head computes the cross-entropy in chunks of tokens, never holding the
  full-vocabulary logits; Liger Kernel's fused RMSNorm / RoPE / SwiGLU where CUDA and `liger-kernel` are present.
* **Preference tuning** (method "dpo"): TRL's DPOTrainer pads its batches (no padding-free rows, no packing, no
  Liger kernels); a micro-batch of n pairs is 2n sequences plus a reference forward pass without gradients, which
  the memory estimate counts (`objective="dpo"`).

Every choice and its reason goes into the job's progress (`plan`) and metrics.json, so a run can be repeated.
"""

from __future__ import annotations

import importlib.util
import logging
from pathlib import Path
from typing import Any

import psutil
import torch
from pydantic import BaseModel, Field

from fts_mcp.errors import InvalidArgument
from fts_mcp.files import write_json_atomic
from fts_mcp.models.architecture import from_config
from fts_mcp.models.loading import world_size
from fts_mcp.planning.batch import plan_batch
from fts_mcp.training import varlen
from fts_mcp.training.spec import TrainJobSpec

log = logging.getLogger(__name__)

EFFECTIVE_BATCH = 16  # examples per optimizer step for a spec without batch_size (submitted before it)
MAX_AUTO_MICRO_BATCH = 16


class SpeedPlan(BaseModel):
    """What this run does for speed, and why (recorded in metrics.json and, as one line, in progress.plan)."""

    micro_batch_size: int
    gradient_accumulation_steps: int
    gradient_checkpointing: bool
    padding_free: bool
    packing: bool
    liger_kernel: bool
    loss: str = "chunked cross-entropy (TRL fused LM head: no full-vocabulary logits)"
    attention: str
    memory_budget_gb: float = Field(description="what the automatic choices had to fit in")
    estimated_gb: float = Field(description="the estimator's total for the chosen plan")
    reasons: list[str]

    def summary(self) -> str:
        parts = [f"micro-batch {self.micro_batch_size} x {self.gradient_accumulation_steps} accumulation",
                 f"checkpointing {'on' if self.gradient_checkpointing else 'off'}",
                 "packed" if self.packing else ("padding-free" if self.padding_free else "padded"),
                 "chunked loss" + (", Liger kernels" if self.liger_kernel else "")]
        return f"{', '.join(parts)} (est. {self.estimated_gb:.1f} of {self.memory_budget_gb:.1f} GB)"


def memory_budget_gb(device: torch.device) -> float:
    """What this run may use: on CUDA the device's free memory plus what this process already holds there (the
    loaded base); on the CPU the host's available memory plus this process's resident set."""
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        return (free + torch.cuda.memory_reserved(device)) / 1e9
    ranks = world_size()  # data-parallel ranks on the CPU share the host's memory
    return (psutil.virtual_memory().available / ranks + psutil.Process().memory_info().rss) / 1e9


@torch.no_grad()
def supports_padding_free(model: Any) -> bool:
    """True when examples laid end to end with restarting positions do not see each other: the second example's
    logits in the packed row equal its logits alone. One tiny forward pass on the loaded model."""
    device = next(model.parameters()).device
    first, second = torch.tensor([[5, 6, 7, 8]], device=device), torch.tensor([[9, 10, 11]], device=device)
    was_training = model.training
    model.eval()
    try:
        alone = model(input_ids=second, use_cache=False).logits[0]
        packed = model(input_ids=torch.cat([first, second], dim=1), use_cache=False,  # as in training: no cache
                       position_ids=torch.tensor([[0, 1, 2, 3, 0, 1, 2]], device=device)).logits[0, 4:]
    except (TypeError, ValueError, RuntimeError) as exc:  # a model that takes no position_ids, or cannot mask
        log.info("padding-free batches unsupported by this model: %s", exc)
        return False
    finally:
        model.train(was_training)
    scale = alone.float().abs().max().clamp(min=1.0)
    return bool(((alone.float() - packed.float()).abs().max() / scale) < 1e-2)


def padding_free_attention(model: Any) -> str | None:
    """Give `model` an attention that keeps examples in a padding-free row apart, cheaply: flash-attention's varlen
    kernels where installed on CUDA, else per-example SDPA (`fts_mcp.training.varlen`), else the model's own
    (SDPA with a block mask). Returns its name after checking it on the model, or None if none keeps them apart."""
    original = model.config._attn_implementation
    choices = []
    if model.device.type == "cuda" and importlib.util.find_spec("flash_attn") is not None:
        choices.append("flash_attention_2")
    choices += [varlen.NAME, original]
    for name in dict.fromkeys(choices):
        try:
            if name == varlen.NAME:
                if not varlen.use_varlen(model):
                    continue
            elif name != model.config._attn_implementation:
                model.set_attn_implementation(name)
        except (ImportError, ValueError) as exc:
            log.info("attention %s unavailable: %s", name, exc)
            continue
        if supports_padding_free(model):
            return name
    model.set_attn_implementation(original)
    return None


def liger_available(model: Any) -> bool:
    """Liger Kernel is installed, CUDA is present and Liger has kernels for this model type."""
    if model.device.type != "cuda" or importlib.util.find_spec("liger_kernel") is None:
        return False
    from liger_kernel.transformers.monkey_patch import MODEL_TYPE_TO_APPLY_LIGER_FN

    return getattr(model.config, "model_type", None) in MODEL_TYPE_TO_APPLY_LIGER_FN


PLAN_FILE = "speed.json"


def write_plan(checkpoint: Path, speed: SpeedPlan) -> None:
    if checkpoint.is_dir():
        write_json_atomic(checkpoint / PLAN_FILE, speed.model_dump())


def read_plan(checkpoint: Path) -> SpeedPlan | None:
    """The plan a checkpoint was trained with; None for a checkpoint without one or with an unreadable one."""
    try:
        return SpeedPlan.model_validate_json((checkpoint / PLAN_FILE).read_bytes())
    except (OSError, ValueError):
        return None


def plan(spec: TrainJobSpec, model: Any, *, budget_gb: float | None = None,
         resuming: SpeedPlan | None = None) -> SpeedPlan:
    """Decide micro-batch, accumulation, checkpointing, padding-free and kernels for `spec` on the loaded model.
    `resuming`: the plan of the checkpoint this run continues; its micro-batch and accumulation are kept (the
    same examples per step, whatever memory is free now)."""
    t = spec.training
    if resuming is not None:
        t = t.model_copy(update={"micro_batch_size": t.micro_batch_size or resuming.micro_batch_size,
                                 "gradient_accumulation_steps": t.gradient_accumulation_steps
                                 or resuming.gradient_accumulation_steps})
    device = next(model.parameters()).device
    budget = budget_gb if budget_gb is not None else memory_budget_gb(device)
    reasons: list[str] = []

    padding_free = t.padding_free or t.packing
    attention = getattr(model.config, "_attn_implementation", None) or "default"
    if spec.method == "dpo":
        if t.packing:
            raise InvalidArgument("preference pairs are not packed (each answer is scored whole against its pair); "
                                  "set packing to false", param="training.packing")
        padding_free = False
        reasons.append("padded batches: preference tuning (TRL's DPOTrainer) pads each micro-batch's chosen and "
                       "rejected sequences")
    if padding_free:
        attention = padding_free_attention(model)
        if attention is None:
            if t.packing:
                raise InvalidArgument("packing needs a model whose attention follows restarting positions, and this "
                                      "one lets packed examples see each other; set packing to false",
                                      param="training.packing")
            padding_free = False
            attention = getattr(model.config, "_attn_implementation", None) or "default"
            reasons.append("padded batches: this model lets examples laid end to end attend to each other")
        else:
            reasons.append(f"padding-free: examples laid end to end, positions restart, {attention} attention keeps "
                           "each to itself")

    arch = from_config(model.config.to_dict(), source="loaded model")
    targets = spec.lora.target_modules
    if targets != "all-linear" and not set(targets) <= {name for name, _, _ in arch.linear_shapes()}:
        targets = "all-linear"  # names the estimator's shape does not know: count every linear layer (an upper
        # bound); whether the model has them is the trainer's check, which names the model's own layers
    batch = plan_batch(arch, "qlora" if spec.quantization == "nf4" else "lora", budget_gb=budget,
                       seq_len=t.max_seq_len, micro_batch=t.micro_batch_size,
                       gradient_accumulation_steps=t.gradient_accumulation_steps,
                       gradient_checkpointing=t.gradient_checkpointing,
                       effective_batch=max(1, (t.batch_size or EFFECTIVE_BATCH) // world_size()),
                       max_micro_batch=MAX_AUTO_MICRO_BATCH, lora_r=spec.lora.r,
                       target_modules=targets, optimizer=_estimator_optimizer(t.optimizer), objective=spec.method)
    reasons.append(batch.reason)

    liger = spec.method == "sft" and (t.liger_kernel is True or (t.liger_kernel == "auto" and liger_available(model)))
    if t.liger_kernel is True and spec.method == "dpo":
        raise InvalidArgument("liger_kernel is for method 'sft' (TRL's DPOTrainer has deprecated it); use 'auto' or "
                              "false", param="training.liger_kernel")
    if t.liger_kernel is True and not liger_available(model):
        raise InvalidArgument("liger_kernel needs CUDA, the liger-kernel package (pip install 'fts-mcp[liger]') and a "
                              f"model type Liger supports (this is {getattr(model.config, 'model_type', '?')}); "
                              "use 'auto' or false", param="training.liger_kernel")
    if liger:
        reasons.append("Liger kernels: fused RMSNorm, RoPE and SwiGLU")
    return SpeedPlan(micro_batch_size=batch.micro_batch, gradient_accumulation_steps=batch.gradient_accumulation_steps,
                     gradient_checkpointing=batch.gradient_checkpointing, padding_free=padding_free,
                     packing=t.packing, liger_kernel=liger,
                     **({"loss": "DPO sigmoid loss on summed answer log-probabilities (TRL fused LM head)"}
                        if spec.method == "dpo" else {}),
                     attention=attention,
                     memory_budget_gb=round(budget, 2), estimated_gb=round(batch.total_gb, 2), reasons=reasons)


def _estimator_optimizer(optimizer: str) -> str:
    return "adamw_32bit" if optimizer == "adamw_torch" else optimizer
