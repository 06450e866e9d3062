"""Training data: JSONL in one of four forms, validated line by line before any job is queued.

* chat:        {"messages": [{"role": "system"|"user"|"assistant", "content": "..."}, ...]}
* completion:  {"prompt": "...", "completion": "..."}
* text:        {"text": "..."}
* preference:  {"prompt": "...", "chosen": "...", "rejected": "..."} (preference tuning, method "dpo"); or in
               conversational form, as TRL takes it: "prompt" a message list ending with a user turn, "chosen" and
               "rejected" each a list of one assistant message. One of the two forms per file.

Loss is taken on the assistant turns (chat) or the completion (completion form) only; on everything for text; on
both answers of a preference pair.
This module is pure Python (no torch): the server validates with it, the worker reads with it.

Files are read a line at a time with bounded memory whatever they hold: a line longer than `MAX_LINE_BYTES` or
a file larger than `MAX_FILE_BYTES` is an error with its line number, never a gigabyte string in memory.
Validation keeps no records, only counts and a digest per example (for duplicates).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Literal, NamedTuple

from pydantic import BaseModel, Field

from fts_mcp.errors import DatasetInvalid

Format = Literal["chat", "completion", "text", "preference"]
ROLES = ("system", "user", "assistant")
MAX_REPORTED_ERRORS = 50
# Guidance on size, shared with the planning docs: 100-500 good examples teach a style, 1K-10K a task.
MIN_USEFUL_EXAMPLES = 100
ROBUST_RANGE = (1_000, 10_000)
DIMINISHING_RETURNS = 50_000
MAX_LINE_BYTES = 8 << 20  # one example; long-context chats are a few hundred KB
MAX_FILE_BYTES = 8 << 30
MAX_DUPLICATE_CHECK = 2_000_000  # examples whose digests are kept to find duplicates


class LineError(BaseModel):
    line: int = Field(description="1-based line number in the JSONL file")
    message: str


class TokenStats(BaseModel):
    """Token counts under the base model's tokenizer and chat template, as the training job will see them. A
    preference pair's length is its prompt with the longer answer."""

    min: int
    mean: float
    p50: int
    p95: int
    max: int
    total_tokens: int
    trained_tokens: int = Field(description="tokens that carry loss (assistant turns / completions / text / both "
                                            "answers of a preference pair)")
    over_max_seq_len: int = Field(description="examples longer than max_seq_len, which training truncates")
    max_seq_len: int


class DatasetReport(BaseModel):
    ok: bool = Field(description="true when the file can be trained on as it is")
    path: str
    format: Format | None = Field(description="chat, completion, text or preference; null when no line could be "
                                              "read")
    examples: int
    errors: list[LineError] = Field(default_factory=list)
    error_count: int = 0
    warnings: list[str] = Field(default_factory=list)
    token_stats: TokenStats | None = None


def _check_chat(record: dict) -> str | None:
    messages = record["messages"]
    if (problem := _check_messages(messages, "messages")) is not None:
        return problem
    if not any(m["role"] == "assistant" for m in messages):
        return "no assistant message: there is nothing to learn from this conversation"
    if messages[-1]["role"] != "assistant":
        return "the last message must be from the assistant (trailing user turns carry no loss)"
    start = 1 if messages[0]["role"] == "system" else 0
    for i in range(start, len(messages)):
        role, expected = messages[i]["role"], "user" if (i - start) % 2 == 0 else "assistant"
        if role != expected:
            why = ("a system message may only come first" if role == "system" else
                   "a conversation starts with the user (after an optional system message)" if i == start else
                   "user and assistant turns must alternate")
            return f"messages[{i}].role is {role!r} where {expected!r} was expected: {why}"
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


def _check_messages(messages: object, name: str) -> str | None:
    """A list of {role, content} objects with known roles and non-empty text."""
    if not isinstance(messages, list) or not messages:
        return f"'{name}' must be a non-empty list of {{role, content}} objects"
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            return f"{name}[{i}] must be an object with 'role' and 'content', got {type(message).__name__}"
        role, content = message.get("role"), message.get("content")
        if role not in ROLES:
            return f"{name}[{i}].role is {role!r}; expected one of {', '.join(ROLES)}"
        if not isinstance(content, str):
            return f"{name}[{i}].content must be a string, got {type(content).__name__}"
        if not content.strip():
            return f"{name}[{i}].content is empty"
    return None


def _check_preference(record: dict) -> str | None:
    """One prompt, two different answers to it: plain strings, or messages (the conversational form)."""
    missing = [k for k in ("prompt", "chosen", "rejected") if k not in record]
    if missing:
        return f"a preference pair needs 'prompt', 'chosen' and 'rejected'; missing {', '.join(map(repr, missing))}"
    prompt, chosen, rejected = record["prompt"], record["chosen"], record["rejected"]
    if isinstance(prompt, str):
        for name, answer in (("chosen", chosen), ("rejected", rejected)):
            if not isinstance(answer, str):
                return f"'{name}' must be a string like 'prompt' (or all three message lists), got " \
                       f"{type(answer).__name__}"
            if not answer.strip():
                return f"'{name}' is empty"
        if chosen.strip() == rejected.strip():
            return "'chosen' and 'rejected' are the same answer: there is no preference to learn"
        return None
    if not isinstance(prompt, list):
        return f"'prompt' must be a string or a list of messages, got {type(prompt).__name__}"
    if (problem := _check_messages(prompt, "prompt")) is not None:
        return problem
    if prompt[-1]["role"] != "user":
        return "'prompt' must end with a user message: the answers follow it"
    if (problem := _check_chat({"messages": [*prompt, {"role": "assistant", "content": "-"}]})) is not None:
        return problem.replace("messages[", "prompt[")  # the turn order, as for a chat line
    for name, answer in (("chosen", chosen), ("rejected", rejected)):
        if not isinstance(answer, list):
            return f"'{name}' must be a list with one assistant message like 'prompt' is a message list, got " \
                   f"{type(answer).__name__}"
        if (problem := _check_messages(answer, name)) is not None:
            return problem
        if len(answer) != 1 or answer[0]["role"] != "assistant":
            return f"'{name}' must hold exactly one message, from the assistant"
    if chosen[0]["content"].strip() == rejected[0]["content"].strip():
        return "'chosen' and 'rejected' are the same answer: there is no preference to learn"
    return None


def conversational(record: dict) -> bool:
    """A preference pair in the conversational form (messages rather than plain text)."""
    return isinstance(record.get("prompt"), list)


CHECKS = {"chat": _check_chat, "completion": _check_completion, "text": _check_text, "preference": _check_preference}


def _lone_surrogate(value: object, where: str = "") -> str | None:
    """The first string in `value` holding a lone UTF-16 surrogate (valid JSON escapes, invalid text)."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as exc:
            return f"{where or 'a string'} holds a lone surrogate (U+{ord(value[exc.start]):04X}) at character " \
                   f"{exc.start}; it is not text any tokenizer can read"
        return None
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    for key, item in items:
        found = _lone_surrogate(item, f"{where}[{key!r}]" if where else str(key) if isinstance(key, str)
                                else f"[{key}]")
        if found:
            return found
    return None


def record_format(record: dict) -> Format | None:
    if "messages" in record:
        return "chat"
    if "chosen" in record or "rejected" in record:
        return "preference"
    if "prompt" in record or "completion" in record:
        return "completion"
    if "text" in record:
        return "text"
    return None


class Dataset(NamedTuple):
    format: Format | None
    rows: list[tuple[int, dict]]  # (1-based line number, record) of every valid line
    errors: list[LineError]  # the first MAX_REPORTED_ERRORS
    error_count: int


def _lines(path: Path) -> Iterator[tuple[int, bytes | None]]:
    """(line number, raw bytes) for each line; None for a line over MAX_LINE_BYTES (skipped, never held)."""
    with path.open("rb") as fh:
        number = 0
        while True:
            raw = fh.readline(MAX_LINE_BYTES + 1)
            if not raw:
                return
            number += 1
            if len(raw) > MAX_LINE_BYTES and not raw.endswith(b"\n"):
                while (rest := fh.readline(1 << 20)) and not rest.endswith(b"\n"):
                    pass
                yield number, None
            else:
                yield number, raw


def scan(path: Path) -> Iterator[tuple[int, str | None, dict | None, str | None]]:
    """Each non-blank line checked: (line, format, record, None) or (line, None, None, problem)."""
    fmt: Format | None = None
    pairs_as_messages: bool | None = None  # preference files: the form of the first pair
    for number, raw in _lines(path):
        if raw is None:
            yield number, None, None, f"longer than {MAX_LINE_BYTES >> 20} MiB; split the example or shorten it"
            continue
        try:
            text = raw.decode("utf-8").rstrip("\r\n")  # the line's own characters: columns count within it
        except UnicodeDecodeError as exc:
            yield number, None, None, f"not valid UTF-8 ({exc.reason} at byte {exc.start})"
            continue
        if not text.strip():
            continue
        try:
            record = json.loads(text)
        except json.JSONDecodeError as exc:
            yield number, None, None, f"invalid JSON: {exc.msg} (column {exc.colno})"
            continue
        except RecursionError:
            yield number, None, None, "invalid JSON: nested deeper than the parser allows"
            continue
        except ValueError as exc:  # e.g. an integer longer than Python converts (4,300 digits)
            yield number, None, None, f"invalid JSON: {str(exc).split(';')[0]}"
            continue
        if not isinstance(record, dict):
            yield number, None, None, f"expected a JSON object, got {type(record).__name__}"
            continue
        this = record_format(record)
        if this is None:
            names = ", ".join(repr(k[:40]) for k in sorted(record)[:10]) or "no fields"
            yield number, None, None, f"expected a 'messages', 'prompt'+'completion' or 'text' field (or 'prompt'+" \
                                      f"'chosen'+'rejected' for a preference pair); found {names}"
            continue
        if fmt is None:
            fmt = this
        elif this != fmt:
            yield number, None, None, f"this line is in {this} form but the file started in {fmt} form; use one " \
                                      "form per file"
            continue
        problem = CHECKS[this](record) or _lone_surrogate(record)
        if problem is not None:
            yield number, None, None, problem
            continue
        if this == "preference":
            if pairs_as_messages is None:
                pairs_as_messages = conversational(record)
            elif conversational(record) != pairs_as_messages:
                forms = ("conversational (message lists)", "plain text")
                yield number, None, None, f"this pair is in {forms[not conversational(record)]} form but the file " \
                                          f"started in {forms[not pairs_as_messages]} form; use one form per file"
                continue
        yield number, this, record, None


def _too_big(path: Path) -> LineError | None:
    size = path.stat().st_size
    if size > MAX_FILE_BYTES:
        return LineError(line=0, message=f"the file is {size / 2**30:.1f} GiB, over the {MAX_FILE_BYTES >> 30} GiB "
                                         "a dataset may be; sample it down (returns diminish past ~50K examples)")
    return None


def read_dataset(path: Path) -> Dataset:
    """Parse and check every line, keeping the valid records with their line numbers (for training)."""
    if (error := _too_big(path)) is not None:
        return Dataset(None, [], [error], 1)
    fmt, rows, errors, count = None, [], [], 0
    for number, this, record, problem in scan(path):
        if problem is not None:
            count += 1
            if len(errors) < MAX_REPORTED_ERRORS:
                errors.append(LineError(line=number, message=problem))
        else:
            fmt = fmt or this
            rows.append((number, record))
    return Dataset(fmt, rows, errors, count)


def _size_warnings(count: int, duplicates: int) -> list[str]:
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
    if duplicates:
        warnings.append(f"{duplicates} duplicate examples: they weigh their content more and invite memorisation")
    return warnings


def validate_dataset(path: Path) -> DatasetReport:
    """Check a JSONL dataset. Never raises for bad content: problems are listed with line numbers."""
    if not path.is_file():
        return DatasetReport(ok=False, path=str(path), format=None, examples=0,
                             errors=[LineError(line=0, message="not a file")], error_count=1)
    if (error := _too_big(path)) is not None:
        return DatasetReport(ok=False, path=str(path), format=None, examples=0, errors=[error], error_count=1)
    fmt, examples, errors, error_count, duplicates = None, 0, [], 0, 0
    seen: set[bytes] = set()
    for number, this, record, problem in scan(path):
        if problem is not None:
            error_count += 1
            if len(errors) < MAX_REPORTED_ERRORS:
                errors.append(LineError(line=number, message=problem))
            continue
        fmt, examples = fmt or this, examples + 1
        if len(seen) < MAX_DUPLICATE_CHECK:
            digest = hashlib.blake2b(json.dumps(record, sort_keys=True).encode(), digest_size=16).digest()
            duplicates += digest in seen
            seen.add(digest)
    if not examples and not errors:
        errors, error_count = [LineError(line=0, message="the file has no examples")], 1
    warnings = _size_warnings(examples, duplicates) if examples else []
    return DatasetReport(ok=error_count == 0, path=str(path), format=fmt, examples=examples,
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
