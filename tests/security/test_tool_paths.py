"""Every tool argument that names a file, a folder, an adapter or a store reference refuses what lies outside
the roots (or the store), names the argument, and reads nothing there."""

import subprocess
import sys
from pathlib import Path

import pytest
from mcp import Client

from fts_mcp.config import default_roots
from fts_mcp.server import mcp

pytestmark = pytest.mark.anyio

OUTSIDE = ["/etc/passwd", "../../../../etc/passwd", "~/.ssh/id_rsa", "/dev/zero", "x" * 300, "a\x00b"]
REFS = ["/etc", "../../etc", "..", "name@../../v1", "name:../x", "Name With Spaces", "x" * 300]
# (tool, argument, other required arguments, values to try)
CASES = [
    ("validate_dataset", "path", {}, OUTSIDE),
    ("validate_dataset", "base_model", {"path": "{data}"}, OUTSIDE),
    ("start_qlora_job", "dataset", {"base_model": "{model}"}, OUTSIDE),
    ("start_qlora_job", "base_model", {"dataset": "{data}"}, OUTSIDE),
    ("estimate_resources", "base_model", {}, OUTSIDE),
    ("merge_adapter", "adapter", {}, OUTSIDE + REFS),
    ("merge_adapter", "base_model", {"adapter": "{adapter}"}, OUTSIDE),
    ("deploy_adapter", "adapter", {"name": "ok"}, OUTSIDE + REFS),
    ("deploy_adapter", "name", {"adapter": "{adapter}"}, REFS),
    ("list_adapters", "name", {}, REFS),
    ("generate", "model", {"prompt": "hi"}, REFS),
    ("generate", "base_model", {"model": "base", "prompt": "hi"}, OUTSIDE),
]


@pytest.fixture
def anyio_backend():
    return "asyncio"


@pytest.mark.parametrize("tool, argument, others, values", CASES, ids=[f"{c[0]}.{c[1]}" for c in CASES])
async def test_arguments_that_name_files_or_adapters_stay_inside(fts_home, tiny_model, adapter_a, tool, argument,
                                                                 others, values):
    data = Path(__file__).resolve().parents[2] / "resources" / "datasets" / "codewords_chat.jsonl"
    fill = {"{data}": str(data), "{model}": str(tiny_model), "{adapter}": str(adapter_a)}
    async with Client(mcp) as client:
        for value in values:
            args = {k: fill.get(v, v) for k, v in others.items()} | {argument: value}
            result = await client.call_tool(tool, args)
            text = result.content[0].text
            assert result.is_error, (tool, argument, value, text[:300])
            assert argument in text, (tool, argument, value, text[:300])
            assert "root:" not in text and "Traceback" not in text  # nothing of /etc/passwd, no crash
        listed = (await client.call_tool("list_jobs", {})).structured_content["jobs"]
        assert all(j["state"] == "failed" for j in listed)  # nothing outside was ever queued


@pytest.mark.parametrize("cwd, expected", [
    ("/", ("/srv/fts",)),  # desktop clients often start servers in /
    ("/home/me", ("/srv/fts",)),  # ... or in the user's home
    ("/srv/fts", ("/srv/fts",)),
    ("/home", ("/srv/fts",)),  # an ancestor of home holds it (and every other user's)
    ("/home/me/project", ("/srv/fts", "/home/me/project")),
])
def test_the_working_directory_is_a_root_only_when_it_is_not_slash_or_home(cwd, expected):
    roots = default_roots(Path("/srv/fts"), Path(cwd), Path("/home/me"))
    assert roots == tuple(Path(p) for p in expected)


def test_the_server_says_which_roots_are_in_force(fts_home, monkeypatch):
    monkeypatch.delenv("FTS_ROOTS")
    done = subprocess.run([sys.executable, "-m", "fts_mcp", "serve"], input="", capture_output=True, text=True,
                          timeout=60, cwd="/")
    assert f"path arguments must lie inside: {fts_home}" in done.stderr
    assert f"{fts_home}, /" not in done.stderr  # / is never a root implicitly


def test_fts_home_stays_a_root_when_fts_roots_is_set(tmp_path):
    from fts_mcp.config import Settings

    settings = Settings.from_env({"FTS_HOME": str(tmp_path / "home"), "FTS_ROOTS": str(tmp_path / "data")})
    assert settings.roots == ((tmp_path / "home").resolve(), (tmp_path / "data").resolve())


@pytest.mark.parametrize("check, value", [
    ("output_name", "nlname\n"),
    ("output_name", "merged\r\n"),
    ("hub_id", "org/name\n"),
    ("hub_id", "gpt2\n"),
    ("module", "q_proj\n"),
])
def test_names_with_a_trailing_newline_are_refused(tmp_path, check, value):
    """`$` also matches before a final newline: every name check must match the whole string."""
    from pydantic import TypeAdapter, ValidationError

    from fts_mcp.config import Settings
    from fts_mcp.errors import InvalidArgument
    from fts_mcp.models.refs import resolve_model_argument
    from fts_mcp.names import check_output_name
    from fts_mcp.training.spec import ModuleName

    if check == "module":
        with pytest.raises(ValidationError):
            TypeAdapter(ModuleName).validate_python(value)
        return
    with pytest.raises(InvalidArgument) as refused:
        if check == "output_name":
            check_output_name(value)
        else:
            resolve_model_argument(value, Settings.from_env({"FTS_HOME": str(tmp_path), "FTS_GPUS": "none"}))
    assert refused.value.param == ("output_name" if check == "output_name" else "base_model")
