"""Every tool, fuzzed through the in-memory MCP client: each call gets an answer, no answer carries a
traceback, and every error names an argument. A few hundred examples per run, about a minute."""

import anyio
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis_jsonschema import from_schema
from mcp import Client

from fts_mcp.server import mcp

pytestmark = pytest.mark.fuzz


async def _tools() -> dict:
    async with Client(mcp) as client:
        return {t.name: t for t in (await client.list_tools()).tools}


TOOLS = anyio.run(_tools)

NASTY = st.sampled_from([
    "", " ", "../../etc/passwd", "/etc/passwd", "/dev/zero", "/", "~", "x" * 300, "a/" * 200, "a\x00b", "\ud800",
    "name@v1", "name:prod", "../x@v1", "support@../../v1", "job-0123456789ab", "http://127.0.0.1:1", "ftp://x",
    "1" * 5000, "\u202e\u0000", "C:\\Windows", "{}", "null"])
JSON = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True) | st.text(max_size=50)
                    | NASTY, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10) | NASTY,
                                                                                         inner, max_size=4),
                    max_leaves=8)


def wild(schema: dict) -> st.SearchStrategy[dict]:
    """Arguments with the tool's own names but any JSON values (wrong types, traversal, huge, odd unicode)."""
    names = list(schema.get("properties", {})) + ["unexpected"]
    return st.dictionaries(st.sampled_from(names), JSON | NASTY, max_size=len(names))


def arguments(name: str) -> st.SearchStrategy[dict]:
    schema = TOOLS[name].input_schema
    return st.one_of(from_schema(schema), wild(schema))


def check(name: str, result) -> None:
    text = " ".join(getattr(c, "text", "") for c in result.content)
    assert "Traceback" not in text and 'File "/' not in text, text[:500]
    if result.is_error:
        assert text.strip() != f"Error executing tool {name}", "an error that says nothing"
        properties = TOOLS[name].input_schema.get("properties", {})
        assert any(p in text for p in properties) or "unexpected" in text, f"{name}: {text[:300]}"


@pytest.mark.parametrize("name", sorted(TOOLS))
@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                  HealthCheck.too_slow])
@given(data=st.data())
def test_every_call_gets_an_answer_that_names_the_argument(fts_home, name, data):
    args = data.draw(arguments(name) if name != "job_status" else
                     arguments(name).map(lambda a: {**a, "wait_seconds": 0}))  # no long-polls while fuzzing
    if name == "generate":
        args = {**args, "timeout_seconds": 5}

    async def call():
        async with Client(mcp) as client:
            with anyio.fail_after(60):
                return await client.call_tool(name, args)

    check(name, anyio.run(call))
