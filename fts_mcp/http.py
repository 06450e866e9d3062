"""HTTP transports (streamable HTTP at /mcp, SSE at /sse): loopback by default, bearer token elsewhere."""

from __future__ import annotations

import hmac
import ipaddress
import json

from mcp.server.transport_security import TransportSecuritySettings

from fts_mcp.errors import InvalidArgument

LOOPBACK_NAMES = ("127.0.0.1", "localhost", "::1")


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
    hosts = [f"127.0.0.1:{port}", f"localhost:{port}", f"[::1]:{port}"]
    origins = [f"http://127.0.0.1:{port}", f"http://localhost:{port}", f"http://[::1]:{port}"]
    if not is_loopback(host) and host not in ("0.0.0.0", "::"):
        hosts.append(f"{host}:{port}")
        origins += [f"http://{host}:{port}", f"https://{host}:{port}"]
    return TransportSecuritySettings(enable_dns_rebinding_protection=True, allowed_hosts=hosts + extra_hosts,
                                     allowed_origins=origins + extra_origins)


def check_bind(host: str, token: str | None) -> None:
    if not is_loopback(host) and not token:
        raise InvalidArgument(f"binding to {host} exposes the server beyond this host; set a bearer token with "
                              "--token or FTS_AUTH_TOKEN (clients then send 'Authorization: Bearer <token>'), "
                              "or bind to 127.0.0.1", param="--host")


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
    security = security_settings(host, port, extra_hosts, extra_origins)
    if transport == "sse":
        app = server.sse_app(transport_security=security, host=host)
    else:
        app = server.streamable_http_app(streamable_http_path="/mcp", transport_security=security, host=host)
    if token:
        app = BearerAuth(app, token)
    uvicorn.run(app, host=host, port=port, log_level="warning")
