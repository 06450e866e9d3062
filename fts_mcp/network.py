"""HTTP rules shared by the MCP transports (streamable HTTP at /mcp, SSE at /sse) and the edge runtime:
loopback by default, a bearer token anywhere else, Host and Origin checked (DNS-rebinding protection)."""

from __future__ import annotations

import hmac
import ipaddress
import json
import socket
from typing import TYPE_CHECKING, Any

from fts_mcp.errors import InvalidArgument
from fts_mcp.tokens import clean_token

if TYPE_CHECKING:  # the MCP SDK is imported where its settings are built, not by the edge runtime's job
    from mcp.server.transport_security import TransportSecuritySettings

LOOPBACK_NAMES = ("127.0.0.1", "localhost", "::1")


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


def serve_http(server, transport: str, host: str, port: int, token: str | None,
               extra_hosts: list[str], extra_origins: list[str]) -> None:
    import uvicorn

    check_bind(host, token)
    token = clean_token(token)
    security = security_settings(host, port, extra_hosts, extra_origins)
    if transport == "sse":
        app = server.sse_app(transport_security=security, host=host)
    else:
        app = server.streamable_http_app(streamable_http_path="/mcp", transport_security=security, host=host)
    if token:
        app = BearerAuth(app, token)
    uvicorn.run(app, host=host, port=port, log_level="warning")
