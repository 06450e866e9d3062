"""Talking to a running edge runtime (or a vLLM server with runtime LoRA updating) over HTTP, with httpx."""

from __future__ import annotations

import json
import time
import urllib.parse

import httpx

from fts_mcp.errors import FtsError, InvalidArgument

TIMEOUT = httpx.Timeout(600.0, connect=10.0)
MAX_ANSWER_CHARS = 20_000  # a runtime's answer is truncated to this before it reaches an agent
MAX_ANSWER_BYTES = 4 << 20  # more than any completion of max_tokens 8192; a runtime sending more is refused


def check_url(url: str, param: str = "runtime_url") -> str:
    parsed = urllib.parse.urlparse(url)
    if parsed.scheme not in ("http", "https") or not parsed.netloc:
        raise InvalidArgument(f"{url[:200]!r} is not an http(s) URL such as http://127.0.0.1:8001", param=param)
    return url.rstrip("/")


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
        detail = raw[:1000].decode("utf-8", "replace")
        try:
            detail = json.loads(raw)["error"]["message"]
        except (ValueError, KeyError, TypeError):
            pass
        raise InvalidArgument(f"{url} answered {response.status_code}: {str(detail)[:1000]}", param=param)
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
