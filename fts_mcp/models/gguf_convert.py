"""`python -m fts_mcp.models.gguf_convert SOURCE.gguf TARGET_DIR`: dequantize a GGUF model file into a Hugging Face
folder (float32 safetensors, tokenizer, chat template, generation config). Prints `{"architecture": ...}` on
success; on failure a `fts-mcp: <reason>` line on stderr and exit status 2. Called by `fts_mcp.models.gguf`."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from fts_mcp.errors import FtsError
from fts_mcp.models.loading import convert_gguf


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print("fts-mcp: usage: python -m fts_mcp.models.gguf_convert SOURCE.gguf TARGET_DIR", file=sys.stderr)
        return 2
    try:
        architecture = convert_gguf(Path(argv[0]), Path(argv[1]),
                                    trust_remote_code=os.environ.get("FTS_TRUST_REMOTE_CODE") == "1")
    except FtsError as exc:
        print(f"fts-mcp: {exc.message}", file=sys.stderr)
        return 2
    print(json.dumps({"architecture": architecture}))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
