"""Requests the MCP SDK cannot parse still get an answer, over stdio and HTTP, and the server keeps serving."""

import json
import os
import select
import subprocess
import sys

import httpx
import pytest

from fts_mcp.stdio import refusal
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

# (raw line, error code, the id the answer carries, words of its message): malformed requests the SDK would drop
MALFORMED = [
    (b'[{"jsonrpc":"2.0","id":5,"method":"tools/list"}]', -32600, None, "batch"),
    (b"[]", -32600, None, "batch"),
    (b'{"jsonrpc":"2.0","id":{"a":1},"method":"tools/list"}', -32600, None, "id must be a string or an integer"),
    (b'{"jsonrpc":"2.0","id":[1],"method":"tools/list"}', -32600, None, "id must be a string or an integer"),
    (b'{"jsonrpc":"2.0","id":true,"method":"tools/list"}', -32600, None, "id must be a string or an integer"),
    (b'{"jsonrpc":"2.0","id":1.5,"method":"tools/list"}', -32600, None, "id must be a string or an integer"),
    (b'{"jsonrpc":"2.0","id":null,"method":"tools/list"}', -32600, None, "id must be a string or an integer"),
    (b'{"jsonrpc":"2.0","id":6,"method":"tools/list","params":{"cursor":"\xff"}}', -32700, 6, "UTF-8"),
    (b"\xff\xfe", -32700, None, "UTF-8"),
    (b"nonsense", -32700, None, "not JSON"),
    (b"42", -32600, None, "a JSON object"),
    (b'{"jsonrpc":"2.0","id":7,"method":"tools/list","params":5}', -32600, 7, "JSON-RPC"),
    (b'{"id":8}', -32600, 8, "JSON-RPC"),
]


@pytest.mark.parametrize("line, code, request_id, words", MALFORMED)
def test_each_malformed_line_has_its_answer(line, code, request_id, words):
    reply = refusal(line.decode("utf-8", "surrogateescape"))
    assert reply["id"] == request_id and reply["error"]["code"] == code and words in reply["error"]["message"]


@pytest.mark.parametrize("line", ["", "   ", '{"jsonrpc":"2.0","method":"notifications/initialized"}',
                                  '{"jsonrpc":"2.0","id":"a","method":"tools/list"}',
                                  '{"jsonrpc":"2.0","id":3,"result":{}}'])
def test_well_formed_lines_and_blank_ones_get_no_refusal(line):
    assert not refusal(line)


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


def test_stdio_answers_every_malformed_line(fts_home):
    """A batch, an id that is not a string or an integer, bytes that are not UTF-8, a line that is not JSON: each
    gets a JSON-RPC error (with its id when one can be read), and the server goes on serving."""
    server = subprocess.Popen([sys.executable, "-m", "fts_mcp", "serve"], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=dict(os.environ))

    def answer(timeout: float = 15) -> dict:
        ready, _, _ = select.select([server.stdout], [], [], timeout)
        assert ready, "no answer: the client would hang"
        return json.loads(server.stdout.readline())

    try:
        server.stdin.write(json.dumps(INIT).encode() + b"\n"
                           + b'{"jsonrpc":"2.0","method":"notifications/initialized"}\n')
        server.stdin.flush()
        assert answer()["id"] == 1
        for line, code, request_id, words in MALFORMED:
            server.stdin.write(line + b"\n")
            server.stdin.flush()
            reply = answer()
            assert reply["id"] == request_id and reply["error"]["code"] == code, (line, reply)
            assert words in reply["error"]["message"], (line, reply)
        server.stdin.write(b'{"jsonrpc":"2.0","id":9,"method":"tools/list"}\n')
        server.stdin.flush()
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


@pytest.mark.anyio
@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_http_answers_every_malformed_request_with_a_json_rpc_error(fts_home):
    """Over HTTP the SDK took an object `id` for a notification (202, no body): every malformed request gets a
    JSON-RPC error body instead."""
    with http_server("--transport", "http") as port:
        headers = {"Accept": "application/json, text/event-stream", "Content-Type": "application/json"}
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=20) as http:
            init = await http.post("/mcp", json=INIT, headers=headers)
            session = {"mcp-session-id": init.headers["mcp-session-id"]}
            for line, code, request_id, words in MALFORMED:
                reply = await http.post("/mcp", content=line, headers={**headers, **session})
                assert reply.status_code == 400, (line, reply.status_code, reply.text)
                error = reply.json()
                assert error["id"] == request_id and error["error"]["code"] == code, (line, error)
                assert words in error["error"]["message"], (line, error)
            listed = await http.post("/mcp", json={"jsonrpc": "2.0", "id": 9, "method": "tools/list"},
                                     headers={**headers, **session, "mcp-protocol-version": "2025-11-25"})
            assert listed.status_code == 200 and "validate_dataset" in listed.text  # still serving
