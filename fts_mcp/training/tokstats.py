"""`python -m fts_mcp.training.tokstats MODEL DATASET MAX_SEQ_LEN`: token statistics as JSON on stdout.

Loading a tokenizer imports torch, which the server process never does, so the server runs this as a
short-lived subprocess. It tokenizes exactly as the training job will (same template and loss mask).
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

from fts_mcp.datafiles import TokenStats, scan
from fts_mcp.errors import FtsError
from fts_mcp.models.prompts import encode_rows


def token_stats(model: str, dataset: Path, max_seq_len: int,
                trust_remote_code: bool = False) -> tuple[TokenStats, list[tuple[int, str]]]:
    """Statistics over the examples the model can render, and (line, reason) for those it cannot. Streams the
    file: memory holds one example and a length per example, whatever the file's size."""
    from fts_mcp.models.loading import load_tokenizer  # torch side: this module runs as its own process

    tokenizer = load_tokenizer(model, trust_remote_code=trust_remote_code)
    lengths: list[int] = []
    trained = 0
    errors: list[tuple[int, str]] = []
    for line, fmt, record, problem in scan(dataset):
        if problem is not None:
            continue  # structural problems are validate_dataset's own report
        encoded, failed = encode_rows(tokenizer, fmt, [(line, record)])
        errors += failed
        for example in encoded:
            lengths.append(len(example["input_ids"]))
            trained += sum(example["completion_mask"][:max_seq_len])
    lengths.sort()
    lengths = lengths or [0]
    return TokenStats(
        min=lengths[0], max=lengths[-1], mean=round(statistics.fmean(lengths), 2),
        p50=lengths[len(lengths) // 2], p95=lengths[min(len(lengths) - 1, int(len(lengths) * 0.95))],
        total_tokens=sum(lengths), trained_tokens=trained,
        over_max_seq_len=sum(1 for n in lengths if n > max_seq_len), max_seq_len=max_seq_len), errors


if __name__ == "__main__":
    model, dataset, max_len, trust = sys.argv[1], Path(sys.argv[2]), int(sys.argv[3]), sys.argv[4:] == ["--trust"]
    try:
        stats, line_errors = token_stats(model, dataset, max_len, trust)
        print(json.dumps({"ok": True, "stats": stats.model_dump(), "line_errors": line_errors}))
    except FtsError as exc:
        print(json.dumps({"ok": False, "message": exc.message}))
    except (OSError, ValueError) as exc:
        print(json.dumps({"ok": False, "message": f"{type(exc).__name__}: {exc}"}))
