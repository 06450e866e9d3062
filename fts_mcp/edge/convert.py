"""`python -m fts_mcp.edge.convert SOURCE TARGET DTYPE`: rewrite a safetensors file's floating tensors in DTYPE."""

import sys

import torch
from safetensors.torch import load_file, save_file

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}

if __name__ == "__main__":
    source, target, dtype = sys.argv[1], sys.argv[2], DTYPES[sys.argv[3]]
    tensors = {k: (v.to(dtype) if v.is_floating_point() else v).contiguous() for k, v in load_file(source).items()}
    save_file(tensors, target, metadata={"format": "pt"})
