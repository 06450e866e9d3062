"""Every tool, fuzzed through the in-memory MCP client: each call gets an answer, no answer carries a
traceback, and every error names an argument. A few hundred examples per run, about a minute."""

import anyio
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from mcp import Client

from fts_mcp.server import mcp

pytestmark = pytest.mark.fuzz


async def _tools() -> dict:
    return {t.name: t for t in await mcp.list_tools()}  # no session: nothing opens FTS_HOME at collection


TOOLS = anyio.run(_tools)

NASTY = st.sampled_from([
    "", " ", "../../etc/passwd", "/etc/passwd", "/dev/zero", "/", "~", "x" * 300, "a/" * 200, "a\x00b",
    "name@v1", "name:prod", "../x@v1", "support@../../v1", "job-0123456789ab", "http://127.0.0.1:1", "ftp://x",
    "1" * 5000, "\u202e\u0000", "C:\\Windows", "{}", "null"])
JSON = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True) | st.text(max_size=50)
                    | NASTY, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10) | NASTY,
                                                                                         inner, max_size=4),
                    max_leaves=8)


def from_schema(schema: dict, defs: dict | None = None) -> st.SearchStrategy:
    """Values shaped by a tool's JSON schema (types, enums, bounds, nested models), mostly valid."""
    defs = defs if defs is not None else schema.get("$defs", {})
    if "$ref" in schema:
        return from_schema(defs[schema["$ref"].rsplit("/", 1)[-1]], defs)
    if "anyOf" in schema:
        return st.one_of([from_schema(s, defs) for s in schema["anyOf"]])
    if "enum" in schema or "const" in schema:
        return st.sampled_from(schema.get("enum") or [schema["const"]])
    kind = schema.get("type")
    if kind == "string":
        return st.text(min_size=schema.get("minLength", 0), max_size=schema.get("maxLength", 60)) | NASTY
    if kind == "integer":
        return st.integers(schema.get("minimum", schema.get("exclusiveMinimum", -10**6)),
                           schema.get("maximum", schema.get("exclusiveMaximum", 10**6)))
    if kind == "number":
        return st.floats(schema.get("minimum", 0), schema.get("maximum", 1e6), allow_nan=False)
    if kind == "boolean":
        return st.booleans()
    if kind == "null":
        return st.none()
    if kind == "array":
        return st.lists(from_schema(schema.get("items", {}), defs), max_size=3)
    if kind == "object" or "properties" in schema:
        properties = schema.get("properties", {})
        required = set(schema.get("required", []))
        return st.fixed_dictionaries({k: from_schema(v, defs) for k, v in properties.items() if k in required},
                                     optional={k: from_schema(v, defs) for k, v in properties.items()
                                               if k not in required})
    return JSON


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
        prefix = f"Error executing tool {name}: "
        assert text.startswith(prefix), text[:300]
        named = text[len(prefix):].split(":", 1)[0]  # errors read "<argument path>: <what is wrong>"
        root = named.split(".", 1)[0].split("[", 1)[0]
        assert root in TOOLS[name].input_schema.get("properties", {}) or root == "unexpected", \
            f"{name}: the error names {named!r}, not one of its arguments: {text[:300]}"


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
