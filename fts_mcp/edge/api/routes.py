"""One handler per endpoint, and `build_app`, which puts them together. With tenants, every call but /health needs a
known key, each key reaches only its adapters, and the admin calls (and /metrics) need an admin key. Nothing here
reads the store on the event loop: /health and the base answer whatever the store does."""

from __future__ import annotations

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route

from fts_mcp.adapters.store import CorruptAdapter
from fts_mcp.edge.api.access import RuntimeState, admit, authenticate, is_admin, state_of
from fts_mcp.edge.api.config import RuntimeConfig
from fts_mcp.edge.api.errors import ApiError, answer_error, answer_unexpected
from fts_mcp.edge.api.generation import generate
from fts_mcp.edge.api.protocol import ChatRequest, CompletionRequest, Health, LoraAdapterRequest, ModelList
from fts_mcp.edge.engine import Engine
from fts_mcp.edge.tenants import Tenants
from fts_mcp.errors import FtsError


async def create_completion(request: Request) -> Response:
    """POST /v1/completions"""
    key, body = await admit(request, CompletionRequest)
    return await generate(request, body, key)


async def create_chat_completion(request: Request) -> Response:
    """POST /v1/chat/completions"""
    key, body = await admit(request, ChatRequest)
    return await generate(request, body, key)


async def list_models(request: Request) -> Response:
    """GET /v1/models: what the caller's key may use."""
    key = authenticate(request)
    state = state_of(request)
    cards = await state.off_loop(state.cards, key)
    return JSONResponse(ModelList(data=cards).model_dump(exclude_none=True))


async def load_lora_adapter(request: Request) -> Response:
    """POST /v1/load_lora_adapter {lora_name, lora_path}: an adapter folder or store reference, under a name
    (a store reference's form). A refusal names the field at fault."""
    _, body = await admit(request, LoraAdapterRequest, admin=True)
    if not body.lora_path:
        raise ApiError(400, "lora_path is required: an adapter folder or a store reference", param="lora_path")
    state = state_of(request)
    try:
        ms = await state.off_loop(state.engine.load_named, body.lora_name, body.lora_path)
    except CorruptAdapter as exc:
        raise ApiError(502, exc.message, param="lora_path", kind="corrupt_adapter") from exc
    except FtsError as exc:
        raise ApiError(400, exc.message, param=exc.param if exc.param == "lora_name" else "lora_path") from exc
    return PlainTextResponse(f"Success: LoRA adapter '{body.lora_name}' added successfully.",
                             headers={"x-fts-load-ms": f"{ms:.3f}"})


async def unload_lora_adapter(request: Request) -> Response:
    """POST /v1/unload_lora_adapter {lora_name}"""
    _, body = await admit(request, LoraAdapterRequest, admin=True)
    try:
        state_of(request).engine.unload_named(body.lora_name)
    except FtsError as exc:
        raise ApiError(404, exc.message, param="lora_name") from exc
    return PlainTextResponse(f"Success: LoRA adapter '{body.lora_name}' removed successfully.")


async def health(request: Request) -> Response:
    """GET /health: open to all; the adapters cached and loaded only for an admin (or without tenants)."""
    engine, admin = state_of(request).engine, is_admin(request)
    status = Health(base=engine.base_name, device=str(engine.device), cached=list(engine.cache) if admin else None,
                    loaded=list(engine.named) if admin else None)
    return JSONResponse(status.model_dump(exclude_none=True))


async def metrics(request: Request) -> Response:
    """GET /metrics: Prometheus text (admin)."""
    authenticate(request, admin=True)
    return Response(generate_latest(state_of(request).engine.metrics.registry), media_type=CONTENT_TYPE_LATEST)


ROUTES = [
    Route("/health", health), Route("/metrics", metrics), Route("/v1/models", list_models),
    Route("/v1/completions", create_completion, methods=["POST"]),
    Route("/v1/chat/completions", create_chat_completion, methods=["POST"]),
    Route("/v1/load_lora_adapter", load_lora_adapter, methods=["POST"]),
    Route("/v1/unload_lora_adapter", unload_lora_adapter, methods=["POST"]),
]


def build_app(engine: Engine, config: RuntimeConfig, tenants: Tenants | None = None) -> Starlette:
    """The runtime's routes over `engine`, bounded by `config`'s queue and timeout. `tenants`: the keys file
    `config.keys` names, already loaded (None: no per-tenant keys)."""
    app = Starlette(routes=ROUTES, exception_handlers={ApiError: answer_error, Exception: answer_unexpected})
    app.state.runtime = RuntimeState(engine, config, tenants)
    return app
