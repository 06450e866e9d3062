"""Varlen attention for padding-free rows, on any device.

A padding-free row holds several examples end to end. Stock SDPA keeps them apart with a block-diagonal mask over
the whole row, so attention costs (sum of lengths)^2 — worse than padding for long rows — and flash-attention's
varlen kernels, which cost only the sum of each example's length^2, exist on CUDA with flash-attn installed only.
This attention runs causal SDPA on each example's slice of the row instead: exact, no mask built, and the fused
SDPA kernels the device has. It is registered with transformers' attention interface as `fts_varlen`.

Example boundaries come from the collator's `cu_seq_lens_q` (read once per forward pass), else from where
`position_ids` restart. Anything else (a padding mask, a KV cache) goes to stock SDPA unchanged.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

NAME = "fts_varlen"
# (the cu_seq_lens tensor, its values): read once per forward pass, not once per layer. The tensor itself is held
# (not its id, which a later tensor may reuse).
_bounds_cache: tuple[torch.Tensor, list[int]] | None = None


def _boundaries(length: int, kwargs: dict[str, Any]) -> list[int]:
    """[0, end of example 1, ..., length] for a padding-free row of `length` tokens."""
    global _bounds_cache
    cu = kwargs.get("cu_seq_lens_q")
    if cu is not None:
        if _bounds_cache is None or _bounds_cache[0] is not cu:
            _bounds_cache = (cu, [int(x) for x in cu.tolist()])
        return _bounds_cache[1]
    positions = kwargs.get("position_ids")
    if positions is not None and positions.shape[-1] == length:
        starts = (positions.reshape(-1, length)[0] == 0).nonzero().flatten().tolist()
        return sorted({0, *starts, length})
    return [0, length]


def varlen_attention_forward(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                             attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                             **kwargs: Any) -> tuple[torch.Tensor, None]:
    """query (1, heads, L, dim), key/value (1, kv_heads, L, dim) -> (1, L, heads, dim), each example causal on its
    own slice."""
    length = query.shape[2]
    if attention_mask is not None or query.shape[0] != 1 or key.shape[2] != length:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    bounds = _boundaries(length, kwargs)
    sizes = {b - a for a, b in zip(bounds, bounds[1:], strict=False)}
    gqa = query.shape[1] != key.shape[1]
    p = dropout if module.training else 0.0
    if len(sizes) == 1:  # equal lengths (fixed-length data, full packed rows): one batched call
        n = len(bounds) - 1
        rows = [t[0].unflatten(1, (n, length // n)).transpose(0, 1) for t in (query, key, value)]
        out = F.scaled_dot_product_attention(*rows, dropout_p=p, is_causal=True, scale=scaling, enable_gqa=gqa)
        out = out.transpose(0, 1).flatten(1, 2)[None]
    else:
        pieces = [F.scaled_dot_product_attention(query[:, :, a:b], key[:, :, a:b], value[:, :, a:b], dropout_p=p,
                                                 is_causal=True, scale=scaling, enable_gqa=gqa)
                  for a, b in zip(bounds, bounds[1:], strict=False) if b > a]
        out = torch.cat(pieces, dim=2)
    return out.transpose(1, 2).contiguous(), None


def varlen_mask(*, attention_mask: torch.Tensor | None = None, q_length: int = 0, kv_length: int = 0,
                **kwargs: Any) -> torch.Tensor | None:
    """No mask for a row without padding (the attention splits it); stock SDPA's mask otherwise."""
    if attention_mask is None and q_length == kv_length:
        return None
    return sdpa_mask(attention_mask=attention_mask, q_length=q_length, kv_length=kv_length, **kwargs)


def eligible(config: Any) -> bool:
    """Plain causal attention: no sliding window and no logit soft-capping (whose masks SDPA must apply)."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    return not any(getattr(text, name, None) for name in ("sliding_window", "attn_logit_softcapping"))


def use_varlen(model: Any) -> bool:
    """Switch `model` to varlen attention when its attention is plain causal SDPA or eager; True if switched."""
    if getattr(model.config, "_attn_implementation", None) not in ("sdpa", "eager") or not eligible(model.config):
        return False
    AttentionInterface.register(NAME, varlen_attention_forward)
    AttentionMaskInterface.register(NAME, varlen_mask)
    model.set_attn_implementation(NAME)
    return True
