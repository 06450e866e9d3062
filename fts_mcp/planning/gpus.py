"""GPU catalogue: memory, dense bf16/fp16 tensor throughput (vendor spec, no sparsity) and a typical price.

Prices are typical on-demand cloud list prices per GPU-hour (late 2026); pass `price_per_gpu_hour` for yours.
"""

from __future__ import annotations

from dataclasses import dataclass

from fts_mcp.errors import InvalidArgument


@dataclass(frozen=True)
class Gpu:
    name: str
    memory_gb: float
    tflops_bf16: float
    usd_per_hour: float
    bf16: bool = True


GPUS: dict[str, Gpu] = {g.name.lower(): g for g in (
    Gpu("B200", 180, 2250, 6.00),
    Gpu("H200", 141, 989, 3.80),
    Gpu("H100", 80, 989, 2.90),
    Gpu("H100-PCIe", 80, 756, 2.40),
    Gpu("A100-80GB", 80, 312, 1.80),
    Gpu("A100-40GB", 40, 312, 1.30),
    Gpu("L40S", 48, 362, 1.00),
    Gpu("A6000", 48, 155, 0.80),
    Gpu("L4", 24, 121, 0.70),
    Gpu("A10G", 24, 70, 1.00),
    Gpu("RTX-4090", 24, 165, 0.40),
    Gpu("RTX-3090", 24, 71, 0.25),
    Gpu("RTX-5090", 32, 210, 0.70),
    Gpu("T4", 16, 65, 0.35, bf16=False),
    Gpu("V100-32GB", 32, 125, 0.90, bf16=False),
    Gpu("MI300X", 192, 1307, 3.50),
)}
ALIASES = {"a100": "a100-80gb", "a100-80": "a100-80gb", "a100-40": "a100-40gb", "4090": "rtx-4090",
           "rtx4090": "rtx-4090", "3090": "rtx-3090", "rtx3090": "rtx-3090", "5090": "rtx-5090", "h100-sxm": "h100",
           "v100": "v100-32gb"}


def find_gpu(name: str) -> Gpu:
    key = name.strip().lower().replace(" ", "-").replace("_", "-")
    key = ALIASES.get(key, key)
    if key not in GPUS:
        raise InvalidArgument(f"unknown GPU {name!r}; known: {', '.join(g.name for g in GPUS.values())} "
                              "(or give gpu_memory_gb for another card)", param="gpu")
    return GPUS[key]


def nearest_gpu(memory_gb: float) -> Gpu:
    """The known card whose memory is closest to `memory_gb` (the cheaper one on a tie): the stated assumption for
    timing a card given only by its memory."""
    return min(GPUS.values(), key=lambda g: (abs(g.memory_gb - memory_gb), g.usd_per_hour))
