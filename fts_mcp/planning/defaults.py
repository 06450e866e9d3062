"""Settings chosen for the caller when they leave them out: the quantization (`auto`) and, from the dataset's size,
the batch, epochs, learning rate and warm-up. Pure functions: plain values in, the choice and its reasons out.

Agents start with 40-500 examples. With fixed defaults (3 epochs of 16-example steps) 40 examples are 8 optimiser
steps, too few for an adapter to learn a format, while 300 examples cost 900 example passes, minutes more on a CPU
than the task needs. So the run gets at least `MIN_STEPS` optimiser steps and at least one pass over the data:
the batch is the largest of 16, 8 or 4 examples that still gives an epoch `MIN_STEPS` steps (4 for small data),
and a dataset too small for that gets more epochs (up to `MAX_AUTO_EPOCHS`); warm-up is a tenth of the steps.
What the caller sets is kept as given.
"""

from __future__ import annotations

import math
from typing import Literal

from fts_mcp.training.spec import TrainingSpec

MIN_STEPS = 30  # optimiser steps a run gets at least, raising the epochs of a small dataset
MAX_AUTO_EPOCHS = 10  # ... up to this many passes over the data
LEARNING_RATE = 2e-4  # LoRA's usual peak rate (alpha = 2r); small batches do well with it too
WARMUP_RATIO = 0.1
BATCHES = (16, 8, 4)  # examples per optimiser step: the largest that gives an epoch MIN_STEPS steps
CPU_COMPUTE_BYTES = 4  # the loader computes in float32 on a CPU
MEMORY_HEADROOM = 0.6  # a 16-bit (fp32 on a CPU) base may take this share of memory, the rest is the run's

Quantization = Literal["nf4", "none"]


def auto_batch(examples: int) -> int:
    """Examples per optimiser step: the largest of 16, 8, 4 that gives an epoch `MIN_STEPS` steps, else 4 (never
    more than the data)."""
    for size in BATCHES:
        if examples >= size * MIN_STEPS:
            return size
    return max(1, min(BATCHES[-1], examples))


def training_defaults(t: TrainingSpec, *, examples: int) -> tuple[TrainingSpec, list[str]]:
    """The training settings with every unset (None) choice filled from `examples` (the training split's size),
    and what was chosen, in words."""
    reasons: list[str] = []
    if t.micro_batch_size and t.gradient_accumulation_steps:
        batch = t.micro_batch_size * t.gradient_accumulation_steps * t.workers
    elif t.batch_size is not None:
        batch = t.batch_size
    else:
        batch = auto_batch(examples)
        reasons.append(f"batch {batch} examples a step ({examples} training examples)")
    steps_per_epoch = max(1, math.ceil(examples / batch))
    epochs = t.epochs
    if epochs is None and t.max_steps is None:
        epochs = float(min(MAX_AUTO_EPOCHS, math.ceil(MIN_STEPS / steps_per_epoch)))
        if epochs > 1:
            reasons.append(f"{epochs:g} epochs so a small dataset gets {int(epochs) * steps_per_epoch} steps "
                           f"(at least {MIN_STEPS} where {MAX_AUTO_EPOCHS} epochs allow)")
        else:
            reasons.append(f"1 epoch, {steps_per_epoch} steps (at least {MIN_STEPS})")
    learning_rate = t.learning_rate if t.learning_rate is not None else LEARNING_RATE
    warmup = t.warmup_ratio if t.warmup_ratio is not None else WARMUP_RATIO
    if t.learning_rate is None:
        reasons.append(f"learning rate {learning_rate:g} with {warmup:.0%} warm-up")
    chosen = t.model_copy(update={"batch_size": batch, "epochs": epochs if epochs is not None else 1.0,
                                  "learning_rate": learning_rate, "warmup_ratio": warmup})
    return chosen, reasons


def choose_quantization(requested: Literal["auto", "nf4", "none"], *, cuda: bool, params: int | None,
                        memory_gb: float | None) -> tuple[Quantization, str]:
    """`auto`: NF4 (QLoRA) where the job trains on a CUDA GPU, or where the unquantized base would not fit the
    host's memory; else 16-bit LoRA (on a CPU a small model trains faster unquantized and loses nothing)."""
    if requested != "auto":
        return requested, f"{requested} as asked"
    if cuda:
        return "nf4", "auto: NF4 (QLoRA) on a GPU: a quarter of the base's memory, 16-bit adapters"
    if params is not None and memory_gb is not None:
        needed = params * CPU_COMPUTE_BYTES / 1e9
        if needed > MEMORY_HEADROOM * memory_gb:
            return "nf4", (f"auto: NF4 (QLoRA): the unquantized base needs about {needed:.1f} GB, more than "
                           f"{MEMORY_HEADROOM:.0%} of this host's {memory_gb:.1f} GB")
        return "none", (f"auto: 16-bit LoRA on the CPU: the base ({needed:.1f} GB unquantized) fits this host's "
                        f"{memory_gb:.1f} GB, and trains faster than NF4 there")
    return "none", "auto: 16-bit LoRA on the CPU (the model's size is unknown; pass quantization='nf4' if it is large)"
