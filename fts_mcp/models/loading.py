"""The one place torch-side code loads a model: device and dtype policy, NF4 config, tokenizer, base model,
and greedy decoding until end of text. Every recipe and the edge runtime come through here, so a policy
(`trust_remote_code`, the compute dtype, how a missing model is reported) is decided once.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

from fts_mcp.errors import InvalidArgument, ModelUnavailable

Quantization = Literal["nf4", "none"]
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
# A model with custom code says so in its error; we name the server setting that allows it.
REMOTE_CODE_HINT = "trust_remote_code"


def device() -> torch.device:
    """The job's device: its slot's GPU (the runner sets CUDA_VISIBLE_DEVICES to it), else the CPU."""
    return torch.device("cuda:0" if torch.cuda.is_available() else "cpu")


def compute_dtype(on: torch.device | None = None) -> torch.dtype:
    """bf16 where the GPU has it, fp16 on older GPUs, fp32 on the CPU (fastest there for small models)."""
    on = on or device()
    if on.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


def nf4_config(dtype: torch.dtype) -> BitsAndBytesConfig:
    """QLoRA's base: 4-bit NF4 with double quantization, computing (and storing the packed weights) in `dtype`."""
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=dtype, bnb_4bit_quant_storage=dtype)


def _refused(exc: Exception, model: str, what: str, param: str) -> Exception:
    text = str(exc)
    if REMOTE_CODE_HINT in text:
        return InvalidArgument(f"{model!r} ships its own model code, which this server does not run; if you trust "
                               "it, start the server with FTS_TRUST_REMOTE_CODE=1", param=param)
    return ModelUnavailable(f"cannot load the {what} of {model!r}: {text[:500]}", param=param)


def load_tokenizer(model: str, *, trust_remote_code: bool, param: str = "base_model") -> Any:
    """The model's tokenizer, with a pad token (its EOS when it has none)."""
    try:
        tokenizer = AutoTokenizer.from_pretrained(model, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as exc:
        raise _refused(exc, model, "tokenizer", param) from exc
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model(model: str, *, trust_remote_code: bool, quantization: Quantization = "none",
               dtype: torch.dtype | None = None, on: torch.device | None = None, param: str = "base_model",
               training: bool = False) -> Any:
    """A causal LM on one device: 16-bit (or fp32 on the CPU) by default, NF4 with `quantization='nf4'`.

    `training`: the model will be trained. On the CPU, bitsandbytes repacks a 4-bit layer's weights for fast
    inference the first time it runs in eval mode without gradients (an evaluation step, a probe), and the
    repacked layer passes no gradient back to its input; a model for training keeps the trainable layout."""
    on = on or device()
    dtype = dtype or compute_dtype(on)
    quant = nf4_config(dtype) if quantization == "nf4" else None
    try:
        loaded = AutoModelForCausalLM.from_pretrained(model, quantization_config=quant, dtype=dtype,
                                                      device_map={"": str(on)}, low_cpu_mem_usage=True,
                                                      trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as exc:
        raise _refused(exc, model, "weights", param) from exc
    if training:
        for module in loaded.modules():
            if hasattr(module, "support_avx512bf16_for_cpu"):
                module.support_avx512bf16_for_cpu = False
    return loaded


def decode(tokenizer: Any, new_ids: list[int]) -> tuple[str, Literal["stop", "length"]]:
    """Text up to the first end-of-text token, and why generation ended."""
    eos = tokenizer.eos_token_id
    if eos is not None and eos in new_ids:
        return tokenizer.decode(new_ids[: new_ids.index(eos)], skip_special_tokens=True), "stop"
    return tokenizer.decode(new_ids, skip_special_tokens=True), "length"


@torch.no_grad()
def generate(model: Any, tokenizer: Any, ids: list[int], *, max_tokens: int, temperature: float = 0.0,
             top_p: float = 1.0, stopping_criteria: Any = None) -> tuple[str, Literal["stop", "length"], int]:
    """One completion: (text, finish_reason, new token count). Greedy at temperature 0."""
    sample = temperature > 0
    out = model.generate(input_ids=torch.tensor([ids], device=model.device), max_new_tokens=max_tokens,
                         do_sample=sample, temperature=temperature if sample else None,
                         top_p=top_p if sample else None, pad_token_id=tokenizer.pad_token_id,
                         stopping_criteria=stopping_criteria)
    new = out[0][len(ids):].tolist()
    text, finish = decode(tokenizer, new)
    return text, finish, len(new)

