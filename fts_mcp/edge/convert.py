"""`python -m fts_mcp.edge.convert SOURCE TARGET DTYPE`: rewrite a safetensors file's floating tensors in DTYPE."""

import sys

import torch
from safetensors.torch import load_file, save_file

from fts_mcp.models.dtypes import DTYPE_NAMES

if __name__ == "__main__":
    source, target, name = sys.argv[1], sys.argv[2], sys.argv[3]
    if name not in DTYPE_NAMES:
        sys.exit(f"DTYPE must be one of {', '.join(DTYPE_NAMES)}, not {name!r}")
    dtype = getattr(torch, name)
    tensors = {k: (v.to(dtype) if v.is_floating_point() else v).contiguous() for k, v in load_file(source).items()}
    save_file(tensors, target, metadata={"format": "pt"})
