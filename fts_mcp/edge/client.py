"""Talking to a running edge runtime (or a vLLM server with runtime LoRA updating) over HTTP, with httpx."""

from __future__ import annotations

import json
import os
import time
import unicodedata
import urllib.parse
from collections.abc import Collection
from http import HTTPStatus

import httpx

from fts_mcp.config import canonical_host, runtime_hosts
from fts_mcp.errors import FtsError, InvalidArgument
from fts_mcp.network import is_loopback

TIMEOUT = httpx.Timeout(600.0, connect=10.0)
MAX_ANSWER_CHARS = 20_000  # a runtime's answer is truncated to this before it reaches an agent
MAX_ANSWER_BYTES = 4 << 20  # more than any completion of max_tokens 8192; a runtime sending more is refused
MAX_ERROR_CHARS = 200  # of a runtime's own error message passed on to the agent; nothing else of an error body is


def check_url(url: str, param: str = "runtime_url", *, allowed: Collection[str] | None = None) -> str:
    """A runtime's base URL: http(s) on this host's loopback (127.0.0.0/8, ::1, localhost), or on a host the operator
    listed in FTS_RUNTIME_HOSTS (`allowed`; read from the environment when not given). Any other URL would let the
    tools reach, and read from, whatever server this host can reach."""
    parsed = urllib.parse.urlparse(url)
    try:
        host, _port = parsed.hostname, parsed.port  # a port that is not a number raises ValueError
    except ValueError:
        host = None
    if parsed.scheme not in ("http", "https") or not host:
        raise InvalidArgument(f"{url[:200]!r} is not an http(s) URL such as http://127.0.0.1:8001", param=param)
    allowed = runtime_hosts(dict(os.environ)) if allowed is None else {c for h in allowed if (c := canonical_host(h))}
    if not is_loopback(host) and canonical_host(host) not in allowed:
        raise InvalidArgument(f"{url[:200]!r} is not on this host: runtime_url takes a runtime on loopback "
                              "(http://127.0.0.1:PORT, http://[::1]:PORT, http://localhost:PORT) or 'local'; other "
                              "hosts must be listed in the server's FTS_RUNTIME_HOSTS (comma-separated host names)",
                              param=param)
    return url.rstrip("/")


def runtime_error(raw: bytes) -> str | None:
    """The `error.message` of an OpenAI-style error answer (what the edge runtime and vLLM send), without control
    characters and cut to MAX_ERROR_CHARS; None for any other body. A peer's body is never passed on as it is."""
    try:
        said = json.loads(raw)
    except (ValueError, RecursionError):  # not JSON, not UTF-8, nested past what Python parses
        return None
    error = said.get("error") if isinstance(said, dict) else None
    message = error.get("message") if isinstance(error, dict) else None
    if not isinstance(message, str):
        return None
    clean = " ".join("".join(c if unicodedata.category(c)[0] != "C" else " " for c in message).split())
    return clean if len(clean) <= MAX_ERROR_CHARS else clean[:MAX_ERROR_CHARS - 3] + "..."


def _post(url: str, body: dict, param: str, timeout: httpx.Timeout | float = TIMEOUT) -> tuple[bytes, httpx.Headers]:
    """POST JSON; the answer is read up to MAX_ANSWER_BYTES (a runtime at an agent-given URL is untrusted)."""
    try:
        with httpx.stream("POST", url, json=body, timeout=timeout) as response:
            chunks, size = [], 0
            for chunk in response.iter_bytes():
                size += len(chunk)
                if size > MAX_ANSWER_BYTES:
                    raise FtsError(f"{url} sent more than {MAX_ANSWER_BYTES >> 20} MiB; refused", param="runtime_url")
                chunks.append(chunk)
    except httpx.HTTPError as exc:
        raise FtsError(f"cannot reach {url}: {exc}", param="runtime_url") from exc
    raw = b"".join(chunks)
    if response.status_code >= 400:
        try:
            status = f"{response.status_code} {HTTPStatus(response.status_code).phrase}"
        except ValueError:  # a code outside the standard's list: the peer's own reason phrase is not repeated
            status = str(response.status_code)
        said = runtime_error(raw)
        raise InvalidArgument(f"{url} answered {status}" + (f": {said}" if said else ""), param=param)
    return raw, response.headers


def post_load(runtime: str, name: str, path: str) -> float:
    """vLLM's load_lora_adapter; returns the load time in ms (the runtime's own figure when it reports one)."""
    started = time.perf_counter()
    _, headers = _post(f"{runtime}/v1/load_lora_adapter", {"lora_name": name, "lora_path": path}, "runtime_url")
    reported = headers.get("x-fts-load-ms")
    return float(reported) if reported else (time.perf_counter() - started) * 1000


def post_generate(runtime: str, model: str, prompt: str | None, messages: list[dict] | None, max_tokens: int,
                  temperature: float, timeout: float) -> dict:
    """One completion or chat completion: {text, finish_reason, usage}, the text truncated for an agent."""
    chat = messages is not None
    body = {"model": model, "max_tokens": max_tokens, "temperature": temperature,
            **({"messages": messages} if chat else {"prompt": prompt})}
    raw, _ = _post(f"{runtime}/v1/{'chat/completions' if chat else 'completions'}", body, "model",
                   timeout=httpx.Timeout(timeout, connect=10.0))
    try:
        answer = json.loads(raw)
        choice = answer["choices"][0]
        text = choice["message"]["content"] if chat else choice["text"]
    except (ValueError, KeyError, IndexError, TypeError) as exc:
        raise FtsError(f"{runtime} answered with something other than an OpenAI completion", param="runtime_url") \
            from exc
    if not isinstance(text, str):
        raise FtsError(f"{runtime} answered with a non-text completion", param="runtime_url")
    return {"text": text[:MAX_ANSWER_CHARS], "finish_reason": choice.get("finish_reason"),
            "usage": answer.get("usage") if isinstance(answer.get("usage"), dict) else None}
