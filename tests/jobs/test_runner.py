import os
import signal
import subprocess
import sys

import pytest

from fts_mcp.config import Settings
from fts_mcp.core import Core
from fts_mcp.jobs.outcome import death_error
from fts_mcp.jobs.runner import pid_alive
from fts_mcp.training.spec import TrainingSpec
from tests.conftest import FAST_TRAINING, SAMPLE_CHAT, wait_for


@pytest.mark.parametrize("code, expected", [
    (-signal.SIGKILL, ("worker_killed", "SIGKILL")),
    (-signal.SIGSEGV, ("worker_killed", "SIGSEGV")),
    (3, ("worker_crashed", "status 3")),
    (None, ("worker_lost", "disappeared")),
])
def test_death_is_described_with_exit_code_or_signal(code, expected):
    error = death_error(code)
    assert error.code == expected[0] and expected[1] in error.message


def test_zombies_count_as_dead():
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    wait_for(lambda: not pid_alive(child.pid), 10, what="the child to exit")  # exited, not yet reaped: a zombie
    child.wait()
    assert pid_alive(os.getpid()) and not pid_alive(None)


@pytest.mark.slow
def test_queue_drains_without_any_server(fts_home, tiny_model):
    """Two jobs queued from the core with no MCP server running: the first worker hands the slot on."""
    service = Core(Settings.from_env())
    training = TrainingSpec(**{**FAST_TRAINING, "max_steps": 5})
    first = service.training.start(str(tiny_model), str(SAMPLE_CHAT), training=training)
    second = service.training.start(str(tiny_model), str(SAMPLE_CHAT), training=training)
    assert (first.state, second.state) == ("running", "queued")
    service.close()

    reader = Core(Settings.from_env())
    done = wait_for(lambda: all(reader.jobs.get(j.job_id).state.terminal for j in (first, second)), 120,
                    interval=0.5, what="both jobs")
    assert done
    assert [reader.jobs.get(j.job_id).state for j in (first, second)] == ["succeeded", "succeeded"]
    reader.close()


def test_a_worker_that_ignores_sigterm_is_killed_after_the_grace_period(fts_home, monkeypatch):
    """Cancel asks politely (SIGTERM); past FTS_CANCEL_GRACE_SECONDS the runner sends SIGKILL."""
    from fts_mcp.jobs.runner import Runner
    from fts_mcp.jobs.states import JobState
    from fts_mcp.jobs.store import JobStore

    monkeypatch.setenv("FTS_CANCEL_GRACE_SECONDS", "0.5")
    settings = Settings.from_env()
    store = JobStore(settings)
    stubborn = subprocess.Popen([sys.executable, "-c", "import signal, time\n"
                                 "signal.signal(signal.SIGTERM, signal.SIG_IGN)\nprint('ready', flush=True)\n"
                                 "time.sleep(120)"], stdout=subprocess.PIPE, text=True)
    assert stubborn.stdout.readline().strip() == "ready"
    job = store.create("train", {"output_name": "x"})
    store.transition(job.job_id, JobState.QUEUED)
    store.claim_next(settings.slots)
    store.set_fields(job.job_id, supervisor_pid=stubborn.pid, pid=stubborn.pid)
    store.heartbeat(job.job_id)
    runner = Runner(settings, store)
    runner.cancel(job.job_id)
    runner.tick()  # inside the grace period: a tick must not kill it
    with pytest.raises(subprocess.TimeoutExpired):
        stubborn.wait(timeout=0.3)  # SIGTERM ignored: still alive
    wait_for(lambda: runner.tick() or stubborn.poll() is not None, 10, what="SIGKILL after the grace period")
    assert stubborn.returncode == -signal.SIGKILL
    stubborn.stdout.close()
    done = wait_for(lambda: runner.tick() or store.get(job.job_id).state.terminal and store.get(job.job_id), 10,
                    what="the job to settle")
    assert done.state == "cancelled"
    store.close()


# ---- death detection, deterministically: the mechanism (pids, heartbeat age, exit status), not the clock --------

def running_job(store, settings, **fields):
    from fts_mcp.jobs.states import JobState

    job = store.create("train", {"output_name": "x"})
    store.transition(job.job_id, JobState.QUEUED)
    store.claim_next(settings.slots)
    store.set_fields(job.job_id, **fields)
    return job.job_id


def dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


@pytest.mark.parametrize("heartbeat_age, worker_alive, expected, signal_sent", [
    (10.0, False, "interrupted", None),  # supervisor and worker gone, heartbeat stale: lost
    (0.0, False, "running", None),  # just exited: its own record may still be on the way
    (10.0, True, "running", signal.SIGTERM),  # an orphaned worker is asked to checkpoint and stop first...
    (100.0, True, "running", signal.SIGKILL),  # ... and killed once the cancel grace period has passed too
])
def test_a_vanished_supervisor_is_declared_lost_once_its_heartbeat_is_stale(fts_home, heartbeat_age, worker_alive,
                                                                           expected, signal_sent):
    import time

    from fts_mcp.jobs.runner import Runner
    from fts_mcp.jobs.store import JobStore

    settings = Settings.from_env()
    store = JobStore(settings)
    worker = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"]) if worker_alive else None
    job_id = running_job(store, settings, supervisor_pid=dead_pid(), pid=worker.pid if worker else dead_pid(),
                         heartbeat_at=time.time() - heartbeat_age)
    Runner(settings, store).tick()
    job = store.get(job_id)
    assert job.state == expected
    if expected == "interrupted":
        assert job.error.code == "worker_lost" and job.resumable
    if worker is not None:
        assert worker.wait(timeout=10) == -signal_sent  # the orphan does not keep the slot's device
    store.close()


@pytest.mark.parametrize("exit_code, cancel, expected_state, expected_code", [
    (-signal.SIGKILL, False, "interrupted", "worker_killed"),
    (1, False, "interrupted", "worker_crashed"),
    (-signal.SIGTERM, True, "cancelled", None),
])
def test_settle_records_how_the_work_horse_ended(fts_home, exit_code, cancel, expected_state, expected_code):
    import time

    from fts_mcp.jobs.outcome import settle
    from fts_mcp.jobs.store import JobStore

    settings = Settings.from_env()
    store = JobStore(settings)
    job_id = running_job(store, settings, supervisor_pid=os.getpid(), pid=dead_pid(),
                         **({"cancel_requested_at": time.time()} if cancel else {}))
    settle(store, job_id, exit_code)
    job = store.get(job_id)
    assert (job.state, job.error.code if job.error else None, job.exit_code) == \
        (expected_state, expected_code, exit_code)
    store.close()


# ---- an unreadable result.json: a worker death naming the file, never a monitor stuck on one job ----------------

UNREADABLE_RESULTS = {
    "torn JSON": b'{"state": "succeeded", "artif',
    "not an object": b"[1, 2]",
    "not a terminal state": b'{"state": "running"}',
    "unknown state": b'{"state": "exploded"}',
    "artifacts of the wrong shape": b'{"state": "succeeded", "artifacts": {"files": 3}}',
    "error of the wrong shape": b'{"state": "failed", "error": "boom"}',
    "not text": b"\xff\xfe\x00garbage",
}


@pytest.mark.parametrize("content", UNREADABLE_RESULTS.values(), ids=UNREADABLE_RESULTS.keys())
def test_an_unreadable_result_is_a_worker_death_naming_the_file(fts_home, content):
    from fts_mcp.jobs.outcome import settle
    from fts_mcp.jobs.store import JobStore

    settings = Settings.from_env()
    store = JobStore(settings)
    job_id = running_job(store, settings, supervisor_pid=dead_pid(), pid=dead_pid())
    result = store.result_path(job_id)
    result.write_bytes(content)
    settle(store, job_id, 0)
    job = store.get(job_id)
    assert job.state == "interrupted" and job.resumable and job.error.code == "result_unreadable"
    assert str(result) in job.error.message and "resume_job" in job.error.message
    aside = list(store.job_dir(job_id).glob("result.json.corrupt-*"))
    assert len(aside) == 1 and aside[0].read_bytes() == content and aside[0].name in job.error.message
    store.close()


def test_the_monitor_settles_a_job_with_an_unreadable_result_and_starts_the_next(fts_home, monkeypatch):
    """The job whose result.json is torn becomes interrupted (and resumable); the queued one behind it starts."""
    import time

    from fts_mcp.jobs.runner import Runner
    from fts_mcp.jobs.states import JobState
    from fts_mcp.jobs.store import JobStore

    settings = Settings.from_env()
    store = JobStore(settings)
    broken = running_job(store, settings, supervisor_pid=dead_pid(), pid=dead_pid(), heartbeat_at=time.time() - 60)
    store.result_path(broken).write_text('{"state": "succ')
    waiting = store.create("train", {"output_name": "next"})
    store.transition(waiting.job_id, JobState.QUEUED)
    runner = Runner(settings, store)
    started = []
    monkeypatch.setattr(runner, "_spawn", lambda job_id, slot: started.append((job_id, slot)))
    runner.tick()
    assert store.get(broken).state == "interrupted" and store.get(broken).error.code == "result_unreadable"
    assert started == [(waiting.job_id, "cpu")]
    resumed = runner.resume(broken)  # resumable: queued again, behind the job now running
    assert resumed.state == "queued"
    store.close()


def test_one_jobs_unexpected_error_is_logged_once_and_never_stops_the_monitor(fts_home, monkeypatch, caplog):
    """Whatever goes wrong with one running job, the others are still checked and queued jobs still start; the
    trouble is logged once, not every second."""
    import logging
    import time

    from fts_mcp.jobs.runner import Runner
    from fts_mcp.jobs.states import JobState
    from fts_mcp.jobs.store import JobStore

    monkeypatch.setenv("FTS_CPU_SLOTS", "3")
    settings = Settings.from_env()
    store = JobStore(settings)
    troubled = running_job(store, settings, supervisor_pid=dead_pid(), pid=dead_pid(), heartbeat_at=time.time())
    lost = running_job(store, settings, supervisor_pid=dead_pid(), pid=dead_pid(), heartbeat_at=time.time() - 60)
    waiting = store.create("train", {"output_name": "next"})
    store.transition(waiting.job_id, JobState.QUEUED)
    runner = Runner(settings, store)
    checked = runner._check_running

    def check(job_id):
        if job_id == troubled:
            raise RuntimeError("something nobody expected")
        checked(job_id)

    started = []
    monkeypatch.setattr(runner, "_check_running", check)
    monkeypatch.setattr(runner, "_spawn", lambda job_id, slot: started.append(job_id))
    with caplog.at_level(logging.ERROR, logger="fts_mcp.jobs.runner"):
        for _ in range(3):
            runner.tick()
    assert store.get(lost).state == "interrupted"  # checked after the troubled one
    assert started == [waiting.job_id]
    told = [r for r in caplog.records if troubled in r.getMessage()]
    assert len(told) == 1 and "something nobody expected" in told[0].getMessage()
    store.close()
