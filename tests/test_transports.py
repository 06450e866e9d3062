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
    with http_server("--transport", "http", "--token", "s3cret") as port:
        url = f"http://127.0.0.1:{port}/mcp"
        async with httpx2.AsyncClient() as http:
            denied = await http.post(url, json={"jsonrpc": "2.0", "id": 1, "method": "tools/list"})
            assert denied.status_code == 401
        async with httpx2.AsyncClient(headers={"Authorization": "Bearer s3cret"}) as http:
            async with Client(streamable_http_client(url, http_client=http)) as client:
                assert (await client.call_tool("list_jobs", {})).structured_content["total"] == 0


@pytest.mark.parametrize("token", [None, "   ", " s3cret"])
@pytest.mark.parametrize("command", [["serve", "--transport", "http"], ["edge", "serve", "--base", "unused"]])
def test_binding_beyond_loopback_without_a_real_token_is_refused(fts_home, monkeypatch, command, token):
    """A blank (or whitespace-padded) token is refused like a missing one, for the MCP server and the runtime."""
    monkeypatch.delenv("FTS_AUTH_TOKEN", raising=False)
    args = [*command, "--host", "0.0.0.0", "--port", str(free_port()), *(["--token", token] if token else [])]
    done = subprocess.run([sys.executable, "-m", "fts_mcp", *args], capture_output=True, text=True, timeout=60)
    assert done.returncode == 2, done.stderr
    assert ("--host" in done.stderr and "token" in done.stderr) or "--token" in done.stderr


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
