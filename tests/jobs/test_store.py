import multiprocessing

import pytest

from fts_mcp.config import Settings
from fts_mcp.errors import IllegalTransition, JobNotFound
from fts_mcp.jobs.records import JobError
from fts_mcp.jobs.states import JobState
from fts_mcp.jobs.store import JobStore


@pytest.fixture
def store(tmp_path):
    s = JobStore(Settings.from_env({"FTS_HOME": str(tmp_path), "FTS_GPUS": "none"}))
    yield s
    s.close()


def queued(store: JobStore, n: int) -> list[str]:
    ids = []
    for _ in range(n):
        job = store.create("train", {"output_name": "x"})
        store.transition(job.job_id, JobState.QUEUED)
        ids.append(job.job_id)
    return ids


def test_create_lays_out_folder_and_spec(store):
    job = store.create("train", {"output_name": "x"})
    assert job.state == JobState.VALIDATING
    assert (store.job_dir(job.job_id) / "spec.json").is_file()
    assert store.list().total == 1


def test_unknown_job_is_an_answer(store):
    with pytest.raises(JobNotFound, match="no job job-000000000000"):
        store.get("job-000000000000")


def test_illegal_transition_raises_and_changes_nothing(store):
    job_id = queued(store, 1)[0]
    with pytest.raises(IllegalTransition):
        store.transition(job_id, JobState.SUCCEEDED)
    assert store.get(job_id).state == JobState.QUEUED


def test_one_running_job_per_slot_oldest_first(store):
    first, second = queued(store, 2)
    assert store.claim_next(("cpu",)) == (first, "cpu")
    assert store.claim_next(("cpu",)) is None
    store.transition(first, JobState.SUCCEEDED)
    assert store.claim_next(("cpu",)) == (second, "cpu")


def test_two_gpu_slots_take_two_jobs(store):
    a, b, c = queued(store, 3)
    assert {store.claim_next(("cuda:0", "cuda:1")), store.claim_next(("cuda:0", "cuda:1"))} == {(a, "cuda:0"),
                                                                                               (b, "cuda:1")}
    assert store.claim_next(("cuda:0", "cuda:1")) is None


def test_resume_clears_the_last_attempt(store):
    job_id = queued(store, 1)[0]
    store.claim_next(("cpu",))
    store.transition(job_id, JobState.INTERRUPTED, error=JobError(code="worker_killed", message="x"), exit_code=-9)
    job = store.transition(job_id, JobState.QUEUED)
    assert job.error is None and job.exit_code is None and job.attempts == 1


def _claim_all(home: str, runner: str, out) -> None:
    s = JobStore(Settings.from_env({"FTS_HOME": home, "FTS_GPUS": "none", "FTS_RUNNER": runner,
                                    "FTS_RAY_ADDRESS": "http://127.0.0.1:8265"}))
    got = []
    for _ in range(50):
        claim = s.claim_next(s.settings.ray_slots, frozenset({"train"}), True) if runner == "ray" else \
            s.claim_next(("cpu",))
        if claim is not None:
            got.append(claim[0])
            s.transition(claim[0], JobState.SUCCEEDED)
    out.put(got)


@pytest.mark.parametrize("runner", ["local", "ray"])
def test_concurrent_claims_from_several_processes_never_share_a_slot(store, tmp_path, runner):
    """Several servers on one FTS_HOME: each job is claimed (and so started, or submitted to a Ray cluster) once."""
    ids = queued(store, 20)
    ctx = multiprocessing.get_context("spawn")
    out = ctx.Queue()
    procs = [ctx.Process(target=_claim_all, args=(str(tmp_path), runner, out)) for _ in range(4)]
    for p in procs:
        p.start()
    claimed = [job for _ in procs for job in out.get(timeout=60)]
    for p in procs:
        p.join(timeout=60)
    assert sorted(claimed) == sorted(ids)  # every job claimed exactly once


def test_store_uses_wal_so_readers_do_not_block_the_worker(store):
    assert store._db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


@pytest.mark.parametrize("terminal", ["succeeded", "cancelled", "interrupted", "failed"])
def test_an_ended_job_shows_no_phase_or_eta(store, terminal):
    """A finished job is doing nothing and will take no more time; its last figures stay."""
    job = store.create("train", {"output_name": "x"})
    store.transition(job.job_id, JobState.QUEUED)
    store.claim_next(("cpu",))
    store.update_progress(job.job_id, {"phase": "saving", "eta_seconds": 12.0, "step": 7, "loss": 0.5})
    done = store.transition(job.job_id, JobState(terminal))
    assert done.progress.phase is None and done.progress.eta_seconds is None
    assert done.progress.step == 7 and done.progress.loss == 0.5


def test_rewinding_drops_only_later_progress(store):
    job = store.create("train", {"output_name": "x"})
    store.transition(job.job_id, JobState.QUEUED)
    for step in range(1, 6):
        store.update_progress(job.job_id, {"step": step, "loss": 1.0})
    store.rewind_progress(job.job_id, 3)
    assert [e["step"] for e in store.events(job.job_id, kind="progress")] == [1, 2, 3]
    assert store.events(job.job_id, kind="state")  # other events stay


def test_with_the_ray_runner_cluster_jobs_take_one_ray_slot_each_and_runtimes_stay_local(tmp_path):
    settings = Settings.from_env({"FTS_HOME": str(tmp_path), "FTS_GPUS": "none", "FTS_RUNNER": "ray",
                                  "FTS_RAY_ADDRESS": "http://127.0.0.1:8265", "FTS_RAY_MAX_JOBS": "2"})
    store = JobStore(settings)
    runtime = store.create("runtime", {})
    big = store.create("train", {"training": {"workers": 8}})  # the cluster schedules its 8 workers, not this host
    small = store.create("train", {"training": {"workers": 1}})
    third = store.create("merge", {})
    for job in (runtime, big, small, third):
        store.transition(job.job_id, JobState.QUEUED)
    cluster_kinds = frozenset({"train", "merge", "generate", "eval"})
    assert settings.ray_slots == ("ray:0", "ray:1")
    assert store.claim_next(settings.ray_slots, cluster_kinds, True) == (big.job_id, "ray:0")
    assert store.claim_next(settings.ray_slots, cluster_kinds, True) == (small.job_id, "ray:1")
    assert store.claim_next(settings.ray_slots, cluster_kinds, True) is None  # FTS_RAY_MAX_JOBS on the cluster
    assert store.claim_next(settings.slots, frozenset({"runtime"})) == (runtime.job_id, "cpu")
    store.close()


def test_a_database_from_before_the_ray_runner_gains_its_column(tmp_path):
    import sqlite3

    settings = Settings.from_env({"FTS_HOME": str(tmp_path), "FTS_GPUS": "none"})
    store = JobStore(settings)
    job = store.create("train", {"output_name": "x"})
    store.close()
    with sqlite3.connect(settings.db_path) as db:
        db.execute("ALTER TABLE jobs DROP COLUMN ray_job_id")
    reopened = JobStore(settings)
    reopened.set_fields(job.job_id, ray_job_id="fts-x-1")
    assert reopened.get(job.job_id).ray_job_id == "fts-x-1"
    reopened.close()


@pytest.mark.parametrize(("env", "param"), [
    ({"FTS_RUNNER": "slurm"}, "FTS_RUNNER"),
    ({"FTS_RUNNER": "ray"}, "FTS_RAY_ADDRESS"),
    ({"FTS_RUNNER": "ray", "FTS_RAY_ADDRESS": "http://h:8265", "FTS_RAY_GPUS_PER_WORKER": "-1"},
     "FTS_RAY_GPUS_PER_WORKER"),
    ({"FTS_RUNNER": "ray", "FTS_RAY_ADDRESS": "http://h:8265", "FTS_RAY_MAX_JOBS": "0"}, "FTS_RAY_MAX_JOBS"),
    ({"FTS_RAY_MAX_JOBS": "2.5"}, "FTS_RAY_MAX_JOBS"),
    ({"FTS_RAY_RUNTIME_ENV": "[1]"}, "FTS_RAY_RUNTIME_ENV"),
    ({"FTS_RAY_RUNTIME_ENV": '{"working_dir": "/elsewhere"}'}, "FTS_RAY_RUNTIME_ENV"),  # the job's own to set
    ({"FTS_RAY_RUNTIME_ENV": '{"env_vars": {"N": 1}}'}, "FTS_RAY_RUNTIME_ENV"),
    ({"FTS_CANCEL_GRACE_SECONDS": "0"}, "FTS_CANCEL_GRACE_SECONDS"),
    ({"FTS_RAY_STORAGE": "relative/folder"}, "FTS_RAY_STORAGE"),
    ({"FTS_RAY_STORAGE": "ftp://host/x"}, "FTS_RAY_STORAGE"),
    ({"FTS_RUNTIME_SLOTS": "0"}, "FTS_RUNTIME_SLOTS"),
    ({"FTS_RUNTIME_SLOTS": "two"}, "FTS_RUNTIME_SLOTS"),
])
def test_runner_settings_are_checked_and_named(tmp_path, env, param):
    from fts_mcp.errors import InvalidArgument

    with pytest.raises(InvalidArgument) as bad:
        Settings.from_env({"FTS_HOME": str(tmp_path), **env})
    assert bad.value.param == param


# ---- serving slots and what a queued job waits behind ----------------------------------------------------------

def queue(store: JobStore, kind: str, spec: dict | None = None) -> str:
    job = store.create(kind, spec or {"output_name": kind})
    store.transition(job.job_id, JobState.QUEUED)
    return job.job_id


def ticked(settings: Settings, store: JobStore, monkeypatch) -> list[tuple[str, str]]:
    """One monitor tick; the workers it would start are recorded instead (job id, slots)."""
    from fts_mcp.jobs.runner import Runner

    runner = Runner(settings, store)
    started: list[tuple[str, str]] = []
    monkeypatch.setattr(runner, "_spawn", lambda job_id, slot: started.append((job_id, slot)))
    runner.tick()
    return started


@pytest.mark.parametrize("runner", ["local", "ray"])
@pytest.mark.parametrize("later", ["generate", "train"])
def test_a_runtime_on_a_cpu_host_never_holds_the_compute_slot(tmp_path, monkeypatch, runner, later):
    """A managed runtime serves until it is cancelled: on a host without GPUs it takes a serving slot of its own,
    so a later one-shot generate or training job still starts (on this host, or on the cluster)."""
    settings = Settings.from_env({"FTS_HOME": str(tmp_path), "FTS_GPUS": "none", "FTS_RUNNER": runner,
                                  "FTS_RAY_ADDRESS": "http://127.0.0.1:8265"})
    store = JobStore(settings)
    runtime = queue(store, "runtime")
    assert ticked(settings, store, monkeypatch) == [(runtime, "serve:0")]
    job = queue(store, later)
    assert ticked(settings, store, monkeypatch) == [(job, "ray:0" if runner == "ray" else "cpu")]
    store.close()


def test_serving_slots_are_bounded_by_fts_runtime_slots(tmp_path, monkeypatch):
    settings = Settings.from_env({"FTS_HOME": str(tmp_path), "FTS_GPUS": "none", "FTS_RUNTIME_SLOTS": "2"})
    store = JobStore(settings)
    runtimes = [queue(store, "runtime") for _ in range(3)]
    assert ticked(settings, store, monkeypatch) == [(runtimes[0], "serve:0"), (runtimes[1], "serve:1")]
    third = store.get(runtimes[2])
    assert third.state == "queued" and runtimes[0] in third.waiting and "serve:0" in third.waiting
    assert "cancel_job" in third.waiting
    store.close()


def test_on_a_gpu_host_a_runtime_still_loads_its_model_on_a_gpu_slot(tmp_path, monkeypatch):
    settings = Settings.from_env({"FTS_HOME": str(tmp_path), "FTS_GPUS": "0"})
    store = JobStore(settings)
    runtime = queue(store, "runtime")
    assert ticked(settings, store, monkeypatch) == [(runtime, "cuda:0")]
    later = store.get(queue(store, "generate"))
    assert later.waiting == f"queued behind runtime {runtime} on cuda:0; a runtime serves until it is cancelled: " \
                           f"cancel_job {runtime} to free its slot"
    store.close()


def test_a_queued_job_says_what_it_waits_behind(store):
    first, second, third = queued(store, 3)
    assert store.get(first).waiting == "starting"  # a free slot: the next tick starts it
    assert store.get(second).waiting == "queued behind 1 earlier queued job (first in, first out)"
    store.claim_next(("cpu",))
    running = store.get(first)
    assert running.state == "running" and running.waiting is None
    frees = f"it starts when a slot frees (sooner if you cancel_job {first})"
    assert store.get(second).waiting == f"queued behind train {first} (running on cpu); {frees}"
    assert store.get(third).waiting == f"queued behind train {first} (running on cpu) and 1 earlier queued job; {frees}"
    listed = {j.job_id: j.waiting for j in store.list().jobs}
    assert listed[third] == store.get(third).waiting and listed[first] is None


def test_a_job_asking_for_more_slots_than_the_host_has_says_it_will_never_start(store):
    job_id = queue(store, "train", {"training": {"workers": 4}})
    assert "will never start" in store.get(job_id).waiting and "cpu" in store.get(job_id).waiting
