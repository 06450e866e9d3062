"""Training data: JSONL in one of three forms, validated line by line before any job is queued.

* chat:        {"messages": [{"role": "system"|"user"|"assistant", "content": "..."}, ...]}
* completion:  {"prompt": "...", "completion": "..."}
* text:        {"text": "..."}

Loss is taken on the assistant turns (chat) or the completion (completion form) only; on everything for text.
This module is pure Python (no torch): the server validates with it, the worker reads with it.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, Field

from fts_mcp.errors import DatasetInvalid

Format = Literal["chat", "completion", "text"]
ROLES = ("system", "user", "assistant")
MAX_REPORTED_ERRORS = 50
# Guidance on size, shared with the planning docs: 100-500 good examples teach a style, 1K-10K a task.
MIN_USEFUL_EXAMPLES = 100
ROBUST_RANGE = (1_000, 10_000)
DIMINISHING_RETURNS = 50_000


class LineError(BaseModel):
    line: int = Field(description="1-based line number in the JSONL file")
    message: str


class TokenStats(BaseModel):
    """Token counts under the base model's tokenizer and chat template, as the training job will see them."""

    min: int
    mean: float
    p50: int
    p95: int
    max: int
    total_tokens: int
    trained_tokens: int = Field(description="tokens that carry loss (assistant turns / completions / text)")
    over_max_seq_len: int = Field(description="examples longer than max_seq_len, which training truncates")
    max_seq_len: int


class DatasetReport(BaseModel):
    ok: bool = Field(description="true when the file can be trained on as it is")
    path: str
    format: Format | None = Field(description="chat, completion or text; null when no line could be read")
    examples: int
    errors: list[LineError] = Field(default_factory=list)
    error_count: int = 0
    warnings: list[str] = Field(default_factory=list)
    token_stats: TokenStats | None = None


def _check_chat(record: dict) -> str | None:
    messages = record["messages"]
    if not isinstance(messages, list) or not messages:
        return "'messages' must be a non-empty list of {role, content} objects"
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            return f"messages[{i}] must be an object with 'role' and 'content', got {type(message).__name__}"
        role, content = message.get("role"), message.get("content")
        if role not in ROLES:
            return f"messages[{i}].role is {role!r}; expected one of {', '.join(ROLES)}"
        if not isinstance(content, str):
            return f"messages[{i}].content must be a string, got {type(content).__name__}"
        if not content.strip():
            return f"messages[{i}].content is empty"
    if not any(m["role"] == "assistant" for m in messages):
        return "no assistant message: there is nothing to learn from this conversation"
    if messages[-1]["role"] != "assistant":
        return "the last message must be from the assistant (trailing user turns carry no loss)"
    return None


def _check_completion(record: dict) -> str | None:
    prompt, completion = record.get("prompt"), record.get("completion")
    if not isinstance(prompt, str):
        return f"'prompt' must be a string, got {type(prompt).__name__}"
    if not isinstance(completion, str):
        return f"'completion' must be a string, got {type(completion).__name__}"
    if not completion.strip():
        return "'completion' is empty"
    return None


def _check_text(record: dict) -> str | None:
    text = record["text"]
    if not isinstance(text, str):
        return f"'text' must be a string, got {type(text).__name__}"
    if not text.strip():
        return "'text' is empty"
    return None


CHECKS = {"chat": _check_chat, "completion": _check_completion, "text": _check_text}


def record_format(record: dict) -> Format | None:
    if "messages" in record:
        return "chat"
    if "prompt" in record or "completion" in record:
        return "completion"
    if "text" in record:
        return "text"
    return None


def read_dataset(path: Path) -> tuple[Format | None, list[dict], list[LineError], int]:
    """Parse and check every line. Returns (format, records, first errors, error count)."""
    fmt: Format | None = None
    records: list[dict] = []
    errors: list[LineError] = []
    error_count = 0

    def fail(line: int, message: str) -> None:
        nonlocal error_count
        error_count += 1
        if len(errors) < MAX_REPORTED_ERRORS:
            errors.append(LineError(line=line, message=message))

    with path.open("rb") as fh:
        for number, raw in enumerate(fh, start=1):
            try:
                text = raw.decode("utf-8").rstrip("\r\n")  # the line's own characters: columns count within it
            except UnicodeDecodeError as exc:
                fail(number, f"not valid UTF-8 ({exc.reason} at byte {exc.start})")
                continue
            if not text.strip():
                continue
            try:
                record = json.loads(text)
            except json.JSONDecodeError as exc:
                fail(number, f"invalid JSON: {exc.msg} (column {exc.colno})")
                continue
            if not isinstance(record, dict):
                fail(number, f"expected a JSON object, got {type(record).__name__}")
                continue
            this = record_format(record)
            if this is None:
                fail(number, "expected a 'messages', 'prompt'+'completion' or 'text' field; found "
                             f"{', '.join(sorted(record)) or 'no fields'}")
                continue
            if fmt is None:
                fmt = this
            elif this != fmt:
                fail(number, f"this line is in {this} form but the file started in {fmt} form; use one form per file")
                continue
            if (problem := CHECKS[this](record)) is not None:
                fail(number, problem)
                continue
            records.append(record)
    return fmt, records, errors, error_count


def _size_warnings(count: int, records: list[dict]) -> list[str]:
    warnings = []
    if count < MIN_USEFUL_EXAMPLES:
        warnings.append(f"only {count} examples: 100-500 high-quality examples is the minimum to teach a style or "
                        f"format, {ROBUST_RANGE[0]:,}-{ROBUST_RANGE[1]:,} for robust task learning")
    elif count < ROBUST_RANGE[0]:
        warnings.append(f"{count} examples is enough for style or format; robust task learning usually takes "
                        f"{ROBUST_RANGE[0]:,}-{ROBUST_RANGE[1]:,}")
    elif count > DIMINISHING_RETURNS:
        warnings.append(f"{count:,} examples: returns diminish past ~{DIMINISHING_RETURNS:,}; "
                        "a cleaner subset often trains as well in less time")
    duplicates = sum(n - 1 for n in Counter(json.dumps(r, sort_keys=True) for r in records).values() if n > 1)
    if duplicates:
        warnings.append(f"{duplicates} duplicate examples: they weigh their content more and invite memorisation")
    return warnings


def validate_dataset(path: Path) -> DatasetReport:
    """Check a JSONL dataset. Never raises for bad content: problems are listed with line numbers."""
    if not path.is_file():
        return DatasetReport(ok=False, path=str(path), format=None, examples=0,
                             errors=[LineError(line=0, message="not a file")], error_count=1)
    fmt, records, errors, error_count = read_dataset(path)
    if not records and not errors:
        errors, error_count = [LineError(line=0, message="the file has no examples")], 1
    warnings = _size_warnings(len(records), records) if records else []
    return DatasetReport(ok=error_count == 0, path=str(path), format=fmt, examples=len(records),
                         errors=errors, error_count=error_count, warnings=warnings)


def require_valid(path: Path) -> DatasetReport:
    """Validate and raise `DatasetInvalid` (with every reported line) when the dataset cannot be trained on."""
    report = validate_dataset(path)
    if not report.ok:
        shown = "; ".join(f"line {e.line}: {e.message}" for e in report.errors[:10])
        more = f" (and {report.error_count - 10} more)" if report.error_count > 10 else ""
        raise DatasetInvalid(f"{path} has {report.error_count} invalid line(s): {shown}{more}",
                             [(e.line, e.message) for e in report.errors])
    return report
