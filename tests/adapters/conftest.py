"""Adapters made directly with PEFT on the tiny model (random, non-zero deltas): no training run needed."""

from pathlib import Path

import pytest


def make_adapter(model_dir: Path, out: Path, *, r: int, seed: int, targets="all-linear", alpha: float | None = None):
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    peft = get_peft_model(model, LoraConfig(r=r, lora_alpha=alpha or 2 * r, target_modules=targets,
                                            lora_dropout=0.0, task_type="CAUSAL_LM"))
    with torch.no_grad():
        for name, param in peft.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.05)
    peft.save_pretrained(out)
    return out


@pytest.fixture
def adapter_a(fts_home, tiny_model):
    return make_adapter(tiny_model, fts_home / "adapter-a", r=4, seed=1)


@pytest.fixture
def adapter_b(fts_home, tiny_model):
    return make_adapter(tiny_model, fts_home / "adapter-b", r=8, seed=2)
