"""`fts-mcp edge serve`: the engine behind an OpenAI-compatible HTTP API, with vLLM's LoRA admin calls.

    GET  /health                     GET /metrics (Prometheus text)
    GET  /v1/models                  POST /v1/completions         POST /v1/chat/completions
    POST /v1/load_lora_adapter {lora_name, lora_path}            POST /v1/unload_lora_adapter {lora_name}

`model` in a request is an adapter (`name`, `name@v3`, `name:prod`, or a name given to load_lora_adapter), a
stack of adapters (`a+b`, `0.7*a+0.3*b`) or the base model itself. An unknown model gets a 404 listing what is
available; a corrupt adapter a 502 — and the runtime goes on serving the others.

The request surface is what OpenAI's client libraries send: `prompt` as a string or a list, `messages`, `n`,
`stop`, `max_tokens` / `max_completion_tokens`, `temperature`, `top_p`, `seed`, `stream` (server-sent events,
`data: [DONE]` last) with `stream_options.include_usage`, and `usage` in every answer. A field this runtime does
not implement gets a 400 that names it, never silent ignoring.

Every request is bounded: a body over `MAX_BODY_BYTES` gets 413; prompt + completion must fit the model's
context (400 naming the argument); at most `max_queue` sequences (prompts x n) wait or run at once (429 with
Retry-After beyond); each has a deadline (504 past it); and generation stops when the client disconnects.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any, Literal

import anyio
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.routing import Route

from fts_mcp.edge.engine import DeadlineExceeded, Engine, Ticket
from fts_mcp.edge.store import CorruptAdapter, UnknownAdapter
from fts_mcp.edge.tenants import Key, Tenants, adapter_names
from fts_mcp.errors import FtsError, InvalidArgument

DEFAULT_MAX_TOKENS = 64


class Message(BaseModel):
    model_config = ConfigDict(extra="forbid")

    role: Literal["system", "user", "assistant", "developer"]
    content: str
    name: str | None = None


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    include_usage: bool = False


class Generation(BaseModel):
    """What both endpoints take. Fields OpenAI defines but this runtime does not implement are refused by name
    (`UNSUPPORTED`), unless sent at their neutral value."""

    model_config = ConfigDict(extra="forbid")

    model: str = Field(min_length=1, max_length=1000)
    max_tokens: int | None = Field(None, ge=1, le=8192)
    temperature: float = Field(0.0, ge=0, le=2)  # greedy unless asked: an adapter's answers are reproducible
    top_p: float = Field(1.0, gt=0, le=1)
    n: int = Field(1, ge=1, le=16)
    stop: str | list[str] | None = Field(None, validate_default=True)
    seed: int | None = Field(None, ge=-(2**63), lt=2**64)
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = Field(None, max_length=256)

    @field_validator("stop")
    @classmethod
    def _stops(cls, value: str | list[str] | None) -> list[str]:
        stops = [value] if isinstance(value, str) else list(value or [])
        if len(stops) > 4 or any(not s or len(s) > 256 for s in stops):
            raise ValueError("stop takes up to 4 non-empty strings of at most 256 characters")
        return stops


class CompletionRequest(Generation):
    prompt: str | list[str] = Field(min_length=1)
    max_tokens: int = Field(DEFAULT_MAX_TOKENS, ge=1, le=8192)

    @field_validator("prompt")
    @classmethod
    def _prompts(cls, value: str | list[str]) -> list[str]:
        prompts = [value] if isinstance(value, str) else value
        if len(prompts) > 64:
            raise ValueError("at most 64 prompts per request")
        return prompts


class ChatRequest(Generation):
    messages: list[Message] = Field(min_length=1, max_length=1000)
    max_completion_tokens: int | None = Field(None, ge=1, le=8192)

    @property
    def limit(self) -> int:
        return self.max_completion_tokens or self.max_tokens or DEFAULT_MAX_TOKENS


class LoadRequest(BaseModel):
    lora_name: str = Field(min_length=1, max_length=200)
    lora_path: str | None = None


MAX_BODY_BYTES = 4 << 20
DISCONNECT_POLL_SECONDS = 0.1
# OpenAI request fields this runtime does not implement, and the value at which sending them changes nothing.
UNSUPPORTED = {"logprobs": (None, False), "top_logprobs": (None, 0), "echo": (None, False), "best_of": (None, 1),
               "suffix": (None, ""), "logit_bias": (None, {}), "presence_penalty": (None, 0), "frequency_penalty":
               (None, 0), "tools": (None, []), "tool_choice": (None, "none"), "functions": (None, []),
               "function_call": (None, "none"), "response_format": (None, {"type": "text"}),
               "parallel_tool_calls": (None,), "service_tier": (None, "auto", "default"), "store": (None, False),
               "metadata": (None, {}), "modalities": (None, ["text"]), "audio": (None,), "prediction": (None,),
               "reasoning_effort": (None,), "web_search_options": (None,)}


def error(status: int, message: str, *, param: str | None = None, kind: str = "invalid_request_error",
          headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": kind, "param": param, "code": status}}, status,
                        headers=headers)


class Stream(StreamingResponse):
    """A streamed answer that gives its queue places back however it ends, even if the body never began (the
    client left before the first byte)."""

    def __init__(self, content: AsyncIterator[bytes], release, **kwargs: Any) -> None:
        super().__init__(content, **kwargs)
        self.release = release

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.release()


class Admission:
    """At most `limit` sequences (a request's prompts x n) waiting for or using the device; a request that would
    pass it is turned away (429), one that never could is refused (400)."""

    def __init__(self, limit: int) -> None:
        self.limit, self.inside, self._lock = limit, 0, threading.Lock()

    def enter(self, count: int) -> bool:
        with self._lock:
            if self.inside + count > self.limit:
                return False
            self.inside += count
            return True

    def leave(self, count: int) -> None:
        with self._lock:
            self.inside -= count


class Choices:
    """The tickets of one request (prompts x n) and what each has sent so far, for answers and stream chunks."""

    def __init__(self, tickets: list[Ticket], engine: Engine, stops: list[str], n: int) -> None:
        self.tickets, self.engine, self.n = tickets, engine, n  # prompts x n tickets, prompt-major
        self.hold = max((len(s) for s in stops), default=1) - 1  # characters that might start a stop sequence
        self.sent = [""] * len(tickets)  # text sent so far
        self.seen = [0] * len(tickets)  # tokens turned into text so far
        self.text = [""] * len(tickets)  # their text, decoded incrementally (as transformers' streamers do)
        self.offsets = [(0, 0)] * len(tickets)  # (prefix, read) token offsets of that decoding
        self.closed = [False] * len(tickets)
        self.event: asyncio.Event | None = None  # set by the scheduler whenever a ticket changes

    def cancel(self) -> None:
        for ticket in self.tickets:
            ticket.cancel.set()

    @property
    def done(self) -> bool:
        return all(t.done for t in self.tickets)

    def deltas(self) -> list[tuple[int, str, str | None]]:
        """(index, new text, finish reason when it just finished): a delta per new token of each choice (as
        OpenAI streams), then its last piece of text with the finish reason."""
        out = []
        for i, ticket in enumerate(self.tickets):
            if self.closed[i]:
                continue
            tokens, finish, final, failure = ticket.snapshot()
            if failure is not None or finish == "deadline":
                continue
            for count in range(self.seen[i] + 1, len(tokens) + 1):
                text = self._decoded(i, tokens[:count])
                text = text[: len(text) - self.hold] if self.hold and finish is None else text
                if finish is not None and not final.startswith(text):
                    break  # past a stop sequence: the final text below ends before it
                if text.startswith(self.sent[i]) and len(text) > len(self.sent[i]):
                    out.append((i, text[len(self.sent[i]):], None))
                    self.sent[i] = text
            self.seen[i] = len(tokens)
            if finish is None:
                continue
            delta = final[len(self.sent[i]):] if final.startswith(self.sent[i]) else ""
            self.sent[i] += delta
            self.closed[i] = True
            out.append((i, delta, finish))
        return out

    def _decoded(self, i: int, tokens: list[int]) -> str:
        """The text of `tokens`, extending the last decoding by the new token's piece; a piece that ends in half a
        character waits for the next token. O(window), not O(length), per token."""
        prefix, read = self.offsets[i]
        before = self.engine.text_of(tokens[prefix:read])
        after = self.engine.text_of(tokens[prefix:])
        if len(after) > len(before) and not after.endswith("\ufffd"):
            self.text[i] += after[len(before):]
            self.offsets[i] = (read, len(tokens))
        return self.text[i]

    def failure(self) -> FtsError | None:
        for ticket in self.tickets:
            _, finish, _, failure = ticket.snapshot()
            if failure is not None:
                return failure
            if finish == "deadline":
                return DeadlineExceeded("generation ran past the request's deadline; ask for fewer max_tokens, or "
                                        "raise --request-timeout", param="max_tokens")
        return None

    def usage(self) -> dict[str, int]:
        prompt = sum(t.prompt_tokens for t in self.tickets[:: self.n])  # each prompt once, whatever n
        completion = sum(len(t.snapshot()[0]) for t in self.tickets)
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def failure_response(exc: FtsError, available, tenant: bool = False) -> JSONResponse:
    """`available`: what the caller may use (a tenant's own adapters only; the store's own message, which names
    every adapter, is not passed on to tenants)."""
    if isinstance(exc, DeadlineExceeded):
        return error(504, exc.message, param=exc.param, kind=exc.code)
    if isinstance(exc, CorruptAdapter):
        return error(502, exc.message, param="model", kind="corrupt_adapter")
    if isinstance(exc, UnknownAdapter):
        message = "no such model" if tenant else exc.message
        return error(404, f"{message}. Available models: {', '.join(available())}", param="model",
                     kind="model_not_found")
    if isinstance(exc, InvalidArgument):
        return error(400, exc.message, param=exc.param)
    return error(502, exc.message, param=exc.param, kind=exc.code)


def build_app(engine: Engine, *, max_queue: int = 64, request_timeout: float = 300.0,
              tenants: Tenants | None = None) -> Starlette:
    """The runtime's routes. With `tenants`, every call but /health needs a known key, each key reaches only its
    adapters, and the admin calls (and /metrics) need an admin key."""
    admission = Admission(max_queue)
    base_names = {engine.base_name, Path(engine.base_name).name, "base"}

    def caller(request: Request, *, admin: bool = False) -> Key | JSONResponse | None:
        if tenants is None:
            return None
        key = tenants.holder(request.headers.get("authorization"))
        if key is None:
            return error(401, "send Authorization: Bearer <your API key>", kind="authentication_error")
        if admin and not key.admin:
            return error(403, "this call needs an admin key", kind="permission_denied")
        return key

    def permits(key: Key | None, model: str) -> bool:
        if key is None:
            return True
        if model in base_names:
            return key.may_use("base") or key.may_use(engine.base_name)
        return all(key.may_use(name) for name in adapter_names(model))

    def available() -> list[str]:
        names = [engine.base_name]
        try:
            catalogue = engine.source.catalogue()
        except FtsError:  # an unreachable or corrupt store index: the base and loaded adapters are still served
            catalogue = {}
        for name, entry in catalogue.items():
            names += [name] + [f"{name}@{v}" for v in entry["versions"]] + [f"{name}:{a}" for a in entry["aliases"]]
        return names + list(engine.named)

    async def read_json(request: Request) -> Any:
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > MAX_BODY_BYTES:
            return error(413, f"the body is over {MAX_BODY_BYTES >> 20} MiB", kind="request_too_large")
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > MAX_BODY_BYTES:
                return error(413, f"the body is over {MAX_BODY_BYTES >> 20} MiB", kind="request_too_large")
            chunks.append(chunk)
        try:
            return json.loads(b"".join(chunks))
        except (ValueError, RecursionError):
            return error(400, "the body must be JSON")

    async def parse(request: Request, model: type[BaseModel]) -> BaseModel | JSONResponse:
        raw = await read_json(request)
        if isinstance(raw, JSONResponse):
            return raw
        if not isinstance(raw, dict):
            return error(400, "the body must be a JSON object")
        if issubclass(model, Generation):
            refused = sorted(k for k, v in raw.items() if k in UNSUPPORTED and v not in UNSUPPORTED[k])
            if refused:
                return error(400, f"{', '.join(refused)}: not supported by this runtime; it takes "
                                  f"{', '.join(sorted(model.model_fields))}", param=refused[0])
            raw = {k: v for k, v in raw.items() if k not in UNSUPPORTED}  # sent at a value that changes nothing
        try:
            return model.model_validate(raw)
        except ValidationError as exc:
            first = exc.errors()[0]
            where = ".".join(str(p) for p in first["loc"]) or None
            message = first["msg"] if first["type"] != "extra_forbidden" else \
                f"not a field this runtime takes; it takes {', '.join(sorted(model.model_fields))}"
            return error(400, f"{where}: {message}" if where else message, param=where)

    def start(body: Generation, chat: bool) -> Choices:
        """Resolve, encode and queue every choice (raising what the client must hear before anything runs)."""
        target = engine.resolve(body.model)
        limit = body.limit if chat else body.max_tokens
        if chat:
            prompts = [engine.prompt_ids(None, [m.model_dump(exclude_none=True) for m in body.messages], limit)]
        else:
            prompts = [engine.prompt_ids(p, None, limit) for p in body.prompt]
        deadline = time.monotonic() + request_timeout
        tickets = [engine.submit(body.model, ids, max_tokens=limit, temperature=body.temperature, top_p=body.top_p,
                                 stop=body.stop, seed=None if body.seed is None else (body.seed + j) % 2**63,
                                 deadline=deadline,
                                 target=target)
                   for ids in prompts for j in range(body.n)]
        return Choices(tickets, engine, body.stop, body.n)

    async def changed(choices: Choices) -> None:
        """Until a choice changes, or a poll interval passes."""
        if choices.event is None:  # one listener per ticket for the request's whole life
            choices.event = asyncio.Event()
            for ticket in choices.tickets:
                ticket.listen(asyncio.get_running_loop(), choices.event)
        try:
            await asyncio.wait_for(choices.event.wait(), DISCONNECT_POLL_SECONDS)
        except TimeoutError:
            pass
        choices.event.clear()

    async def wait(choices: Choices, request: Request) -> None:
        """Until every choice is done; a client that disconnects cancels them."""
        while not choices.done:
            if await request.is_disconnected():
                choices.cancel()
                return
            await changed(choices)

    def answer(body: Generation, chat: bool, choices: Choices, ident: str, created: int) -> JSONResponse:
        items = []
        for i, ticket in enumerate(choices.tickets):
            _, finish, text, _ = ticket.snapshot()
            item: dict[str, Any] = {"index": i, "finish_reason": finish, "logprobs": None}
            if chat:
                item["message"] = {"role": "assistant", "content": text}
            else:
                item["text"] = text
            items.append(item)
        return JSONResponse({
            "id": ident, "object": "chat.completion" if chat else "text_completion", "created": created,
            "model": body.model, "choices": items, "usage": choices.usage(),
            "fts": {"adapter": choices.tickets[0].key}})

    async def stream(body: Generation, chat: bool, choices: Choices, ident: str, created: int, mine,
                     tenant: bool, release) -> AsyncIterator[bytes]:
        kind = "chat.completion.chunk" if chat else "text_completion"
        include_usage = bool(body.stream_options and body.stream_options.include_usage)

        def chunk(items: list[dict], **extra: Any) -> bytes:
            payload = {"id": ident, "object": kind, "created": created, "model": body.model, "choices": items,
                       **({"usage": None} if include_usage else {}), **extra}
            return f"data: {json.dumps(payload)}\n\n".encode()

        try:
            if chat:
                yield chunk([{"index": i, "delta": {"role": "assistant", "content": ""}, "finish_reason": None,
                              "logprobs": None} for i in range(len(choices.tickets))])
            while True:
                for i, delta, finish in choices.deltas():
                    item = {"index": i, "finish_reason": finish, "logprobs": None}
                    item.update({"delta": {"content": delta} if delta else {}} if chat else {"text": delta})
                    yield chunk([item])
                failure = choices.failure()
                if failure is not None:  # as OpenAI streams an error: one event with the error object
                    problem = json.loads(failure_response(failure, mine, tenant).body)
                    yield f"data: {json.dumps(problem)}\n\n".encode()
                    break
                if choices.done and all(choices.closed):
                    if include_usage:
                        yield chunk([], usage=choices.usage())
                    break
                await changed(choices)
            yield b"data: [DONE]\n\n"
        finally:
            release()  # the client went away, or the stream ended: nothing left runs for it

    async def run(body: Generation, chat: bool, request: Request, key: Key | None) -> Response:
        def mine() -> list[str]:
            return [m for m in available() if permits(key, m)]

        count = (1 if chat else len(body.prompt)) * body.n
        if count > max_queue:
            return error(400, f"this request asks for {count} sequences (prompts x n); this runtime takes at most "
                              f"{max_queue} at once", param="n")
        if not admission.enter(count):
            return error(429, f"{max_queue} sequences are already waiting or running; retry shortly",
                         kind="rate_limit_exceeded", headers={"Retry-After": "1"})
        streaming = False
        try:
            try:  # resolving may read an HTTP store and hash files: off the event loop
                choices = await anyio.to_thread.run_sync(start, body, chat)
            except FtsError as exc:
                return failure_response(exc, mine, tenant=key is not None)
            ident, created = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:24]}", int(time.time())
            if body.stream:
                streaming = True
                released = []

                def release() -> None:  # once, whether the stream ended, failed, or never started
                    if not released:
                        released.append(True)
                        choices.cancel()
                        admission.leave(count)

                return Stream(stream(body, chat, choices, ident, created, mine, key is not None, release), release,
                              media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
            try:
                await wait(choices, request)
            finally:
                choices.cancel()
            failure = choices.failure()
            if failure is not None:
                return failure_response(failure, mine, tenant=key is not None)
            return answer(body, chat, choices, ident, created)
        finally:
            if not streaming:
                admission.leave(count)

    async def generation(request: Request, chat: bool) -> Response:
        key = caller(request)
        if isinstance(key, JSONResponse):
            return key
        body = await parse(request, ChatRequest if chat else CompletionRequest)
        if isinstance(body, JSONResponse):
            return body
        if not permits(key, body.model):
            return error(403, f"this key may not use {body.model!r}; GET /v1/models lists what it may use",
                         param="model", kind="permission_denied")
        return await run(body, chat=chat, request=request, key=key)

    async def completions(request: Request) -> Response:
        return await generation(request, chat=False)

    async def chat(request: Request) -> Response:
        return await generation(request, chat=True)

    async def models(request: Request) -> Response:
        key = caller(request)
        if isinstance(key, JSONResponse):
            return key
        return JSONResponse({"object": "list", "data": [{"id": m, "object": "model", "owned_by": "fts-mcp"}
                                                        for m in available() if permits(key, m)]})

    async def load(request: Request) -> Response:
        if isinstance(refused := caller(request, admin=True), JSONResponse):
            return refused
        body = await parse(request, LoadRequest)
        if isinstance(body, JSONResponse):
            return body
        if not body.lora_path:
            return error(400, "lora_path is required: an adapter folder or a store reference", param="lora_path")
        try:
            ms = await anyio.to_thread.run_sync(engine.load_named, body.lora_name, body.lora_path)
        except CorruptAdapter as exc:
            return error(502, exc.message, param="lora_path", kind="corrupt_adapter")
        except FtsError as exc:
            return error(400, exc.message, param="lora_path")
        return PlainTextResponse(f"Success: LoRA adapter '{body.lora_name}' added successfully.",
                                 headers={"x-fts-load-ms": f"{ms:.3f}"})

    async def unload(request: Request) -> Response:
        if isinstance(refused := caller(request, admin=True), JSONResponse):
            return refused
        body = await parse(request, LoadRequest)
        if isinstance(body, JSONResponse):
            return body
        try:
            engine.unload_named(body.lora_name)
        except FtsError as exc:
            return error(404, exc.message, param="lora_name")
        return PlainTextResponse(f"Success: LoRA adapter '{body.lora_name}' removed successfully.")

    async def health(request: Request) -> Response:
        status = {"status": "ok", "base": engine.base_name, "device": str(engine.device)}
        if tenants is None or isinstance(caller(request, admin=True), Key):  # adapter names: not for everyone
            status.update(cached=list(engine.cache), loaded=list(engine.named))
        return JSONResponse(status)

    async def metrics(request: Request) -> Response:
        if isinstance(refused := caller(request, admin=True), JSONResponse):
            return refused
        return Response(generate_latest(engine.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    return Starlette(routes=[
        Route("/health", health), Route("/metrics", metrics), Route("/v1/models", models),
        Route("/v1/completions", completions, methods=["POST"]),
        Route("/v1/chat/completions", chat, methods=["POST"]),
        Route("/v1/load_lora_adapter", load, methods=["POST"]),
        Route("/v1/unload_lora_adapter", unload, methods=["POST"]),
    ])


def serve(settings, base: str, store: str | None, *, quantize: str, max_cached_bytes: int, max_rank: int, host: str,
          port: int, token: str | None, extra_hosts: list[str] = (), extra_origins: list[str] = (),
          max_queue: int = 64, request_timeout: float = 300.0, keys: Path | None = None, max_loras: int = 8,
          max_batch: int = 32) -> None:
    """Load the base once and serve. `store` defaults to the one every command uses (FTS_STORE, else
    FTS_HOME/store); a URL serves an HTTP store through a local cache. `keys`: a tenants file
    (`fts_mcp.edge.tenants`) instead of the one `token`."""
    import uvicorn

    from fts_mcp.edge.sources import StoreSource
    from fts_mcp.http import BearerAuth, HostOriginGuard, check_bind, clean_token, security_settings

    if keys is not None and token:
        raise InvalidArgument("give --keys (a key per tenant) or --token (one key for everything), not both",
                              param="--keys")
    tenants = Tenants.load(keys) if keys is not None else None
    check_bind(host, token or (tenants.keys[0].key if tenants else None))
    token = clean_token(token)
    engine = Engine(base, StoreSource(store or settings.store, settings.edge_cache), quantize=quantize,
                    max_rank=max_rank, max_cached_bytes=max_cached_bytes, roots=settings.roots,
                    trust_remote_code=settings.trust_remote_code, max_loras=max_loras, max_batch=max_batch)
    app = HostOriginGuard(build_app(engine, max_queue=max_queue, request_timeout=request_timeout, tenants=tenants),
                          security_settings(host, port, list(extra_hosts), list(extra_origins)))
    uvicorn.run(BearerAuth(app, token) if token else app, host=host, port=port, log_level="warning")
