"""Requests the MCP SDK cannot parse still get an answer, over stdio and HTTP, and the server keeps serving."""

import json
import os
import select
import subprocess
import sys

import httpx
import pytest

from tests.test_transports import http_server

INIT = {"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {
    "protocolVersion": "2025-11-25", "capabilities": {}, "clientInfo": {"name": "t", "version": "1"}}}
HOSTILE = [  # (request, error code, words naming the argument and the problem)
    ('{"jsonrpc":"2.0","id":2,"method":"tools/call","params":{"name":"validate_dataset",'
     '"arguments":{"path":"\\ud800"}}}', -32602, "params.arguments.path holds a lone UTF-16 surrogate"),
    ('{"jsonrpc":"2.0","id":3,"method":"tools/call","params":{"name":"list_jobs","arguments":{"limit":'
     + "9" * 5000 + "}}}", -32700, "limit holds an integer longer than 4,300 digits"),
    ('{"jsonrpc":"2.0","id":4,"method":"tools/call","params":{"name":"list_jobs","arguments":{"state":'
     + "[" * 5000 + "]" * 5000 + "}}}", -32700, "state is nested deeper"),
]


def test_stdio_answers_what_the_sdk_would_drop(fts_home):
    server = subprocess.Popen([sys.executable, "-m", "fts_mcp", "serve"], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=dict(os.environ))

    def send(line: str) -> None:
        server.stdin.write((line + "\n").encode())
        server.stdin.flush()

    def answer(timeout: float = 15) -> dict:
        ready, _, _ = select.select([server.stdout], [], [], timeout)
        assert ready, "no answer: the client would hang"
        return json.loads(server.stdout.readline())

    try:
        send(json.dumps(INIT))
        assert answer()["id"] == 1
        send('{"jsonrpc":"2.0","method":"notifications/initialized"}')
        for request_id, (line, code, words) in enumerate(HOSTILE, start=2):
            send(line)
            reply = answer()
            assert reply["id"] == request_id
            assert reply["error"]["code"] == code and words in reply["error"]["message"]
        send('{"jsonrpc":"2.0","id":9,"method":"tools/list"}')
        assert answer()["id"] == 9  # still serving
    finally:
        server.kill()
        server.communicate()


@pytest.mark.anyio
@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_http_answers_them_too(fts_home):
    with http_server("--transport", "http") as port:
        headers = {"Accept": "application/json, text/event-stream", "Content-Type": "application/json"}
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=20) as http:
            init = await http.post("/mcp", json=INIT, headers=headers)
            session = {"mcp-session-id": init.headers["mcp-session-id"]} if "mcp-session-id" in init.headers else {}
            for line, _, _ in HOSTILE:
                reply = await http.post("/mcp", content=line, headers={**headers, **session})
                assert reply.status_code in (200, 400), reply.status_code
                assert reply.text  # an answer, not a hang
