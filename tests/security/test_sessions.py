"""Streamable HTTP sessions are bounded: a flood of `initialize` calls closes the least recently used idle sessions
instead of locking every new client out, one client address cannot take more than its share, and idle sessions
end. The rules on a miniature of the SDK's session manager, then through the real SDK in-process."""

import json
import uuid

import anyio
import httpx
import pytest
from mcp.server.mcpserver import MCPServer

from fts_mcp.config import SessionBounds
from fts_mcp.network import SessionLimits, http_app

pytestmark = pytest.mark.anyio
SESSION = b"mcp-session-id"


class MiniSessions:
    """What SessionLimits relies on in the SDK: a POST without a session id opens one (its id in the answer's
    `mcp-session-id`), DELETE ends one, an unknown id gets 404, and a GET holds its session until `release`."""

    def __init__(self) -> None:
        self.open: set[str] = set()
        self.release = anyio.Event()

    async def __call__(self, scope, receive, send) -> None:
        given = dict(scope["headers"]).get(SESSION, b"").decode() or None
        status, headers = 200, []
        if given is None and scope["method"] == "POST":
            given = uuid.uuid4().hex
            self.open.add(given)
            headers = [(SESSION, given.encode())]
        elif given not in self.open:
            status = 404
        elif scope["method"] == "DELETE":
            self.open.discard(given)
        elif scope["method"] == "GET":
            await self.release.wait()
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": b"{}"})


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        self.now += 1.0  # every reading is later than the one before: least recently used is well defined
        return self.now


async def call(app, method: str, session: str | None = None, client: str = "10.0.0.1") -> tuple[int, dict, bytes]:
    """One request straight through the ASGI app: (status, headers, body)."""
    headers = [(b"host", b"127.0.0.1:8000")] + ([(SESSION, session.encode())] if session else [])
    scope = {"type": "http", "method": method, "path": "/mcp", "raw_path": b"/mcp", "query_string": b"",
             "headers": headers, "client": (client, 40000), "server": ("127.0.0.1", 8000), "scheme": "http",
             "http_version": "1.1", "root_path": "", "asgi": {"version": "3.0"}}
    answer: dict = {"body": b""}
    asked = False

    async def receive():
        nonlocal asked
        if asked:
            await anyio.sleep_forever()
        asked = True
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message):
        if message["type"] == "http.response.start":
            answer["status"], answer["headers"] = message["status"], dict(message.get("headers", []))
        else:
            answer["body"] += message.get("body", b"")

    await app(scope, receive, send)
    return answer["status"], answer["headers"], answer["body"]


async def open_session(app, client: str = "10.0.0.1") -> str:
    status, headers, _ = await call(app, "POST", client=client)
    assert status == 200, status
    return headers[SESSION].decode()


def limited(total: int, per_client: int) -> tuple[SessionLimits, MiniSessions]:
    sdk = MiniSessions()
    return SessionLimits(sdk, SessionBounds(total=total, per_client=per_client), "/mcp", "127.0.0.1:8000",
                         clock=Clock()), sdk


async def test_a_flood_of_new_sessions_closes_the_oldest_idle_ones_and_never_locks_anyone_out():
    app, sdk = limited(total=3, per_client=3)
    sessions = [await open_session(app) for _ in range(10)]
    assert sdk.open == set(sessions[-3:])  # the SDK holds three, whatever the flood
    assert [(await call(app, "POST", s))[0] for s in sessions] == [404] * 7 + [200] * 3
    assert await open_session(app, client="10.0.0.2")  # a newcomer still gets in


async def test_the_least_recently_used_session_goes_first():
    app, sdk = limited(total=3, per_client=3)
    first, second, third = [await open_session(app) for _ in range(3)]
    assert (await call(app, "POST", first))[0] == 200  # first is now the most recently used
    fourth = await open_session(app)
    assert sdk.open == {first, third, fourth} and second not in sdk.open


async def test_busy_sessions_are_never_closed_and_a_newcomer_is_refused_only_while_all_are_busy():
    app, sdk = limited(total=2, per_client=2)
    held = [await open_session(app, client=f"10.0.0.{n}") for n in (1, 2)]
    async with anyio.create_task_group() as tg:
        for session in held:
            tg.start_soon(call, app, "GET", session)  # an open stream: the session is busy
        await anyio.wait_all_tasks_blocked()
        status, headers, body = await call(app, "POST", client="10.0.0.3")
        assert status == 503 and b"retry-after" in headers
        error = json.loads(body)
        assert error["id"] is None and "FTS_HTTP_MAX_SESSIONS" in error["error"]["message"]
        assert sdk.open == set(held)  # the refused session was closed again, the busy ones kept
        sdk.release.set()
    assert await open_session(app, client="10.0.0.3")  # once idle, room is made again


async def test_one_client_address_cannot_take_more_than_its_share():
    app, sdk = limited(total=10, per_client=2)
    other = await open_session(app, client="10.0.0.9")
    mine = [await open_session(app, client="10.0.0.1") for _ in range(3)]
    assert sdk.open == {other, *mine[1:]}  # its own oldest went, never another client's
    async with anyio.create_task_group() as tg:
        for session in mine[1:]:
            tg.start_soon(call, app, "GET", session)
        await anyio.wait_all_tasks_blocked()
        status, _, body = await call(app, "POST", client="10.0.0.1")
        assert status == 429 and "FTS_HTTP_MAX_SESSIONS_PER_CLIENT" in json.loads(body)["error"]["message"]
        assert await open_session(app, client="10.0.0.9")  # others are not held up
        sdk.release.set()


async def test_a_session_the_client_deletes_or_the_sdk_forgot_frees_its_place():
    app, sdk = limited(total=2, per_client=2)
    first, second = await open_session(app), await open_session(app)
    assert (await call(app, "DELETE", first))[0] == 200
    sdk.open.discard(second)  # ended by the SDK on its own (idle timeout): the next request learns it (404)
    assert (await call(app, "POST", second))[0] == 404
    assert not app.sessions


INIT = {"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {
    "protocolVersion": "2025-11-25", "capabilities": {}, "clientInfo": {"name": "t", "version": "1"}}}
HEADERS = {"Accept": "application/json, text/event-stream", "Content-Type": "application/json"}


async def test_through_the_sdk_old_sessions_are_closed_and_idle_ones_expire():
    server = MCPServer("bounded", log_level="WARNING")

    @server.tool()
    def ping() -> str:
        return "pong"

    app = http_app(server, "http", "127.0.0.1", 8000, None, [], [],
                   sessions=SessionBounds(total=2, per_client=2, idle_seconds=42.0))
    assert server.session_manager.session_idle_timeout == 42.0
    async with server.session_manager.run():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://127.0.0.1:8000") as http:
            sessions = []
            for _ in range(4):
                opened = await http.post("/mcp", json=INIT, headers=HEADERS)
                assert opened.status_code == 200, opened.text
                sessions.append(opened.headers["mcp-session-id"])
            listed = [await http.post("/mcp", json={"jsonrpc": "2.0", "id": 2, "method": "tools/list"},
                                      headers={**HEADERS, "mcp-session-id": s, "mcp-protocol-version": "2025-11-25"})
                      for s in sessions]
    assert [answer.status_code for answer in listed] == [404, 404, 200, 200]
    assert "ping" in listed[-1].text


def test_the_session_settings_are_read_checked_and_kept_consistent(tmp_path):
    from fts_mcp.config import Settings
    from fts_mcp.errors import InvalidArgument

    env = {"FTS_HOME": str(tmp_path), "FTS_GPUS": "none"}
    assert Settings.from_env(env).http_sessions == SessionBounds(total=64, per_client=16, idle_seconds=600.0)
    small = Settings.from_env({**env, "FTS_HTTP_MAX_SESSIONS": "4", "FTS_HTTP_SESSION_IDLE_SECONDS": "30"})
    assert small.http_sessions == SessionBounds(total=4, per_client=4, idle_seconds=30.0)  # a share fits the whole
    for name, value in (("FTS_HTTP_MAX_SESSIONS", "0"), ("FTS_HTTP_MAX_SESSIONS_PER_CLIENT", "many"),
                        ("FTS_HTTP_SESSION_IDLE_SECONDS", "0")):
        with pytest.raises(InvalidArgument) as refused:
            Settings.from_env({**env, name: value})
        assert refused.value.param == name
