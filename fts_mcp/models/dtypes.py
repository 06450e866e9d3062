"""The floating-point formats a user may name for weights (merged models, published adapters), in one place.
Torch-free, so the server's tool schemas can use it; `models.loading.DTYPES` maps the names to torch dtypes."""

from __future__ import annotations

from typing import Literal, get_args

Dtype = Literal["bfloat16", "float16", "float32"]
DTYPE_NAMES: tuple[str, ...] = get_args(Dtype)
