"""Streamable HTTP and SSE transports in a real server process: Host/Origin checks, bearer token, both eras."""

import os
import socket
import subprocess
import sys
from contextlib import contextmanager

import httpx2
import pytest
from mcp import Client
from mcp.client.sse import sse_client
from mcp.client.streamable_http import streamable_http_client

from tests.conftest import wait_for

pytestmark = pytest.mark.anyio
TOKEN = "s3cret-s3cret-s3cret"  # 16 characters at least, as every bearer token


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def port_open(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


@contextmanager
def http_server(*args: str):
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "fts_mcp", "serve", "--port", str(port), *args],
                            env=dict(os.environ), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        wait_for(lambda: port_open(port) or proc.poll() is not None, 30, what="the server to listen")
        assert proc.poll() is None, proc.stderr.read().decode()
        yield port
    finally:
        proc.terminate()
        proc.communicate(timeout=10)


@pytest.mark.parametrize("mode", ["auto", "legacy"])
async def test_streamable_http_serves_tools_at_mcp(fts_home, mode):
    with http_server("--transport", "http") as port:
        async with Client(f"http://127.0.0.1:{port}/mcp", mode=mode) as client:
            assert "job_status" in {t.name for t in (await client.list_tools()).tools}
            result = await client.call_tool("job_status", {"job_id": "job-000000000000"})
            assert result.is_error and "no job" in result.content[0].text
            assert (await client.call_tool("list_jobs", {})).structured_content["total"] == 0


async def test_sse_transport(fts_home):
    with http_server("--transport", "sse") as port:
        async with Client(sse_client(f"http://127.0.0.1:{port}/sse")) as client:
            assert (await client.call_tool("list_jobs", {})).structured_content == {"jobs": [], "total": 0}


async def test_host_and_origin_checks_are_on(fts_home):
    with http_server("--transport", "http") as port:
        url = f"http://127.0.0.1:{port}/mcp"
        body = {"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {
            "protocolVersion": "2025-11-25", "capabilities": {}, "clientInfo": {"name": "t", "version": "1"}}}
        headers = {"Accept": "application/json, text/event-stream", "Content-Type": "application/json"}
        async with httpx2.AsyncClient() as http:
            assert (await http.post(url, json=body, headers={**headers, "Host": "evil.example"})).status_code == 421
            assert (await http.post(url, json=body, headers={**headers, "Origin": "http://evil.example"})).status_code \
                == 403
            assert (await http.post(url, json=body, headers=headers)).status_code == 200


async def test_bearer_token_is_required_when_set(fts_home):
    with http_server("--transport", "http", "--token", TOKEN) as port:
        url = f"http://127.0.0.1:{port}/mcp"
        async with httpx2.AsyncClient() as http:
            denied = await http.post(url, json={"jsonrpc": "2.0", "id": 1, "method": "tools/list"})
            assert denied.status_code == 401
        async with httpx2.AsyncClient(headers={"Authorization": f"Bearer {TOKEN}"}) as http:
            async with Client(streamable_http_client(url, http_client=http)) as client:
                assert (await client.call_tool("list_jobs", {})).structured_content["total"] == 0


async def test_http_sessions_are_bounded_by_closing_the_least_recently_used(fts_home, monkeypatch):
    """The SDK's defaults kept 10,000 sessions for 30 minutes, then answered every newcomer 503; with
    FTS_HTTP_MAX_SESSIONS=3 the fourth session closes the first, and nobody is locked out."""
    monkeypatch.setenv("FTS_HTTP_MAX_SESSIONS", "3")
    body = {"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {
        "protocolVersion": "2025-11-25", "capabilities": {}, "clientInfo": {"name": "t", "version": "1"}}}
    headers = {"Accept": "application/json, text/event-stream", "Content-Type": "application/json"}
    with http_server("--transport", "http") as port:
        url = f"http://127.0.0.1:{port}/mcp"
        async with httpx2.AsyncClient(timeout=20) as http:
            sessions = []
            for _ in range(6):
                opened = await http.post(url, json=body, headers=headers)
                assert opened.status_code == 200
                sessions.append(opened.headers["mcp-session-id"])
            listing = {"jsonrpc": "2.0", "id": 2, "method": "tools/list"}
            statuses = [(await http.post(url, json=listing, headers={**headers, "mcp-session-id": s,
                                                                     "mcp-protocol-version": "2025-11-25"})).status_code
                        for s in sessions]
        assert statuses == [404, 404, 404, 200, 200, 200]
        async with Client(url, mode="legacy") as client:  # a newcomer still gets in
            assert (await client.call_tool("list_jobs", {})).structured_content["total"] == 0


@pytest.mark.parametrize("token", [None, "   ", " s3cret", "a"])
@pytest.mark.parametrize("command", [["serve", "--transport", "http"], ["edge", "serve", "--base", "unused"]])
def test_binding_beyond_loopback_without_a_real_token_is_refused(fts_home, monkeypatch, command, token):
    """A blank, whitespace-padded or short token is refused like a missing one, for the MCP server and the runtime."""
    monkeypatch.delenv("FTS_AUTH_TOKEN", raising=False)
    args = [*command, "--host", "0.0.0.0", "--port", str(free_port()), *(["--token", token] if token else [])]
    done = subprocess.run([sys.executable, "-m", "fts_mcp", *args], capture_output=True, text=True, timeout=60)
    assert done.returncode == 2, done.stderr
    assert ("--host" in done.stderr and "token" in done.stderr) or "--token" in done.stderr


@pytest.mark.parametrize("token", ["a", "s3cret", "x" * 15])
def test_a_token_shorter_than_the_tenant_keys_is_refused(token):
    """As short a secret as 'a' guards nothing: a bearer token needs the 16 characters the runtime's keys need."""
    from fts_mcp.errors import InvalidArgument
    from fts_mcp.network import check_bind
    from fts_mcp.tokens import clean_token

    for refuse in (lambda: clean_token(token), lambda: check_bind("0.0.0.0", token)):
        with pytest.raises(InvalidArgument) as refused:
            refuse()
        assert refused.value.param == "--token" and "16 characters" in refused.value.message
    assert clean_token("x" * 16) == "x" * 16


def test_stdio_stdout_carries_protocol_messages_only(fts_home):
    """Nothing but JSON-RPC on stdout, even though the server logs."""
    request = ('{"jsonrpc":"2.0","id":1,"method":"initialize","params":{"protocolVersion":"2025-11-25",'
               '"capabilities":{},"clientInfo":{"name":"t","version":"1"}}}\n'
               '{"jsonrpc":"2.0","method":"notifications/initialized"}\n'
               '{"jsonrpc":"2.0","id":2,"method":"tools/list"}\n')
    proc = subprocess.Popen([sys.executable, "-m", "fts_mcp", "serve"], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    proc.stdin.write(request)
    proc.stdin.flush()
    lines = [proc.stdout.readline(), proc.stdout.readline()]
    proc.communicate(timeout=15)
    assert all(line.startswith('{"jsonrpc":"2.0"') or line.startswith('{"id"') for line in lines), lines
    assert '"validate_dataset"' in lines[1]
