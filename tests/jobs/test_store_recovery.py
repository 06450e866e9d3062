"""A lost or corrupt job database: one clear message naming the file and the fix, and a rebuild from the job
folders (each job's spec.json and result.json) that loses no job."""

import json

import pytest
from mcp import Client

from fts_mcp.cli import main
from fts_mcp.config import Settings
from fts_mcp.jobs.records import Artifacts, JobError
from fts_mcp.jobs.states import JobState
from fts_mcp.jobs.store import JobStore, StoreUnavailable


def three_jobs(settings: Settings) -> dict[str, str]:
    """A succeeded, a failed and a cancelled job, as their workers and the server would leave them."""
    store = JobStore(settings)
    states = {}
    for target in ("succeeded", "failed", "cancelled"):
        job = store.create("train", {"output_name": target})
        store.transition(job.job_id, JobState.QUEUED)
        if target != "cancelled":
            store.claim_next(settings.slots)
        store.transition(job.job_id, JobState(target),
                         error=JobError(code="boom", message="it broke") if target == "failed" else None,
                         artifacts=Artifacts(adapter_dir="/x/adapter") if target == "succeeded" else None)
        states[job.job_id] = target
    store.close()
    return states


def corrupt(settings: Settings, how: str) -> None:
    path = settings.db_path
    for suffix in ("-wal", "-shm"):
        path.with_name(path.name + suffix).unlink(missing_ok=True)
    if how == "truncated":
        path.write_bytes(path.read_bytes()[:1000])
    elif how == "garbage header":
        path.write_bytes(b"this is not sqlite" * 300)
    elif how == "directory":
        path.unlink()
        path.mkdir()
    elif how == "malformed pages":
        data = bytearray(path.read_bytes())
        data[4096:8192] = b"\xff" * 4096
        path.write_bytes(bytes(data))


@pytest.fixture
def settings(fts_home):
    return Settings.from_env()


@pytest.mark.parametrize("how", ["truncated", "garbage header", "directory", "malformed pages"])
def test_a_corrupt_database_is_named_with_the_fix(settings, how):
    three_jobs(settings)
    store = JobStore(settings)
    store._db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    store.close()
    corrupt(settings, how)
    with pytest.raises(StoreUnavailable) as info:
        JobStore(settings)
    assert str(settings.db_path) in info.value.message and "fts-mcp jobs reindex" in info.value.message


@pytest.mark.anyio
@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_the_server_still_answers_with_the_reason(settings):
    from fts_mcp.server import mcp

    three_jobs(settings)
    corrupt(settings, "garbage header")
    async with Client(mcp) as client:
        for tool, args in (("list_jobs", {}), ("job_status", {"job_id": "job-000000000000"})):
            result = await client.call_tool(tool, args)
            assert result.is_error and "fts-mcp jobs reindex" in result.content[0].text
            assert "Traceback" not in result.content[0].text
        advice = await client.call_tool("recommend_ft_vs_rag", {"output_format": True})
        assert not advice.is_error  # planning needs no job store


def test_an_empty_database_is_rebuilt_from_the_job_folders(settings):
    states = three_jobs(settings)
    for suffix in ("", "-wal", "-shm"):
        settings.db_path.with_name(settings.db_path.name + suffix).unlink(missing_ok=True)
    settings.db_path.write_bytes(b"")  # zero length: SQLite would silently start over
    store = JobStore(settings)
    listed = {j.job_id: j for j in store.list(limit=10).jobs}
    assert {i: j.state for i, j in listed.items()} == states
    failed = next(j for j in listed.values() if j.state == "failed")
    assert failed.error.code == "boom"
    assert next(j for j in listed.values() if j.state == "succeeded").artifacts.adapter_dir == "/x/adapter"
    store.close()


def test_reindex_moves_a_corrupt_database_aside_and_recovers_every_job(settings, capsys):
    states = three_jobs(settings)
    store = JobStore(settings)
    store._db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    store.close()
    corrupt(settings, "garbage header")
    assert main(["jobs", "list"]) == 2
    assert "fts-mcp jobs reindex" in capsys.readouterr().err
    assert main(["jobs", "reindex"]) == 0
    out = capsys.readouterr().out
    assert "moved the unreadable" in out and "3 job(s) on record" in out
    assert list(settings.home.glob("jobs.sqlite3.unreadable-*"))  # kept, not deleted
    assert main(["jobs", "list", "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)["jobs"]
    assert {j["job_id"]: j["state"] for j in listed} == states
