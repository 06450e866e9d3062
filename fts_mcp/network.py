"""HTTP rules shared by the MCP transports (streamable HTTP at /mcp, SSE at /sse) and the edge runtime:
loopback by default, a bearer token anywhere else, Host and Origin checked (DNS-rebinding protection). For the MCP
transports also: a JSON-RPC error for every malformed request, and a bounded number of sessions."""

from __future__ import annotations

import hmac
import ipaddress
import json
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import anyio

from fts_mcp import ui
from fts_mcp.config import SessionBounds
from fts_mcp.errors import InvalidArgument
from fts_mcp.tokens import clean_token

if TYPE_CHECKING:  # the MCP SDK is imported where its settings are built, not by the edge runtime's job
    from mcp.server.transport_security import TransportSecuritySettings

LOOPBACK_NAMES = ("127.0.0.1", "localhost", "::1")
MCP_PATH = "/mcp"  # streamable HTTP
SSE_MESSAGE_PATH = "/messages/"  # where SSE clients POST their messages
MAX_BODY_BYTES = 4 << 20  # a request body, as the SDK's own default; the guard reads no more before passing it on
SESSION_HEADER = b"mcp-session-id"
UI_PATHS = ("/ui", "/ui/")  # the job view for browsers (streamable HTTP only: it talks to /mcp)


def free_port() -> int:
    """A TCP port free on loopback right now (for a runtime, a demo or a rendezvous started next)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def is_loopback(host: str) -> bool:
    if host in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def security_settings(host: str, port: int, extra_hosts: list[str],
                      extra_origins: list[str]) -> TransportSecuritySettings:
    """Host and Origin checks (DNS-rebinding protection) stay on for every bind address."""
    from mcp.server.transport_security import TransportSecuritySettings

    hosts = [f"127.0.0.1:{port}", f"localhost:{port}", f"[::1]:{port}"]
    origins = [f"http://127.0.0.1:{port}", f"http://localhost:{port}", f"http://[::1]:{port}"]
    if not is_loopback(host) and host not in ("0.0.0.0", "::"):
        hosts.append(f"{host}:{port}")
        origins += [f"http://{host}:{port}", f"https://{host}:{port}"]
    return TransportSecuritySettings(enable_dns_rebinding_protection=True, allowed_hosts=hosts + extra_hosts,
                                     allowed_origins=origins + extra_origins)


def check_bind(host: str, token: str | None) -> None:
    token = clean_token(token)
    if not is_loopback(host) and not token:
        raise InvalidArgument(f"binding to {host} exposes the server beyond this host; set a bearer token with "
                              "--token or FTS_AUTH_TOKEN (clients then send 'Authorization: Bearer <token>'), "
                              "or bind to 127.0.0.1", param="--host")


class HostOriginGuard:
    """ASGI middleware with the MCP transport's DNS-rebinding rules: a Host not allowed gets 421, a browser
    Origin not allowed gets 403; requests without an Origin (non-browser clients) pass."""

    def __init__(self, app, security: TransportSecuritySettings | Any) -> None:
        self.app = app
        self.hosts = set(security.allowed_hosts)
        self.origins = set(security.allowed_origins)

    @staticmethod
    def _allowed(value: str, allowed: set[str]) -> bool:
        return value in allowed or any(a.endswith(":*") and value.rsplit(":", 1)[0] == a[:-2] for a in allowed)

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "http":
            headers = {k.lower(): v.decode("latin-1") for k, v in scope["headers"]}
            host, origin = headers.get(b"host", ""), headers.get(b"origin")
            problem = (421, f"Host {host!r} is not allowed") if not self._allowed(host, self.hosts) else \
                (403, f"Origin {origin!r} is not allowed") if origin and not self._allowed(origin, self.origins) \
                else None
            if problem:
                body = json.dumps({"error": {"message": f"{problem[1]}; start the server with --allowed-host / "
                                                        "--allowed-origin to allow it", "type": "forbidden",
                                             "param": None, "code": problem[0]}}).encode()
                await send({"type": "http.response.start", "status": problem[0],
                            "headers": [(b"content-type", b"application/json")]})
                await send({"type": "http.response.body", "body": body})
                return
        await self.app(scope, receive, send)


class BearerAuth:
    """ASGI middleware: every HTTP request must carry `Authorization: Bearer <token>`."""

    def __init__(self, app, token: str) -> None:
        self.app = app
        self.expected = f"Bearer {token}".encode()

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "http":
            given = dict(scope["headers"]).get(b"authorization", b"")
            if not hmac.compare_digest(given, self.expected):
                body = json.dumps({"error": "unauthorized", "message": "send Authorization: Bearer <token>"}).encode()
                await send({"type": "http.response.start", "status": 401,
                            "headers": [(b"content-type", b"application/json"), (b"www-authenticate", b"Bearer")]})
                await send({"type": "http.response.body", "body": body})
                return
        await self.app(scope, receive, send)


def _header(headers: list[tuple[bytes, bytes]], name: bytes) -> str | None:
    """A header's value from ASGI's (lower-cased name, value) pairs; None when absent or empty."""
    value = next((v for k, v in headers if k == name), b"")
    return value.decode("latin-1") or None


async def _send_json(send, status: int, body: dict, headers: tuple[tuple[bytes, bytes], ...] = ()) -> None:
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), *headers]})
    await send({"type": "http.response.body", "body": json.dumps(body).encode()})


class JsonRpcGuard:
    """ASGI middleware in front of the SDK's MCP endpoints: a POST to one of `paths` whose body `fts_mcp.stdio.refusal`
    refuses (not UTF-8 or not JSON, a batch, an `id` that is not a string or an integer, not JSON-RPC...) is
    answered 400 with that JSON-RPC error (-32700 or -32600), as over stdio. The SDK would answer an object `id` with
    202 and no body (it reads the message as a notification). A body over `max_body` goes on to the SDK (413)."""

    def __init__(self, app, paths: tuple[str, ...], max_body: int = MAX_BODY_BYTES) -> None:
        from fts_mcp.stdio import refusal  # the MCP SDK, imported where its transports are built (see the top)

        self.app, self.paths, self.max_body, self.refusal = app, paths, max_body, refusal

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http" or scope["method"] != "POST" or scope["path"] not in self.paths:
            await self.app(scope, receive, send)
            return
        chunks, size, more = [], 0, True
        while more and size <= self.max_body:
            message = await receive()
            if message["type"] != "http.request":
                return  # the client went away: nobody to answer
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            more = message.get("more_body", False)
        body = b"".join(chunks)
        answer = None if more else self.refusal(body.decode("utf-8", "surrogateescape"))
        if answer:
            await _send_json(send, 400, answer)
            return
        replayed = False

        async def replay() -> dict:
            nonlocal replayed
            if replayed:
                return await receive()
            replayed = True
            return {"type": "http.request", "body": body, "more_body": more}

        await self.app(scope, replay, send)


@dataclass
class _Session:
    client: str
    last_used: float
    in_flight: int = 0  # requests being served, an open stream included: a busy session is never closed


class SessionLimits:
    """ASGI middleware in front of the SDK's streamable HTTP endpoint (`path`): at most `bounds.total` sessions, at
    most `bounds.per_client` from one client address. A new session past a bound closes the least recently used idle
    session (the client's own, when its share is what is full) the way a client ends one (DELETE, with a Host the
    endpoint accepts), so a flood of `initialize` calls cannot lock other clients out. Only when every candidate is
    busy is the new session closed again and refused: 429 when the client's share is busy, 503 when all are. The SDK
    closes idle sessions itself (`session_idle_timeout`); a request to one then answers 404, and it is forgotten."""

    def __init__(self, app, bounds: SessionBounds, path: str, host: str,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.app, self.bounds, self.path, self.host, self.clock = app, bounds, path, host, clock
        self.sessions: dict[str, _Session] = {}
        self.lock = anyio.Lock()

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http" or scope["path"] != self.path:
            await self.app(scope, receive, send)
        elif (session_id := _header(scope["headers"], SESSION_HEADER)) is None:
            await self._open(scope, receive, send)
        else:
            await self._serve(session_id, scope, receive, send)

    async def _open(self, scope, receive, send) -> None:
        """Pass on a request without a session; when the SDK answers it with a new one, admit that session before
        the client hears of it, or close it again and answer with the refusal instead."""
        client = (scope.get("client") or ("unknown", 0))[0]
        opened: str | None = None
        refused: tuple[int, str] | None = None

        async def admit(message) -> None:
            nonlocal opened, refused
            if message["type"] == "http.response.start" and message["status"] < 400:
                opened = _header(message.get("headers", []), SESSION_HEADER)
                refused = await self._admit(opened, client, scope) if opened else None
                if refused:
                    status, problem = refused
                    await _send_json(send, status, {"jsonrpc": "2.0", "id": None,
                                                    "error": {"code": -32000, "message": problem}},
                                     ((b"retry-after", b"10"),))
            if not refused:
                await send(message)

        await self.app(scope, receive, admit)
        if refused and opened:
            await self._close(opened, scope)

    async def _admit(self, session_id: str, client: str, scope) -> tuple[int, str] | None:
        """Make room for `session_id` and record it; or (status, reason) when every session in the way is busy."""
        async with self.lock:
            while True:
                mine = sum(1 for s in self.sessions.values() if s.client == client)
                own_share = mine >= self.bounds.per_client
                if not own_share and len(self.sessions) < self.bounds.total:
                    self.sessions[session_id] = _Session(client, self.clock())
                    return None
                victim = self._least_recently_used_idle(client if own_share else None)
                if victim is None:
                    if own_share:
                        return 429, (f"this client already holds {mine} MCP sessions, each busy "
                                     "(FTS_HTTP_MAX_SESSIONS_PER_CLIENT); end one (DELETE /mcp) or retry later")
                    return 503, (f"all {len(self.sessions)} MCP sessions are busy (FTS_HTTP_MAX_SESSIONS); "
                                 "retry later")
                del self.sessions[victim]
                await self._close(victim, scope)

    def _least_recently_used_idle(self, client: str | None) -> str | None:
        idle = [(s.last_used, sid) for sid, s in self.sessions.items()
                if s.in_flight == 0 and (client is None or s.client == client)]
        return min(idle)[1] if idle else None

    async def _serve(self, session_id: str, scope, receive, send) -> None:
        session = self.sessions.get(session_id)
        if session is None:
            await self.app(scope, receive, send)  # not one of ours (or long gone): the SDK answers 404
            return
        status: int | None = None

        async def watch(message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        session.in_flight += 1
        try:
            await self.app(scope, receive, watch)
        finally:
            session.in_flight -= 1
            session.last_used = self.clock()
            ended = status == 404 or (scope["method"] == "DELETE" and status is not None and status < 400)
            if ended and self.sessions.get(session_id) is session:
                del self.sessions[session_id]

    async def _close(self, session_id: str, scope) -> None:
        """End a session as its client would: DELETE with its id, through the SDK, which forgets it at once."""
        request = dict(scope, method="DELETE", query_string=b"",
                       headers=[(b"host", self.host.encode()), (SESSION_HEADER, session_id.encode())])
        asked = False

        async def receive() -> dict:
            nonlocal asked
            if asked:
                return {"type": "http.disconnect"}
            asked = True
            return {"type": "http.request", "body": b"", "more_body": False}

        async def discard(_message) -> None:
            pass

        await self.app(request, receive, discard)


class UiPage:
    """ASGI middleware: GET /ui answers the job view, the same page MCP hosts render; everything else goes on to
    `app`. The page holds no data, so a browser's plain navigation (which cannot send a bearer token) gets it under
    the Host/Origin rules alone; every figure it shows comes from /mcp, with the token the page sends in the
    Authorization header (given once in the address's fragment, /ui#token=..., which no server sees or logs)."""

    def __init__(self, app, security: TransportSecuritySettings | Any) -> None:
        self.app = app
        self.page = HostOriginGuard(self._page, security)
        self.body = ui.page().encode()
        scripts = " ".join(ui.script_hashes())  # the page's own inline scripts and no other
        self.policy = (f"default-src 'none'; script-src {scripts}; style-src 'unsafe-inline'; img-src data:; "
                       "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'").encode()

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "http" and scope["path"] in UI_PATHS:
            await self.page(scope, receive, send)
        else:
            await self.app(scope, receive, send)

    async def _page(self, scope, receive, send) -> None:
        if scope["method"] not in ("GET", "HEAD"):
            await _send_json(send, 405, {"error": "method_not_allowed", "message": "GET /ui"},
                             ((b"allow", b"GET, HEAD"),))
            return
        await send({"type": "http.response.start", "status": 200, "headers": [
            (b"content-type", b"text/html; charset=utf-8"), (b"content-length", str(len(self.body)).encode()),
            (b"content-security-policy", self.policy), (b"x-content-type-options", b"nosniff"),
            (b"referrer-policy", b"no-referrer"), (b"cache-control", b"no-store")]})
        await send({"type": "http.response.body", "body": b"" if scope["method"] == "HEAD" else self.body})


def http_app(server, transport: str, host: str, port: int, token: str | None, extra_hosts: list[str],
             extra_origins: list[str], sessions: SessionBounds | None = None):
    """The MCP server's ASGI app for `transport` ("http": streamable HTTP at /mcp, or "sse"), with this module's
    rules in front of the SDK: the bearer token, Host and Origin, a JSON-RPC error for every malformed request, and
    (streamable HTTP) bounded sessions that end when idle (`sessions`, by default SessionBounds())."""
    sessions = sessions or SessionBounds()
    check_bind(host, token)
    token = clean_token(token)
    security = security_settings(host, port, extra_hosts, extra_origins)
    if transport == "sse":
        app = JsonRpcGuard(server.sse_app(transport_security=security, host=host,
                                          max_request_body_size=MAX_BODY_BYTES), (SSE_MESSAGE_PATH,))
    else:
        # The SDK's own cap stays as a backstop above ours: a session exists there before SessionLimits admits it.
        app = server.streamable_http_app(streamable_http_path=MCP_PATH, transport_security=security, host=host,
                                         max_request_body_size=MAX_BODY_BYTES, max_sessions=2 * sessions.total,
                                         session_idle_timeout=sessions.idle_seconds)
        app = JsonRpcGuard(SessionLimits(app, sessions, MCP_PATH, security.allowed_hosts[0]), (MCP_PATH,))
    app = HostOriginGuard(app, security)  # first, so nothing is read from a request the SDK would refuse
    app = BearerAuth(app, token) if token else app
    return UiPage(app, security) if transport == "http" else app


def serve_http(server, transport: str, host: str, port: int, token: str | None, extra_hosts: list[str],
               extra_origins: list[str], sessions: SessionBounds | None = None) -> None:
    import uvicorn

    uvicorn.run(http_app(server, transport, host, port, token, extra_hosts, extra_origins, sessions),
                host=host, port=port, log_level="warning")
