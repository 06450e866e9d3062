"""The command line: what a person can do beside the agent, and the server's light start."""

import json
import subprocess
import sys

import pytest

from fts_mcp.cli import main
from fts_mcp.config import Settings
from fts_mcp.core import Core
from fts_mcp.errors import FtsError
from tests.conftest import REPO, SAMPLE_CHAT


def test_server_module_never_imports_torch(fts_home):
    code = "import sys, fts_mcp.server, fts_mcp.cli; print(sorted(m for m in ('torch', 'transformers', 'peft', " \
           "'bitsandbytes', 'trl', 'huggingface_hub', 'matplotlib') if m in sys.modules))"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip() \
        == "[]"


def test_jobs_commands(fts_home, capsys):
    service = Core(Settings.from_env())
    job = service.training.start("acme/missing", str(SAMPLE_CHAT))  # fails in validation: offline, not cached
    service.close()
    assert main(["jobs", "list"]) == 0
    assert job.job_id in capsys.readouterr().out
    assert main(["jobs", "status", job.job_id, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["error"]["code"] == "model_unavailable"
    capsys.readouterr()
    log = fts_home / "jobs" / job.job_id / "worker.log"
    log.write_text("step 1 loss=2.0\nstep 2 loss=1.5\n")
    assert main(["jobs", "logs", job.job_id]) == 0
    assert capsys.readouterr().out == log.read_text()
    assert main(["jobs", "logs", "--follow", job.job_id]) == 0  # an ended job: prints it all once and returns
    assert capsys.readouterr().out == log.read_text()
    big = "".join(f"line {i:06d} " + "x" * 80 + "\n" for i in range(4000))  # ~360 KB, over the 256 KiB window
    log.write_text(big)
    assert main(["jobs", "logs", "--follow", job.job_id]) == 0
    assert capsys.readouterr().out == big  # --follow prints all of it, from the start
    assert main(["jobs", "cancel", job.job_id]) == 0  # cancelling an ended job leaves it as it was
    assert "failed" in capsys.readouterr().out
    assert main(["jobs", "status", "job-000000000000"]) == 2
    assert "no job job-000000000000" in capsys.readouterr().err
    assert main(["jobs", "list", "--limit", "0"]) == 2
    assert "limit" in capsys.readouterr().err


def test_readme_documents_the_commands_and_every_tool_argument():
    readme = (REPO / "README.md").read_text()
    for command in ("fts-mcp demo", "fts-mcp serve --transport", "fts-mcp jobs", "fts-mcp export-gguf",
                    "python -m pytest", "claude mcp add", "mcpServers", "docs/clients.md"):
        assert command in readme, command
    assert '"servers"' in (REPO / "docs" / "clients.md").read_text()  # VS Code's form
    import anyio

    from fts_mcp.server import mcp

    async def tools():
        return await mcp.list_tools()

    for tool in anyio.run(tools):
        assert f"`{tool.name}`" in readme, tool.name
        for argument in tool.input_schema["properties"]:
            assert f"`{argument}`" in readme, f"{tool.name}.{argument}"


@pytest.mark.extended  # CI's wheel smoke test runs the demo too, from the installed wheel
def test_demo_runs_end_to_end(fts_home):
    done = subprocess.run([sys.executable, "-m", "fts_mcp", "demo", "--steps", "40"], capture_output=True, text=True,
                          timeout=180, cwd=fts_home)
    assert done.returncode == 0, done.stdout + done.stderr
    for step in ("[1/8]", "[2/8] recommend_ft_vs_rag: neither_yet", "qlora", "[3/8] validate_dataset: ok=True",
                 "[4/8] start_qlora_job", "succeeded, step 40", "[6/8] evaluate_adapter", "exact match base",
                 "[7/8] merge_adapter", "max |logit diff|", "[8/8] deploy_adapter: demo-codewords@v",
                 "edge runtime up", "-> '", "try it: curl"):
        assert step in done.stdout, step


def test_deploy_adapters_and_merge_commands(fts_home, tiny_model, adapter_a, capsys, monkeypatch, tmp_path):
    store = tmp_path / "elsewhere" / "store"  # FTS_STORE, outside FTS_HOME: every command uses it
    monkeypatch.setenv("FTS_STORE", str(store))
    assert main(["deploy", str(adapter_a), "support", "--alias", "prod"]) == 0
    out = capsys.readouterr().out
    assert "support@v1 (as support:prod)  published" in out and "curl" in out and str(store) in out
    assert (store / "support" / "v1" / "manifest.json").is_file() and not (fts_home / "store").exists()
    assert main(["deploy", str(adapter_a), "support"]) == 0
    assert "already published" in capsys.readouterr().out
    assert main(["adapters"]) == 0
    assert "prod->v1" in capsys.readouterr().out
    assert main(["deploy", str(adapter_a), "Bad Name"]) == 2
    assert "name:" in capsys.readouterr().err
    assert main(["merge", str(fts_home), "--base-model", str(tiny_model)]) == 2
    assert "adapter_config.json" in capsys.readouterr().err
    from fts_mcp.core import Core

    with Core() as core:
        core.jobs.runner.tick = lambda: None  # the merge is only submitted: what matters is where it read from
        assert main(["merge", "support:prod", "--base-model", str(tiny_model), "--output-name", "m"]) == 0
        job = core.jobs.list(limit=1).jobs[0]
    assert job.kind == "merge" and job.spec["adapters"][0]["path"] == str(store / "support" / "v1")


def test_the_server_names_an_unreadable_job_database_at_start_up(fts_home):
    (fts_home / "jobs.sqlite3").write_bytes(b"garbage" * 1000)
    done = subprocess.run([sys.executable, "-m", "fts_mcp", "serve"], input="", capture_output=True, text=True,
                          timeout=60)
    assert str(fts_home / "jobs.sqlite3") in done.stderr and "fts-mcp jobs reindex" in done.stderr
    assert "Traceback" not in done.stderr


@pytest.mark.parametrize("url", ["http://127.0.0.1:9/store", "https://cdn.example/store", "s3://bucket/store"])
def test_a_store_url_in_fts_store_is_refused_by_what_publishes_and_kept_for_the_runtime(fts_home, adapter_a, capsys,
                                                                                         monkeypatch, tmp_path, url):
    """The server and `deploy` publish into the store: a URL there would become a folder named `http:` under the
    start folder, outside FTS_HOME and the roots. They refuse it, naming FTS_STORE; `edge serve` reads it."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("FTS_STORE", url)
    assert main(["deploy", str(adapter_a), "support"]) == 2
    assert "FTS_STORE" in capsys.readouterr().err
    assert main(["adapters"]) == 2
    assert "FTS_STORE" in capsys.readouterr().err
    assert not any(p.name.endswith(":") for p in tmp_path.rglob("*"))  # no `http:` folder anywhere
    done = subprocess.run([sys.executable, "-m", "fts_mcp", "serve"], input="", capture_output=True, text=True,
                          timeout=60)
    assert "FTS_STORE" in done.stderr and "Traceback" not in done.stderr  # said at start-up
    settings = Settings.from_env()
    if url.startswith("http"):
        assert settings.store_location == url  # `fts-mcp edge serve` without --store reads it
    else:
        with pytest.raises(FtsError, match="FTS_STORE"):
            settings.store_location  # noqa: B018 - the property refuses it


def test_edge_serve_takes_the_store_limits_from_its_flags(fts_home, tiny_model, monkeypatch):
    """A slow or far store, or adapters over 4 GiB: the runtime's store limits are set on its command line."""
    import fts_mcp.edge.api.server as server

    seen = []
    monkeypatch.setattr(server, "serve", seen.append)
    assert main(["edge", "serve", "--base", str(tiny_model), "--store-timeout", "40", "--store-retry-after", "2",
                 "--max-adapter-bytes", "8GiB"]) == 0
    assert (seen[0].store_deadline, seen[0].store_retry_after, seen[0].max_adapter_bytes) == (40.0, 2.0, 8 << 30)
    with pytest.raises(SystemExit):
        main(["edge", "serve", "--base", str(tiny_model), "--store-timeout", "0"])
