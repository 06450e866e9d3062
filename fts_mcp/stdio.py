"""The stdio transport, with a guard in front of the SDK's parser.

The SDK drops, without answering, every message it cannot parse: a line that is not JSON or not UTF-8, a batch
(an array; MCP has had none since 2025-06-18), an `id` that is an object, `true` or `null` (it reads those as a
notification), an envelope that is not JSON-RPC, a lone UTF-16 surrogate escape (`"\\ud800"`), an integer longer
than Python converts (4,300 digits), JSON nested thousands deep. The client then waits forever. Each line is
checked here first (`refusal`); such a request gets a JSON-RPC error naming the problem (-32700 parse error,
-32600 invalid request, with its id when one can be read, else null), and everything else goes to the SDK
unchanged. The HTTP transports put the same check in front of the SDK (`fts_mcp.network.JsonRpcGuard`). As the SDK
does, the process's own fd 0 and 1 are pointed away from the wire while serving (at /dev/null and stderr), so
stray output from libraries can never corrupt the protocol stream.
"""

from __future__ import annotations

import json
import os
import re
import sys
from contextlib import contextmanager
from io import TextIOWrapper
from typing import Any

import anyio
from mcp.server.mcpserver import MCPServer
from mcp.server.stdio import stdio_server
from mcp_types import jsonrpc_message_adapter
from pydantic import ValidationError

PARSE_ERROR = -32700
INVALID_REQUEST = -32600
INVALID_PARAMS = -32602
NOT_UTF8_RE = re.compile(r"[\udc80-\udcff]")  # bytes not UTF-8, as the wire's surrogateescape decoding shows them
JSON_TYPES = {dict: "an object", list: "an array", str: "a string", bool: "a boolean", int: "a number",
              float: "a non-integer number", type(None): "null"}
ID_RE = re.compile(r'"id"\s*:\s*("(?:[^"\\]|\\.){0,200}"|-?\d{1,30})')
LONG_INT_RE = re.compile(r'"([^"\\]{1,100})"\s*:\s*-?\d{4300}')
DEEP_RE = re.compile(r'"([^"\\]{1,100})"\s*:\s*[\[{\s]{200}')


def _key_before(line: str, pattern: re.Pattern) -> str | None:
    """The name of the member holding what could not be parsed (the argument an agent must change)."""
    found = pattern.search(line)
    return found.group(1) if found else None


def _surrogate(value: Any, where: str) -> str | None:
    """Where the first string holding a lone surrogate is, if any."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return where
        return None
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    for key, item in items:
        if found := _surrogate(item, f"{where}.{key}" if where else str(key)):
            return found
    return None


def _valid_id(value: Any) -> bool:
    """JSON-RPC ids in MCP are strings or integers (JSON's `true` is not one, nor is 1.5, null or an object)."""
    return isinstance(value, str) or (isinstance(value, int) and not isinstance(value, bool))


def _error(request_id: Any, code: int, problem: str) -> dict:
    return {"jsonrpc": "2.0", "id": request_id, "error": {"code": code, "message": problem}}


def _parse_error(line: str, problem: str) -> dict:
    """-32700, with the request's id when one can be read from the text (so its caller stops waiting), else null."""
    request_id = None
    if found := ID_RE.search(line):
        try:
            request_id = json.loads(found.group(1))
        except ValueError:  # an id string with a bad escape: no id can be read
            pass
    return _error(request_id, PARSE_ERROR, problem)


def refusal(line: str) -> dict | None:
    """The JSON-RPC error to answer `line` with; `{}` for a notification to drop unanswered; None when the SDK can
    take the line."""
    if not line.strip():
        return {}  # a blank line carries no message: nothing to answer
    if NOT_UTF8_RE.search(line):
        return _parse_error(line, "the request is not UTF-8 text; send JSON encoded as UTF-8")
    try:
        message = json.loads(line)
    except RecursionError:
        where = _key_before(line, DEEP_RE) or "the request"
        return _parse_error(line, f"{where} is nested deeper than the server parses")
    except ValueError as exc:
        if "integer string conversion" in str(exc):
            where = _key_before(line, LONG_INT_RE) or "the request"
            return _parse_error(line, f"{where} holds an integer longer than 4,300 digits")
        return _parse_error(line, f"the request is not JSON: {exc}")
    if isinstance(message, list):
        return _error(None, INVALID_REQUEST, "a batch (a JSON array) is not accepted: MCP takes one JSON-RPC message "
                                             "at a time (over stdio, one per line)")
    if not isinstance(message, dict):
        return _error(None, INVALID_REQUEST, f"a JSON-RPC message is a JSON object, not {JSON_TYPES[type(message)]}")
    request_id = message.get("id")
    if "id" in message and not _valid_id(request_id):
        return _error(None, INVALID_REQUEST, f"id must be a string or an integer, got {JSON_TYPES[type(request_id)]}")
    if (where := _surrogate(message, "")) is not None:
        if request_id is None:
            return {}  # a notification: nothing to answer, nothing to forward
        return _error(request_id, INVALID_PARAMS, f"{where} holds a lone UTF-16 surrogate, which is not text")
    try:
        jsonrpc_message_adapter.validate_python(message, by_name=False)  # what the SDK parses each line with
    except ValidationError:
        return _error(request_id, INVALID_REQUEST, 'not a JSON-RPC 2.0 message: a request is {"jsonrpc": "2.0", '
                                                   '"id": string or integer, "method": string, "params": object}')
    return None


class LockedWriter:
    """The wire: whole lines, one writer at a time (the SDK's replies and the guard's refusals)."""

    def __init__(self, file: anyio.AsyncFile[str]) -> None:
        self.file, self.lock = file, anyio.Lock()

    async def write(self, text: str) -> None:
        async with self.lock:
            await self.file.write(text)
            await self.file.flush()

    async def flush(self) -> None:
        pass


class GuardedLines:
    """stdin's lines, minus those the SDK would drop unanswered (answered here instead)."""

    def __init__(self, file: anyio.AsyncFile[str], out: LockedWriter) -> None:
        self.file, self.out = file, out

    async def __aiter__(self):
        async for line in self.file:
            answer = refusal(line)
            if answer is None:
                yield line
            elif answer:
                await self.out.write(json.dumps(answer) + "\n")


@contextmanager
def claimed_stdio():
    """Private copies of fd 0 and 1 for the protocol; the originals pointed at /dev/null and stderr meanwhile."""
    wire_in, wire_out = os.dup(0), os.dup(1)
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    os.close(null)
    os.dup2(2, 1)
    try:
        yield (TextIOWrapper(os.fdopen(wire_in, "rb"), encoding="utf-8", errors="surrogateescape"),  # see NOT_UTF8_RE
               TextIOWrapper(os.fdopen(wire_out, "wb"), encoding="utf-8"))
    finally:
        sys.stdout.flush()


async def run_stdio(server: MCPServer) -> None:
    with claimed_stdio() as (wire_in, wire_out):
        out = LockedWriter(anyio.wrap_file(wire_out))
        async with stdio_server(stdin=GuardedLines(anyio.wrap_file(wire_in), out), stdout=out) as (read, write):
            lowlevel = server._lowlevel_server  # MCPServer.run_stdio_async does exactly this with its own streams
            await lowlevel.run(read, write, lowlevel.create_initialization_options())
