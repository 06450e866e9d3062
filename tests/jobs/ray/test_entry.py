"""The cluster side checks its own Python before it runs a job: what is missing is named with the way to provide it,
and the job fails with that at once (the real cluster, with a Python that lacks torch, is in test_cluster.py)."""

import subprocess
import sys

import pytest

from fts_mcp.config import Settings
from fts_mcp.jobs.ray import entry
from fts_mcp.jobs.ray.runner import Follower
from fts_mcp.jobs.states import JobState
from fts_mcp.jobs.store import JobStore


def without(*names: str):
    """A find_spec for a Python that lacks `names` (the others are there)."""
    return lambda module: None if module in names else object()


def hidden(*names: str):
    """A find_spec as an import hook that hides `names` makes it: it raises."""
    def find(module):
        if module in names:
            raise ModuleNotFoundError(f"No module named {module!r}", name=module)
        return object()
    return find


def test_a_python_with_everything_runs_the_job():
    assert entry.check_environment({"server_version": entry.fts_mcp.__version__}, find_spec=without()) is None


@pytest.mark.parametrize("find_spec", [without("torch"), hidden("torch")])
def test_a_python_without_torch_is_told_how_to_provide_it(find_spec):
    said = entry.check_environment({}, find_spec=find_spec, executable="/usr/bin/python3", python=(3, 12, 1))
    assert said.startswith("the cluster's Python (/usr/bin/python3, 3.12.1) lacks torch, which fts-mcp's jobs import")
    assert """FTS_RAY_RUNTIME_ENV='{"pip": ["torch"]}'""" in said and "`ray start` from a shell" in said


def test_every_missing_package_is_named_at_once_by_the_name_it_installs_by():
    said = entry.check_environment({}, find_spec=without("peft", "huggingface_hub", "bitsandbytes"))
    assert "lacks peft, huggingface-hub, bitsandbytes" in said
    assert '["peft", "huggingface-hub", "bitsandbytes"]' in said


def test_an_old_python_or_another_fts_mcp_is_refused():
    old = entry.check_environment({}, find_spec=without(), python=(3, 10, 12))
    assert "older than fts-mcp's 3.11.4" in old
    other = entry.check_environment({"server_version": "9.9.9"}, find_spec=without(), version="0.1.0")
    assert "fts-mcp 0.1.0, the server is 9.9.9" in other and "uninstall fts-mcp there" in other


def test_the_entrypoint_imports_nothing_the_check_looks_for_before_it_checks():
    code = ("import sys, fts_mcp.jobs.ray.entry; "
            f"print(sorted(m for m in {sorted(entry.NEEDED)!r} if m in sys.modules))")
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          check=True).stdout.strip() == "[]"


def test_its_refusal_reaches_the_server_as_the_jobs_failure(tmp_path, capsys):
    entry.fail("the cluster's Python lacks torch")
    line = capsys.readouterr().out
    store = JobStore(Settings.from_env({"FTS_HOME": str(tmp_path / "home"), "FTS_GPUS": "none"}))
    try:
        job = store.create("train", {"output_name": "x"})
        follower = Follower(store, job)
        follower.text(line, 0)
        follower.end()
        state, error, _ = follower.outcome("FAILED", "Job entrypoint command failed with exit code 1", False)
    finally:
        store.close()
    assert state == JobState.FAILED and error.code == "ray_environment" and error.param == "FTS_RAY_RUNTIME_ENV"
    assert error.message == "the cluster's Python lacks torch"
