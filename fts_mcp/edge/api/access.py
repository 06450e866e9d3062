"""Letting a request in, written once for every handler: its API key (`authenticate`), its body (`parse`, bounded
and strict), whether its tenant may use the model it names (`admit` does all three), and its place in the queue
(`Admission`). Each refusal is an `ApiError`.

Whatever may read the adapter store runs off the event loop, on the store's own worker threads
(`RuntimeState.store_threads`): a slow store holds up the requests that need it, never /health or the base."""

from __future__ import annotations

import json
import threading
from collections.abc import Callable
from typing import Any, TypeVar

import anyio
from pydantic import BaseModel, ValidationError
from starlette.requests import Request

from fts_mcp.adapters.store import UnknownAdapter
from fts_mcp.edge.api.config import RuntimeConfig
from fts_mcp.edge.api.errors import ApiError, failure
from fts_mcp.edge.api.protocol import UNSUPPORTED, GenerationRequest, ModelCard
from fts_mcp.edge.engine import Engine, parse_model
from fts_mcp.edge.tenants import Key, Tenants
from fts_mcp.errors import FtsError, InvalidArgument

MAX_BODY_BYTES = 4 << 20
STORE_THREADS = 16  # requests reading the store at once; more wait for one of these, not for anyio's shared 40
LISTING_WAIT_SECONDS = 1.0  # how long a listing waits for a store index it has never read (it can answer without)
Result = TypeVar("Result")
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
        self.store_threads = anyio.CapacityLimiter(STORE_THREADS)

    async def off_loop(self, call: Callable[..., Result], *args: Any) -> Result:
        """`call(*args)`, which may read the store, on one of the store's worker threads."""
        return await anyio.to_thread.run_sync(call, *args, limiter=self.store_threads)

    def available(self) -> list[str]:
        """Every model a request may name: the base, each stored adapter with its versions and aliases (but one
        named like the base, which a request cannot reach), and the adapters given names by load_lora_adapter.
        Reads the store: call it off the event loop."""
        names = [self.engine.base_name]
        try:
            catalogue = self.engine.source.catalogue(wait=LISTING_WAIT_SECONDS)
        except FtsError:  # an unreachable or corrupt store index: the base and loaded adapters are still served
            catalogue = {}
        for name, entry in catalogue.items():
            if name not in self.engine.base_names:
                names += [name] + [f"{name}@{v}" for v in entry["versions"]] + [f"{name}:{a}" for a in entry["aliases"]]
        return names + list(self.engine.named)

    def permits(self, key: Key | None, model: str) -> bool:
        """Whether `key` may use `model`: every adapter in it, and the base when the answer is the base's own — the
        base named alone or in a stack of it, or adapters all weighted zero. Reads `model` as the resolver does
        (`parse_model`); one it cannot read raises InvalidArgument."""
        if key is None:
            return True
        terms = parse_model(model, self.engine.base_names)
        if all(t.ref is None or t.weight == 0 for t in terms) and not (
                key.may_use("base") or key.may_use(self.engine.base_name)):
            return False
        return all(key.may_use(t.name) for t in terms if t.name is not None)

    def visible(self, key: Key | None) -> list[str]:
        """What `key` may use, of what is available. Reads the store: call it off the event loop."""
        out = []
        for model in self.available():
            try:
                if self.permits(key, model):
                    out.append(model)
            except InvalidArgument:  # a loaded name from before names were checked: not reachable anyway
                continue
        return out

    def cards(self, key: Key | None) -> list[ModelCard]:
        """/v1/models for `key`, with the warnings known without fetching every manifest of an HTTP store."""
        return [ModelCard(id=m, warning=self.engine.base_warning(m, fetch=False)) for m in self.visible(key)]

    async def resolve(self, model: str) -> tuple[tuple[str, Any] | None, str | None]:
        """(`engine.resolve(model)`, its base warning), off the event loop; the base alone needs no store and waits
        for no store thread."""
        if all(t.ref is None for t in self.engine.terms(model)):
            return None, None
        return await self.off_loop(lambda: (self.engine.resolve(model), self.engine.base_warning(model)))

    async def refusal(self, exc: FtsError, key: Key | None) -> ApiError:
        """The answer to a generation that failed; an unknown model's lists what `key` may use, read off the loop."""
        available = await self.off_loop(self.visible, key) if isinstance(exc, UnknownAdapter) else []
        return failure(exc, available, tenant=key is not None)


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
    if isinstance(parsed, GenerationRequest):
        try:
            allowed = state_of(request).permits(key, parsed.model)
        except InvalidArgument as exc:
            raise ApiError(400, exc.message, param="model") from None
        if not allowed:
            raise ApiError(403, f"this key may not use {parsed.model!r}; GET /v1/models lists what it may use",
                           param="model", kind="permission_denied")
    return key, parsed
