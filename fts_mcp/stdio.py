"""The stdio transport, with a guard in front of the SDK's parser.

The SDK drops, without answering, a request it cannot parse: a lone UTF-16 surrogate escape (`"\\ud800"`), an
integer longer than Python converts (4,300 digits), JSON nested thousands deep. The client then waits
forever. Each line is checked here first; such a request gets a JSON-RPC error naming the problem (with its
id when one can be read), and everything else goes to the SDK unchanged. As the SDK does, the process's own
fd 0 and 1 are pointed away from the wire while serving (at /dev/null and stderr), so stray output from
libraries can never corrupt the protocol stream.
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

PARSE_ERROR = -32700
INVALID_PARAMS = -32602
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


def refusal(line: str) -> dict | None:
    """The JSON-RPC error to answer `line` with, or None when the SDK can take it."""
    try:
        message = json.loads(line)
    except RecursionError:
        where = _key_before(line, DEEP_RE) or "the request"
        problem, code, message = f"{where} is nested deeper than the server parses", PARSE_ERROR, None
    except ValueError as exc:
        if "integer string conversion" not in str(exc):
            return None  # plain malformed JSON: the SDK answers those itself
        where = _key_before(line, LONG_INT_RE) or "the request"
        problem, code, message = f"{where} holds an integer longer than 4,300 digits", PARSE_ERROR, None
    else:
        where = _surrogate(message, "")
        if where is None:
            return None
        problem, code = f"{where} holds a lone UTF-16 surrogate, which is not text", INVALID_PARAMS
    if isinstance(message, dict) and "id" not in message:
        return {}  # a notification: nothing to answer, nothing to forward
    request_id = message.get("id") if isinstance(message, dict) else None
    if request_id is None and (found := ID_RE.search(line)):
        request_id = json.loads(found.group(1))
    return {"jsonrpc": "2.0", "id": request_id, "error": {"code": code, "message": problem}}


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
        yield (TextIOWrapper(os.fdopen(wire_in, "rb"), encoding="utf-8", errors="replace"),
               TextIOWrapper(os.fdopen(wire_out, "wb"), encoding="utf-8"))
    finally:
        sys.stdout.flush()


async def run_stdio(server: MCPServer) -> None:
    with claimed_stdio() as (wire_in, wire_out):
        out = LockedWriter(anyio.wrap_file(wire_out))
        async with stdio_server(stdin=GuardedLines(anyio.wrap_file(wire_in), out), stdout=out) as (read, write):
            lowlevel = server._lowlevel_server  # MCPServer.run_stdio_async does exactly this with its own streams
            await lowlevel.run(read, write, lowlevel.create_initialization_options())
