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


def forget_the_database(settings: Settings) -> None:
    for suffix in ("", "-wal", "-shm"):
        settings.db_path.with_name(settings.db_path.name + suffix).unlink(missing_ok=True)


@pytest.mark.parametrize("content", [b'{"state": "succ', b'{"state": "succeeded", "artifacts": ["x"]}',
                                     b'{"state": "queued"}', b"[]"])
def test_reindex_reads_an_unreadable_result_as_an_interrupted_job_naming_the_file(settings, content):
    states = three_jobs(settings)
    broken = next(i for i, s in states.items() if s == "succeeded")
    result = settings.job_dir(broken) / "result.json"
    result.write_bytes(content)
    forget_the_database(settings)
    store = JobStore(settings)  # a fresh database reindexes itself
    job = store.get(broken)
    assert job.state == "interrupted" and job.resumable and job.error.code == "result_unreadable"
    assert str(result) in job.error.message
    aside = list(settings.job_dir(broken).glob("result.json.corrupt-*"))
    assert len(aside) == 1 and aside[0].read_bytes() == content
    assert {j.job_id: j.state for j in store.list(limit=10).jobs} == {**states, broken: "interrupted"}
    store.close()


def trained_job_with_metrics(settings: Settings) -> str:
    """A succeeded training job whose folder holds metrics.json as the training recipe writes it (the trainer's
    log history: losses, an evaluation, the closing summary)."""
    store = JobStore(settings)
    job = store.create("train", {"output_name": "t"})
    store.transition(job.job_id, JobState.QUEUED)
    store.claim_next(settings.slots)
    folder = settings.job_dir(job.job_id)
    history = [{"loss": 2.5, "grad_norm": 1.0, "learning_rate": 0.01, "epoch": 0.5, "step": 5},
               {"loss": 1.5, "grad_norm": 0.8, "learning_rate": 0.01, "epoch": 1.0, "step": 10},
               {"eval_loss": 1.7, "eval_runtime": 0.1, "epoch": 1.0, "step": 10},
               {"loss": 0.5, "grad_norm": 0.5, "learning_rate": 0.005, "epoch": 2.0, "step": 20},
               {"train_runtime": 10.0, "train_loss": 1.4, "epoch": 2.0, "step": 20}]
    (folder / "metrics.json").write_text(json.dumps({
        "steps": 20, "epochs": 2.0, "train_loss": 1.4, "final_loss": 0.5, "eval_loss": 1.6, "tokens_seen": 5000,
        "train_runtime_seconds": 10.0, "log_history": history}))
    store.transition(job.job_id, JobState.SUCCEEDED, artifacts=Artifacts(metrics=str(folder / "metrics.json")))
    store.close()
    return job.job_id


def test_reindex_restores_progress_and_the_loss_history_from_metrics(settings):
    job_id = trained_job_with_metrics(settings)
    forget_the_database(settings)
    store = JobStore(settings)
    job = store.get(job_id)
    assert (job.state, job.progress.step, job.progress.total_steps) == ("succeeded", 20, 20)
    assert (job.progress.loss, job.progress.eval_loss, job.progress.epoch) == (0.5, 1.6, 2.0)
    assert job.progress.learning_rate == 0.005 and job.progress.tokens_per_second == 500.0
    points = store.events(job_id, kind="progress")
    assert [(p["step"], p.get("loss"), p.get("eval_loss")) for p in points] == \
        [(5, 2.5, None), (10, 1.5, None), (10, None, 1.7), (20, 0.5, None)]
    assert all(p["logged"] for p in points if "loss" in p)  # what the loss curve draws
    store.close()


@pytest.mark.parametrize("metrics", ['{"steps": "many", "log_history": [1, {"loss": "x", "step": 2}]}', "{", "[]"])
def test_reindex_skips_what_it_cannot_read_in_metrics(settings, metrics):
    job_id = trained_job_with_metrics(settings)
    (settings.job_dir(job_id) / "metrics.json").write_text(metrics)
    forget_the_database(settings)
    store = JobStore(settings)
    job = store.get(job_id)
    assert job.state == "succeeded" and job.progress.step == 0 and store.events(job_id, kind="progress") == []
    store.close()


def test_reindex_restores_a_preference_jobs_reward_margin_and_accuracy(settings):
    job_id = trained_job_with_metrics(settings)
    path = settings.job_dir(job_id) / "metrics.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "method": "dpo", "reward_margin": 2.5,
                                "preference_accuracy": 0.9, "eval_reward_margin": 1.25,
                                "eval_preference_accuracy": "a lot"}))  # unreadable: left out
    forget_the_database(settings)
    store = JobStore(settings)
    progress = store.get(job_id).progress
    assert (progress.reward_margin, progress.preference_accuracy, progress.eval_reward_margin) == (2.5, 0.9, 1.25)
    assert progress.eval_preference_accuracy is None
    store.close()
