"""Letting a request in, written once for every handler: its API key (`authenticate`), its body (`parse`, bounded
and strict), whether its tenant may use the model it names (`admit` does all three), and its place in the queue
(`Admission`). Each refusal is an `ApiError`."""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError
from starlette.requests import Request

from fts_mcp.edge.api.config import RuntimeConfig
from fts_mcp.edge.api.errors import ApiError
from fts_mcp.edge.api.protocol import UNSUPPORTED, GenerationRequest
from fts_mcp.edge.engine import Engine
from fts_mcp.edge.tenants import Key, Tenants, adapter_names
from fts_mcp.errors import FtsError

MAX_BODY_BYTES = 4 << 20
Body = TypeVar("Body", bound=BaseModel)


class Admission:
    """At most `limit` sequences (a request's prompts x n) waiting for or using the device; a request that would
    pass it is turned away (429), one that never could is refused (400)."""

    def __init__(self, limit: int) -> None:
        self.limit, self.inside, self._lock = limit, 0, threading.Lock()

    def enter(self, count: int) -> None:
        if count > self.limit:
            raise ApiError(400, f"this request asks for {count} sequences (prompts x n); this runtime takes at most "
                                f"{self.limit} at once", param="n")
        with self._lock:
            if self.inside + count > self.limit:
                raise ApiError(429, f"{self.limit} sequences are already waiting or running; retry shortly",
                               kind="rate_limit_exceeded", headers={"Retry-After": "1"})
            self.inside += count

    def leave(self, count: int) -> None:
        with self._lock:
            self.inside -= count


class RuntimeState:
    """What every handler reaches through `request.app.state.runtime`."""

    def __init__(self, engine: Engine, config: RuntimeConfig, tenants: Tenants | None) -> None:
        self.engine, self.config, self.tenants = engine, config, tenants
        self.admission = Admission(config.max_queue)
        self.base_names = {engine.base_name, Path(engine.base_name).name, "base"}

    def available(self) -> list[str]:
        """Every model a request may name: the base, each stored adapter with its versions and aliases, and the
        adapters given names by load_lora_adapter."""
        names = [self.engine.base_name]
        try:
            catalogue = self.engine.source.catalogue()
        except FtsError:  # an unreachable or corrupt store index: the base and loaded adapters are still served
            catalogue = {}
        for name, entry in catalogue.items():
            names += [name] + [f"{name}@{v}" for v in entry["versions"]] + [f"{name}:{a}" for a in entry["aliases"]]
        return names + list(self.engine.named)

    def permits(self, key: Key | None, model: str) -> bool:
        if key is None:
            return True
        if model in self.base_names:
            return key.may_use("base") or key.may_use(self.engine.base_name)
        return all(key.may_use(name) for name in adapter_names(model))

    def visible(self, key: Key | None) -> list[str]:
        """What `key` may use, of what is available."""
        return [m for m in self.available() if self.permits(key, m)]


def state_of(request: Request) -> RuntimeState:
    return request.app.state.runtime


def authenticate(request: Request, *, admin: bool = False) -> Key | None:
    """The caller's key (None when the runtime has no tenants): 401 without a known one, 403 if `admin` is needed
    and it is not an admin key."""
    tenants = state_of(request).tenants
    if tenants is None:
        return None
    key = tenants.holder(request.headers.get("authorization"))
    if key is None:
        raise ApiError(401, "send Authorization: Bearer <your API key>", kind="authentication_error")
    if admin and not key.admin:
        raise ApiError(403, "this call needs an admin key", kind="permission_denied")
    return key


def is_admin(request: Request) -> bool:
    """Whether the caller may see admin-only detail: always without tenants, else with an admin key."""
    tenants = state_of(request).tenants
    key = tenants.holder(request.headers.get("authorization")) if tenants is not None else None
    return tenants is None or (key is not None and key.admin)


async def read_json(request: Request) -> Any:
    """The body as JSON, refused past MAX_BODY_BYTES whether or not it declares its length."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > MAX_BODY_BYTES:
        raise ApiError(413, f"the body is over {MAX_BODY_BYTES >> 20} MiB", kind="request_too_large")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > MAX_BODY_BYTES:
            raise ApiError(413, f"the body is over {MAX_BODY_BYTES >> 20} MiB", kind="request_too_large")
        chunks.append(chunk)
    try:
        return json.loads(b"".join(chunks))
    except (ValueError, RecursionError):
        raise ApiError(400, "the body must be JSON") from None


async def parse(request: Request, model: type[Body]) -> Body:
    """The body as `model`; a 400 names the first field wrong, and for generation what this runtime takes."""
    raw = await read_json(request)
    if not isinstance(raw, dict):
        raise ApiError(400, "the body must be a JSON object")
    if issubclass(model, GenerationRequest):
        refused = sorted(k for k, v in raw.items() if k in UNSUPPORTED and v not in UNSUPPORTED[k])
        if refused:
            raise ApiError(400, f"{', '.join(refused)}: not supported by this runtime; it takes "
                                f"{', '.join(sorted(model.model_fields))}", param=refused[0])
        raw = {k: v for k, v in raw.items() if k not in UNSUPPORTED}  # sent at a value that changes nothing
    try:
        return model.model_validate(raw)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or None
        message = first["msg"] if first["type"] != "extra_forbidden" else \
            f"not a field this runtime takes; it takes {', '.join(sorted(model.model_fields))}"
        raise ApiError(400, f"{where}: {message}" if where else message, param=where) from None


async def admit(request: Request, body: type[Body], *, admin: bool = False) -> tuple[Key | None, Body]:
    """Every handler with a body opens with this: authenticate, parse the body, and check that the caller's tenant
    may use the model it names (403 otherwise)."""
    key = authenticate(request, admin=admin)
    parsed = await parse(request, body)
    if isinstance(parsed, GenerationRequest) and not state_of(request).permits(key, parsed.model):
        raise ApiError(403, f"this key may not use {parsed.model!r}; GET /v1/models lists what it may use",
                       param="model", kind="permission_denied")
    return key, parsed
