"""The published architectures of common open model families, so an estimate by hub id works offline.

Each entry is the shape in the model's public `config.json` (layers, hidden size, MLP size, attention and
key/value heads, head size where it is not hidden/heads, vocabulary, tied embeddings). Instruct, chat and base
variants share their base model's shape, so names are matched without those suffixes. Pure data: no network,
no torch.
"""

from __future__ import annotations

import re

from fts_mcp.models.architecture import Architecture


def _a(layers: int, hidden: int, intermediate: int, heads: int, kv_heads: int, vocab: int, *,
       head_dim: int | None = None, tied: bool = False) -> Architecture:
    return Architecture(layers=layers, hidden=hidden, intermediate=intermediate, heads=heads, kv_heads=kv_heads,
                        vocab=vocab, head_dim=head_dim, tied_embeddings=tied)


FAMILIES: dict[str, Architecture] = {
    # Llama 3.x (meta-llama)
    "llama-3.2-1b": _a(16, 2048, 8192, 32, 8, 128_256, tied=True),
    "llama-3.2-3b": _a(28, 3072, 8192, 24, 8, 128_256, tied=True),
    "llama-3.1-8b": _a(32, 4096, 14_336, 32, 8, 128_256),
    "llama-3-8b": _a(32, 4096, 14_336, 32, 8, 128_256),
    "llama-3.1-70b": _a(80, 8192, 28_672, 64, 8, 128_256),
    "llama-3.3-70b": _a(80, 8192, 28_672, 64, 8, 128_256),
    "llama-3-70b": _a(80, 8192, 28_672, 64, 8, 128_256),
    "llama-3.1-405b": _a(126, 16_384, 53_248, 128, 8, 128_256),
    # Qwen 2.5 (Qwen)
    "qwen2.5-0.5b": _a(24, 896, 4864, 14, 2, 151_936, tied=True),
    "qwen2.5-1.5b": _a(28, 1536, 8960, 12, 2, 151_936, tied=True),
    "qwen2.5-3b": _a(36, 2048, 11_008, 16, 2, 151_936, tied=True),
    "qwen2.5-7b": _a(28, 3584, 18_944, 28, 4, 152_064),
    "qwen2.5-14b": _a(48, 5120, 13_824, 40, 8, 152_064),
    "qwen2.5-32b": _a(64, 5120, 27_648, 40, 8, 152_064),
    "qwen2.5-72b": _a(80, 8192, 29_568, 64, 8, 152_064),
    # Qwen 3 dense (Qwen)
    "qwen3-0.6b": _a(28, 1024, 3072, 16, 8, 151_936, head_dim=128, tied=True),
    "qwen3-1.7b": _a(28, 2048, 6144, 16, 8, 151_936, head_dim=128, tied=True),
    "qwen3-4b": _a(36, 2560, 9728, 32, 8, 151_936, head_dim=128, tied=True),
    "qwen3-8b": _a(36, 4096, 12_288, 32, 8, 151_936, head_dim=128),
    "qwen3-14b": _a(40, 5120, 17_408, 40, 8, 151_936, head_dim=128),
    "qwen3-32b": _a(64, 5120, 25_600, 64, 8, 151_936, head_dim=128),
    # Mistral (mistralai)
    "mistral-7b-v0.1": _a(32, 4096, 14_336, 32, 8, 32_000),
    "mistral-7b-v0.2": _a(32, 4096, 14_336, 32, 8, 32_000),
    "mistral-7b-v0.3": _a(32, 4096, 14_336, 32, 8, 32_768),
    "mistral-nemo-2407": _a(40, 5120, 14_336, 32, 8, 131_072, head_dim=128),
    # Gemma 2 (google)
    "gemma-2-2b": _a(26, 2304, 9216, 8, 4, 256_000, head_dim=256, tied=True),
    "gemma-2-9b": _a(42, 3584, 14_336, 16, 8, 256_000, head_dim=256, tied=True),
    "gemma-2-27b": _a(46, 4608, 36_864, 32, 16, 256_000, head_dim=128, tied=True),
    # Gemma 3 text models (google; gemma-3-1b is text-only, the larger ones' language model)
    "gemma-3-1b": _a(26, 1152, 6912, 4, 1, 262_144, head_dim=256, tied=True),
    # Phi (microsoft)
    "phi-3-mini": _a(32, 3072, 8192, 32, 32, 32_064),
    "phi-3.5-mini": _a(32, 3072, 8192, 32, 32, 32_064),
    "phi-4": _a(40, 5120, 17_920, 40, 10, 100_352),
}
ALIASES = {**{f"qwen2.5-coder-{size}": f"qwen2.5-{size}" for size in ("0.5b", "1.5b", "3b", "7b", "14b", "32b")},
           **{f"qwen3-{size}-2507": f"qwen3-{size}" for size in ("4b",)},
           "meta-llama-3.1-8b": "llama-3.1-8b", "meta-llama-3-8b": "llama-3-8b", "meta-llama-3-70b": "llama-3-70b",
           "meta-llama-3.1-70b": "llama-3.1-70b", "mistral-nemo-base-2407": "mistral-nemo-2407",
           "mistral-nemo-instruct-2407": "mistral-nemo-2407"}
VARIANT = re.compile(r"-(instruct|it|chat|hf|base|4k|128k)(?=-|$)")


def family_key(model: str) -> str:
    """'meta-llama/Llama-3.1-8B-Instruct' -> 'llama-3.1-8b'."""
    name = model.rsplit("/", 1)[-1].lower()
    name = ALIASES.get(name, name)
    return ALIASES.get(stripped := VARIANT.sub("", name), stripped)


def known_family(model: str) -> tuple[str, Architecture] | None:
    """The table's entry for a hub id, if the family is one it knows."""
    key = family_key(model)
    return (key, FAMILIES[key]) if key in FAMILIES else None
