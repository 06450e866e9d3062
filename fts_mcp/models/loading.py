"""The one place torch-side code loads a model: device and dtype policy, NF4 config, tokenizer, base model,
and greedy decoding until end of text. Every recipe and the edge runtime come through here, so a policy
(`trust_remote_code`, the compute dtype, how a missing model is reported) is decided once.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

from fts_mcp.errors import InvalidArgument, ModelUnavailable
from fts_mcp.models.base import Quantization
from fts_mcp.models.dtypes import DTYPE_NAMES

DTYPES = {name: getattr(torch, name) for name in DTYPE_NAMES}
# A model with custom code says so in its error; we name the server setting that allows it.
REMOTE_CODE_HINT = "trust_remote_code"


def device() -> torch.device:
    """The job's device: its slot's GPU (the runner sets CUDA_VISIBLE_DEVICES to it), else the CPU."""
    return torch.device("cuda:0" if torch.cuda.is_available() else "cpu")


def world_size() -> int:
    """Ranks training this job together (torch.distributed's environment, set by the runner; 1 without it)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def ddp_backend(on: torch.device | None = None) -> str | None:
    """torch.distributed's backend for this job's ranks: NCCL between GPUs, gloo on the CPU; None for one rank."""
    if world_size() == 1:
        return None
    return "nccl" if (on or device()).type == "cuda" else "gloo"


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
               dtype: torch.dtype | None = None, on: torch.device | None = None, param: str = "base_model"
               ) -> Any:
    """A causal LM on one device: 16-bit (or fp32 on the CPU) by default, NF4 with `quantization='nf4'`.

    On the CPU, bitsandbytes would repack a 4-bit layer's weights for a faster bf16 inference kernel the first
    time it runs in eval mode: the repacked layer computes other logits than the layout it trained in (0.06 on a
    tiny model) and passes no gradient back to its input. Every 4-bit model keeps the trained layout, so a QLoRA
    adapter is evaluated, served and merged on exactly the weights and arithmetic it was trained with."""
    on = on or device()
    dtype = dtype or compute_dtype(on)
    quant = nf4_config(dtype) if quantization == "nf4" else None
    try:
        loaded = AutoModelForCausalLM.from_pretrained(model, quantization_config=quant, dtype=dtype,
                                                      device_map={"": str(on)}, low_cpu_mem_usage=True,
                                                      trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as exc:
        raise _refused(exc, model, "weights", param) from exc
    for module in loaded.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False
    return loaded


def load_dequantized_nf4(model: str, *, trust_remote_code: bool, dtype: torch.dtype,
                         param: str = "base_model") -> Any:
    """The NF4 base a QLoRA adapter trained against, its weights dequantized into an ordinary `dtype` model: what
    a QLoRA adapter merges into, so the merged model is the model that was trained and evaluated."""
    quantized = load_model(model, trust_remote_code=trust_remote_code, quantization="nf4",
                           dtype=compute_dtype(), param=param)
    return quantized.dequantize(dtype=dtype)


def gguf_architecture(source: Path) -> str:
    """`general.architecture` of a GGUF file, read from its header (refusing a file that is not GGUF)."""
    import gguf  # lazy: only GGUF bases need it

    try:
        field = gguf.GGUFReader(str(source)).fields["general.architecture"]
        return bytes(field.parts[field.data[0]]).decode()
    except (KeyError, ValueError, IndexError, OSError, UnicodeDecodeError) as exc:
        raise InvalidArgument(f"{source.name} is not a readable GGUF model file ({type(exc).__name__}: "
                              f"{str(exc)[:200]})", param="base_model") from exc


def convert_gguf(source: Path, target: Path, *, trust_remote_code: bool = False) -> str:
    """A GGUF model file as a Hugging Face folder: transformers dequantizes every tensor to float32 (the weights
    llama.cpp computes with); the tokenizer keeps the chat template stored in the file. Returns the architecture."""
    from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES

    architecture = gguf_architecture(source)
    supported = sorted(a for a in GGUF_SUPPORTED_ARCHITECTURES if a not in ("general", "tokenizer"))
    if architecture not in supported:
        raise InvalidArgument(f"its architecture {architecture!r} cannot be read from GGUF by transformers; "
                              f"supported: {', '.join(supported)}", param="base_model")
    folder, name = str(source.parent), source.name
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name, trust_remote_code=trust_remote_code)
        loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32,
                                                      trust_remote_code=trust_remote_code)
    except (OSError, ValueError, KeyError, RuntimeError) as exc:
        raise _refused(exc, str(source), "GGUF weights", "base_model") from exc
    # A model loaded from GGUF refuses save_pretrained; the same weights in a fresh model of its config do not.
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    fresh = AutoModelForCausalLM.from_config(config, dtype=torch.float32, trust_remote_code=trust_remote_code)
    fresh.load_state_dict(loaded.state_dict(), strict=True)
    fresh.generation_config = loaded.generation_config
    fresh.save_pretrained(target, safe_serialization=True)
    tokenizer.save_pretrained(target)
    return architecture


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


@torch.no_grad()
def greedy_batch(model: Any, tokenizer: Any, prompts: list[list[int]], *, max_tokens: int,
                 batch_size: int = 8) -> list[str]:
    """Greedy answers to many prompts, `batch_size` at a time (left-padded, with an attention mask and positions
    that skip the padding): the same answers as one at a time, several times faster. Prompts are sorted by length
    so a batch pads little; answers come back in the order given."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    answers: list[str] = [""] * len(prompts)
    for start in range(0, len(order), batch_size):
        chunk = order[start:start + batch_size]
        width = max(len(prompts[i]) for i in chunk)
        ids = torch.tensor([[pad] * (width - len(prompts[i])) + prompts[i] for i in chunk], device=model.device)
        mask = torch.tensor([[0] * (width - len(prompts[i])) + [1] * len(prompts[i]) for i in chunk],
                            device=model.device)
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_tokens, do_sample=False,
                             temperature=None, top_p=None, top_k=None, pad_token_id=pad)
        for row, i in enumerate(chunk):
            answers[i] = decode(tokenizer, out[row][width:].tolist())[0]
    return answers

