"""The MCP Inspector CLI (npm @modelcontextprotocol/inspector, installed by .ci/run) against our server."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from fts_mcp.config import Settings
from fts_mcp.core import Core
from tests.conftest import REPO, SAMPLE_CHAT
from tests.test_transports import http_server

INSPECTOR = REPO / "node_modules" / ".bin" / "mcp-inspector"


@pytest.fixture
def inspector():
    if not INSPECTOR.exists():
        if os.environ.get("CI"):
            pytest.fail("the MCP Inspector is not installed; .ci/run runs `npm install` first")
        pytest.skip("run `npm install` to install the MCP Inspector")
    return [str(INSPECTOR), "--cli"]


def run(command: list[str]) -> dict:
    done = subprocess.run(command, capture_output=True, text=True, timeout=120, env=dict(os.environ))
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def stdio_target(home: Path) -> list[str]:
    return ["-e", f"FTS_HOME={home}", "--", sys.executable, "-m", "fts_mcp", "serve"]


@pytest.fixture
def job_id(fts_home) -> str:
    """A job on record (it failed validation: its hub model is not cached on this offline host)."""
    service = Core(Settings.from_env())
    job = service.training.start("acme/not-cached", str(SAMPLE_CHAT))
    service.close()
    return job.job_id


def test_inspector_lists_tools_and_calls_job_status_over_stdio(fts_home, inspector, job_id):
    listed = run([*inspector, "--method", "tools/list", *stdio_target(fts_home)])
    assert {"validate_dataset", "start_qlora_job", "job_status", "list_jobs", "cancel_job"} <= \
        {t["name"] for t in listed["tools"]}
    status = run([*inspector, "--method", "tools/call", "--tool-name", "job_status", "--tool-arg",
                  f"job_id={job_id}", *stdio_target(fts_home)])
    assert status["structuredContent"]["job_id"] == job_id
    assert status["structuredContent"]["error"]["code"] == "model_unavailable"


def test_inspector_over_streamable_http(fts_home, inspector, job_id):
    with http_server("--transport", "http") as port:
        url = f"http://127.0.0.1:{port}/mcp"
        listed = run([*inspector, url, "--transport", "http", "--method", "tools/list"])
        assert "job_status" in {t["name"] for t in listed["tools"]}
        status = run([*inspector, url, "--transport", "http", "--method", "tools/call", "--tool-name", "job_status",
                      "--tool-arg", f"job_id={job_id}"])
        assert status["structuredContent"]["state"] == "failed"
