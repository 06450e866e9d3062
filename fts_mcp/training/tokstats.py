"""`python -m fts_mcp.training.tokstats MODEL DATASET MAX_SEQ_LEN`: token statistics as JSON on stdout.

Loading a tokenizer imports torch, which the server process never does, so the server runs this as a
short-lived subprocess. It tokenizes exactly as the training job will (same template and loss mask).

A model folder is outside input like a dataset: its chat template could expand one line into gigabytes. An example
the template renders past a dataset line's bound (`MAX_LINE_BYTES`) is a line error, never tokenized, and the
process's memory is capped (`MAX_MEMORY_BYTES`), so a template that asks for more fails here with a line error.
"""

from __future__ import annotations

import json
import resource
import statistics
import sys
from pathlib import Path
from typing import Any

from jinja2 import TemplateError

from fts_mcp.datafiles import MAX_LINE_BYTES, TokenStats, scan
from fts_mcp.errors import FtsError
from fts_mcp.models.prompts import encode_rows, ensure_chat_template

# Rendering and tokenizing one example of MAX_LINE_BYTES takes a few hundred MB; loading a tokenizer less.
MAX_MEMORY_BYTES = 4 << 30


def limit_memory(limit: int = MAX_MEMORY_BYTES) -> None:
    """Cap this process's data (heap and private mappings: what rendering and tokenizing allocate) at `limit`, so
    an allocation past it fails (MemoryError) instead of taking the host's memory. RLIMIT_DATA rather than
    RLIMIT_AS: the libraries torch maps and the address space each thread reserves are not counted."""
    _, hard = resource.getrlimit(resource.RLIMIT_DATA)
    cap = limit if hard == resource.RLIM_INFINITY else min(limit, hard)
    resource.setrlimit(resource.RLIMIT_DATA, (cap, cap))


def _out_of_memory(model: str) -> str:
    return (f"rendering and tokenizing this example through the chat template of {model} needs more than the "
            f"{MAX_MEMORY_BYTES >> 30} GiB token statistics may use; check the model's chat template")


def _oversized(tokenizer: Any, messages: list[dict], model: str) -> str | None:
    """Why the chat template's rendering of `messages` may not be tokenized (bigger than a dataset line may be, or
    more than the memory cap), or None. Templates that cannot render it at all are encode_rows's to report."""
    try:
        text = tokenizer.apply_chat_template([{"role": m["role"], "content": m["content"]} for m in messages],
                                             tokenize=False)
    except MemoryError:
        return _out_of_memory(model)
    except (TemplateError, ValueError, TypeError, KeyError, IndexError):
        return None
    size = len(text) if len(text) > MAX_LINE_BYTES else len(text.encode("utf-8", "surrogatepass"))
    if size <= MAX_LINE_BYTES:
        return None
    return (f"the chat template of {model} renders this example to {size / 2**20:.1f} MiB, more than the "
            f"{MAX_LINE_BYTES >> 20} MiB one example may hold; fix the template (chat_template.jinja or "
            "tokenizer_config.json's chat_template) or choose another model")


def token_stats(model: str, dataset: Path, max_seq_len: int,
                trust_remote_code: bool = False) -> tuple[TokenStats, list[tuple[int, str]]]:
    """Statistics over the examples the model can render, and (line, reason) for those it cannot. Streams the
    file: memory holds one example and a length per example, whatever the file's size."""
    from fts_mcp.models.loading import load_tokenizer  # torch side: this module runs as its own process

    tokenizer = load_tokenizer(model, trust_remote_code=trust_remote_code)
    ensure_chat_template(tokenizer)
    lengths: list[int] = []
    trained = 0
    errors: list[tuple[int, str]] = []
    for line, fmt, record, problem in scan(dataset):
        if problem is not None:
            continue  # structural problems are validate_dataset's own report
        conversations = [record["messages"]] if fmt == "chat" else \
            [[*record["prompt"], *record[k]] for k in ("chosen", "rejected")] if fmt == "preference" and \
            isinstance(record["prompt"], list) else []
        if refused := next(filter(None, (_oversized(tokenizer, c, model) for c in conversations)), None):
            errors.append((line, refused))
            continue
        try:
            encoded, failed = encode_rows(tokenizer, fmt, [(line, record)])
        except MemoryError:
            errors.append((line, _out_of_memory(model)))
            continue
        errors += failed
        for example in encoded:
            if fmt == "preference":  # a pair is two sequences, prompt + each answer; the longer one is its length
                prompt = len(example["prompt_ids"])
                answers = [len(example["chosen_ids"]), len(example["rejected_ids"])]
                lengths.append(prompt + max(answers))
                trained += sum(max(0, min(n, max_seq_len - prompt)) for n in answers)
            else:
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
    limit_memory()
    model, dataset, max_len, trust = sys.argv[1], Path(sys.argv[2]), int(sys.argv[3]), sys.argv[4:] == ["--trust"]
    try:
        stats, line_errors = token_stats(model, dataset, max_len, trust)
        print(json.dumps({"ok": True, "stats": stats.model_dump(), "line_errors": line_errors}))
    except FtsError as exc:
        print(json.dumps({"ok": False, "message": exc.message}))
    except (OSError, ValueError) as exc:
        print(json.dumps({"ok": False, "message": f"{type(exc).__name__}: {exc}"}))
    except MemoryError:  # loading the tokenizer itself
        print(json.dumps({"ok": False, "message": f"loading it needs more than the {MAX_MEMORY_BYTES >> 30} GiB "
                                                  "token statistics may use"}))
