"""Micro-batch, gradient accumulation and gradient checkpointing from the memory estimate: the one policy that
the training recipe and `estimate_resources` share. Pure: the model's shape and a budget in, a plan and its
reason out.

The rule: checkpointing costs about a third more compute, so "auto" prefers it off. Among the candidate
micro-batches, take the largest that fits the budget without checkpointing — as long as it still holds
`MIN_TOKENS_PER_PASS` tokens (or the whole effective batch), below which a GPU idles more than recompute costs —
else the largest that fits with it. If nothing fits, the smallest micro-batch with checkpointing on (or as
forced), said not to fit.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel

from fts_mcp.errors import InvalidArgument
from fts_mcp.models.architecture import Architecture
from fts_mcp.planning.memory import Method, memory

MIN_TOKENS_PER_PASS = 2048


class BatchPlan(BaseModel):
    micro_batch: int
    gradient_accumulation_steps: int
    gradient_checkpointing: bool
    total_gb: float  # estimated total (Memory.total_gb) for the chosen plan
    reason: str  # one sentence a user can read, naming the estimate and the budget
    fits: bool = True  # total_gb <= budget_gb


def micro_batch_candidates(micro_batch: int | None, effective_batch: int, max_micro_batch: int) -> list[int]:
    """The given micro-batch, or (None: automatic) min(max_micro_batch, effective_batch) and the powers of two
    below it, largest first: 16 -> [16, 8, 4, 2, 1]; 12 -> [12, 8, 4, 2, 1]."""
    if micro_batch is not None:
        return [micro_batch]
    top = max(1, min(max_micro_batch, effective_batch))
    return sorted({top} | {2**k for k in range(top.bit_length()) if 2**k <= top}, reverse=True)


def plan_batch(arch: Architecture, method: Method, *, budget_gb: float, seq_len: int, micro_batch: int | None,
               gradient_accumulation_steps: int | None, gradient_checkpointing: bool | Literal["auto"],
               effective_batch: int = 16, max_micro_batch: int = 16, **memory_kwargs: Any) -> BatchPlan:
    """Choose micro-batch, accumulation and checkpointing so the run fits `budget_gb` (compared with
    `Memory.total_gb`: 10^9 bytes, CUDA context and allocator slack included). `memory_kwargs` go to `memory()`
    (lora_r, target_modules, optimizer, cross_entropy, adapter_dtype, precision, double_quant).

    Accumulation left as None keeps the effective batch: max(1, effective_batch // micro_batch)."""
    if budget_gb <= 0:
        raise InvalidArgument(f"budget_gb must be positive, got {budget_gb}", param="budget_gb")
    for name, value in (("micro_batch", micro_batch), ("gradient_accumulation_steps", gradient_accumulation_steps),
                        ("effective_batch", effective_batch), ("max_micro_batch", max_micro_batch)):
        if value is not None and value < 1:
            raise InvalidArgument(f"{name} must be at least 1, got {value}", param=name)
    candidates = micro_batch_candidates(micro_batch, effective_batch, max_micro_batch)
    modes = [False, True] if gradient_checkpointing == "auto" else [bool(gradient_checkpointing)]

    def total(batch: int, checkpointing: bool) -> float:
        m, _ = memory(arch, method, seq_len=seq_len, micro_batch=batch, gradient_checkpointing=checkpointing,
                      **memory_kwargs)
        return m.total_gb

    def full_enough(batch: int, on: bool) -> bool:  # an automatic micro-batch without recompute must fill a pass
        return on or micro_batch is not None or len(modes) == 1 or batch * seq_len >= min(
            MIN_TOKENS_PER_PASS, candidates[0] * seq_len)

    chosen = next(((batch, on, gb) for on in modes for batch in candidates
                   if full_enough(batch, on) and (gb := total(batch, on)) <= budget_gb), None)
    if chosen is None:
        batch, on = candidates[-1], modes[-1]
        gb = total(batch, on)
        reason = (f"not expected to fit: micro-batch {batch} with checkpointing {_onoff(on)} needs {gb:.1f} GB of "
                  f"{budget_gb:.1f} GB")
    else:
        batch, on, gb = chosen
        size = f"micro-batch {batch}" + (" (the largest that fits)" if len(candidates) > 1 else "")
        if gradient_checkpointing != "auto":
            reason = f"checkpointing {_onoff(on)} as asked: {size} needs {gb:.1f} of {budget_gb:.1f} GB"
        elif not on:
            reason = f"checkpointing off: {size} fits in {gb:.1f} of {budget_gb:.1f} GB without it"
        else:
            fits_off = [b for b in candidates if total(b, False) <= budget_gb]
            if fits_off:
                reason = (f"checkpointing on: without it only micro-batch {fits_off[0]} fits, under "
                          f"{MIN_TOKENS_PER_PASS:,} tokens a pass; with it {size} needs {gb:.1f} of "
                          f"{budget_gb:.1f} GB")
            else:
                off = total(candidates[-1], False)
                reason = (f"checkpointing on: without it even micro-batch {candidates[-1]} needs {off:.1f} GB of "
                          f"{budget_gb:.1f} GB; with it {size} needs {gb:.1f} GB")
    steps = gradient_accumulation_steps if gradient_accumulation_steps is not None else max(1, effective_batch // batch)
    return BatchPlan(micro_batch=batch, gradient_accumulation_steps=steps, gradient_checkpointing=on, total_gb=gb,
                     reason=reason, fits=chosen is not None)


def _onoff(on: bool) -> str:
    return "on" if on else "off"
