"""`fts-mcp edge serve`: the engine behind an OpenAI-compatible HTTP API, with vLLM's LoRA admin calls.

    GET  /health                     GET /metrics (Prometheus text)
    GET  /v1/models                  POST /v1/completions         POST /v1/chat/completions
    POST /v1/load_lora_adapter {lora_name, lora_path}            POST /v1/unload_lora_adapter {lora_name}

`model` in a request is an adapter (`name`, `name@v3`, `name:prod`, or a name given to load_lora_adapter) or the
base model itself. An unknown model gets a 404 listing what is available; a corrupt adapter a 502 — and the
runtime goes on serving the others.

Every request is bounded: a body over `MAX_BODY_BYTES` gets 413; prompt + completion must fit the model's
context (400 naming the argument); at most `max_queue` requests wait or run at once (429 with Retry-After
beyond); each has a deadline (504 past it); and generation stops when the client disconnects.
"""

from __future__ import annotations

import threading
import time
import uuid
from typing import Any

import anyio
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route

from fts_mcp.edge.engine import DeadlineExceeded, Engine
from fts_mcp.edge.store import CorruptAdapter, UnknownAdapter
from fts_mcp.errors import FtsError, InvalidArgument


class Message(BaseModel):
    role: str
    content: str


class CompletionRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str
    prompt: str | None = None
    messages: list[Message] | None = None
    max_tokens: int = Field(64, ge=1, le=8192)
    temperature: float = Field(0.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    stop: str | list[str] | None = None


class LoadRequest(BaseModel):
    lora_name: str = Field(min_length=1, max_length=200)
    lora_path: str | None = None


MAX_BODY_BYTES = 4 << 20
DISCONNECT_POLL_SECONDS = 0.1


def error(status: int, message: str, *, param: str | None = None, kind: str = "invalid_request_error",
          headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": kind, "param": param, "code": status}}, status,
                        headers=headers)


class Admission:
    """At most `limit` requests waiting for or using the device; the next one is turned away (429)."""

    def __init__(self, limit: int) -> None:
        self.limit, self.inside, self._lock = limit, 0, threading.Lock()

    def enter(self) -> bool:
        with self._lock:
            if self.inside >= self.limit:
                return False
            self.inside += 1
            return True

    def leave(self) -> None:
        with self._lock:
            self.inside -= 1


def build_app(engine: Engine, *, max_queue: int = 64, request_timeout: float = 300.0) -> Starlette:
    admission = Admission(max_queue)

    def available() -> list[str]:
        names = [engine.base_name]
        try:
            catalogue = engine.source.catalogue()
        except FtsError:  # an unreachable or corrupt store index: the base and loaded adapters are still served
            catalogue = {}
        for name, entry in catalogue.items():
            names += [name] + [f"{name}@{v}" for v in entry["versions"]] + [f"{name}:{a}" for a in entry["aliases"]]
        return names + list(engine.named)

    async def parse(request: Request, model: type[BaseModel]) -> BaseModel | JSONResponse:
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
            return model.model_validate_json(b"".join(chunks))
        except ValidationError as exc:
            first = exc.errors()[0]
            where = ".".join(str(p) for p in first["loc"]) or None
            return error(400, f"{where or 'body'}: {first['msg']}" if where else first["msg"], param=where)
        except (ValueError, RecursionError):
            return error(400, "the body must be JSON")

    async def generate(body: CompletionRequest, chat: bool, request: Request) -> dict:
        """Run one generation in a worker thread, ending it if the client disconnects or the deadline passes."""
        stop = [body.stop] if isinstance(body.stop, str) else body.stop
        cancel = threading.Event()
        deadline = time.monotonic() + request_timeout
        outcome: dict[str, Any] = {}

        async def watch_client() -> None:
            while not await request.is_disconnected():
                await anyio.sleep(DISCONNECT_POLL_SECONDS)
            cancel.set()

        async with anyio.create_task_group() as tg:
            tg.start_soon(watch_client)
            try:
                outcome["result"] = await anyio.to_thread.run_sync(lambda: engine.generate(
                    body.model, prompt=None if chat else (body.prompt or ""),
                    messages=[m.model_dump() for m in body.messages] if chat else None, max_tokens=body.max_tokens,
                    temperature=body.temperature, top_p=body.top_p, stop=stop, cancel=cancel, deadline=deadline))
            except FtsError as exc:  # raised out here, not from inside the task group (no exception group)
                outcome["error"] = exc
            finally:
                tg.cancel_scope.cancel()
        if "error" in outcome:
            raise outcome["error"]
        return outcome["result"]

    async def run(body: CompletionRequest, chat: bool, request: Request) -> Response:
        if not admission.enter():
            return error(429, f"{max_queue} requests are already waiting or running; retry shortly",
                         kind="rate_limit_exceeded", headers={"Retry-After": "1"})
        try:
            result = await generate(body, chat, request)
        except DeadlineExceeded as exc:
            return error(504, exc.message, param=exc.param, kind=exc.code)
        except CorruptAdapter as exc:
            return error(502, exc.message, param="model", kind="corrupt_adapter")
        except UnknownAdapter as exc:
            return error(404, f"{exc.message}. Available models: {', '.join(available())}", param="model",
                         kind="model_not_found")
        except InvalidArgument as exc:
            return error(400, exc.message, param=exc.param)
        except FtsError as exc:
            return error(502, exc.message, param=exc.param, kind=exc.code)
        finally:
            admission.leave()
        choice: dict[str, Any] = {"index": 0, "finish_reason": result["finish_reason"]}
        if chat:
            choice["message"] = {"role": "assistant", "content": result["text"]}
        else:
            choice["text"] = result["text"]
        return JSONResponse({
            "id": f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:24]}",
            "object": "chat.completion" if chat else "text_completion", "created": int(time.time()),
            "model": body.model, "choices": [choice], "usage": result["usage"],
            "fts": {"adapter": result["adapter"], "swap_ms": result["swap_ms"]}})

    async def completions(request: Request) -> Response:
        body = await parse(request, CompletionRequest)
        if isinstance(body, JSONResponse):
            return body
        if body.prompt is None:
            return error(400, "prompt is required", param="prompt")
        return await run(body, chat=False, request=request)

    async def chat(request: Request) -> Response:
        body = await parse(request, CompletionRequest)
        if isinstance(body, JSONResponse):
            return body
        if not body.messages:
            return error(400, "messages is required: a list of {role, content}", param="messages")
        return await run(body, chat=True, request=request)

    async def models(_: Request) -> Response:
        return JSONResponse({"object": "list", "data": [{"id": m, "object": "model", "owned_by": "fts-mcp"}
                                                        for m in available()]})

    async def load(request: Request) -> Response:
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
        body = await parse(request, LoadRequest)
        if isinstance(body, JSONResponse):
            return body
        try:
            engine.unload_named(body.lora_name)
        except FtsError as exc:
            return error(404, exc.message, param="lora_name")
        return PlainTextResponse(f"Success: LoRA adapter '{body.lora_name}' removed successfully.")

    async def health(_: Request) -> Response:
        return JSONResponse({"status": "ok", "base": engine.base_name, "device": str(engine.device),
                             "cached": list(engine.cache), "loaded": list(engine.named)})

    async def metrics(_: Request) -> Response:
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
          max_queue: int = 64, request_timeout: float = 300.0) -> None:
    """Load the base once and serve. `store` defaults to the one every command uses (FTS_STORE, else
    FTS_HOME/store); a URL serves an HTTP store through a local cache."""
    import uvicorn

    from fts_mcp.edge.sources import StoreSource
    from fts_mcp.http import BearerAuth, HostOriginGuard, check_bind, clean_token, security_settings

    check_bind(host, token)
    token = clean_token(token)
    engine = Engine(base, StoreSource(store or settings.store, settings.edge_cache), quantize=quantize,
                    max_rank=max_rank, max_cached_bytes=max_cached_bytes, roots=settings.roots,
                    trust_remote_code=settings.trust_remote_code)
    app = HostOriginGuard(build_app(engine, max_queue=max_queue, request_timeout=request_timeout),
                          security_settings(host, port, list(extra_hosts), list(extra_origins)))
    uvicorn.run(BearerAuth(app, token) if token else app, host=host, port=port, log_level="warning")
