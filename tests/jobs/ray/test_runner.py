"""How the Ray runner's supervisor reads a Ray job's log into the job (no cluster needed: the log is given).

What the cluster sends is input from a remote party: frames that would move the job's checkpoint outside its
folder, or that are malformed, fail the job with `bad_frame` rather than crash the supervisor or touch other
files; a job that ended without its own outcome is told apart by how Ray says it ended."""

import json
from pathlib import Path

import pytest

from fts_mcp.config import Settings
from fts_mcp.jobs.ray.frames import encode, send_tree
from fts_mcp.jobs.ray.runner import Follower, package
from fts_mcp.jobs.states import JobState
from fts_mcp.jobs.store import JobStore


@pytest.fixture
def store(tmp_path):
    s = JobStore(Settings.from_env({"FTS_HOME": str(tmp_path / "home"), "FTS_GPUS": "none"}))
    yield s
    s.close()


@pytest.fixture
def follower(store):
    job = store.create("train", {"output_name": "x"})
    store.transition(job.job_id, JobState.QUEUED)
    store.claim_next(("ray:0",), None, True)
    f = Follower(store, store.get(job.job_id))
    yield f
    f.end()


def feed(follower: Follower, *frames: dict, text: str = "") -> None:
    follower.text(text + "".join(encode(frame) for frame in frames), follower.seen)


def test_progress_and_log_lines_come_back_and_a_reconnect_is_not_applied_twice(follower, store):
    log = "\x1b[36m(RayTrainWorker pid=1)\x1b[0m step one\n"
    feed(follower, {"t": "report", "figures": {"step": 3, "loss": 1.5}, "event": True}, text=log)
    follower.text(log + encode({"t": "report", "figures": {"step": 3, "loss": 1.5}}), 0)  # replayed from the start
    job = store.get(follower.job_id)
    assert job.progress.step == 3 and job.progress.loss == 1.5
    assert len(store.events(follower.job_id, kind="progress")) == 1
    follower.log.flush()
    assert "(RayTrainWorker pid=1) step one" in store.log_path(follower.job_id).read_text()  # without colour codes


def test_a_checkpoint_that_came_back_is_recorded_and_older_ones_go(follower, store, tmp_path):
    for step in (2, 4, 6):
        source = tmp_path / f"checkpoint-{step}"
        source.mkdir()
        (source / "trainer_state.json").write_text(json.dumps({"global_step": step}))
        frames: list[dict] = []
        send_tree(frames.append, source, f"work/checkpoints/checkpoint-{step}")
        feed(follower, *frames, {"t": "checkpoint", "path": f"work/checkpoints/checkpoint-{step}"})
    assert follower.bad is None
    folder = store.job_dir(follower.job_id) / "checkpoints"
    assert sorted(p.name for p in folder.iterdir()) == ["checkpoint-4", "checkpoint-6"]
    assert store.get(follower.job_id).artifacts.checkpoint_dir == str(folder / "checkpoint-6")


@pytest.mark.parametrize("frame", [
    {"t": "checkpoint", "path": "output"},  # not a checkpoint folder: would prune the output's siblings
    {"t": "checkpoint", "path": "work/adapter"},
    {"t": "tree", "id": "../../../tmp/x", "dest": "work/adapter", "n": 0, "data": ""},
    {"t": "result", "state": "failed", "error": "not an object"},
    {"t": "result", "state": "exploded"},
    {"t": "report", "figures": {"step": "three"}},
    {"t": "teleport"},
])
def test_a_bad_frame_fails_the_job_and_stops_reading(follower, frame):
    feed(follower, frame)
    assert follower.bad is not None
    state, error, _ = follower.outcome("SUCCEEDED", None, cancelled=False)
    assert state == JobState.FAILED and error.code == "bad_frame"


@pytest.mark.parametrize(("result", "status", "cancelled", "state", "code"), [
    ({"t": "result", "state": "failed", "error": {"code": "invalid_dataset", "message": "line 3"}}, "SUCCEEDED",
     False, JobState.FAILED, "invalid_dataset"),
    ({"t": "result", "state": "stopped"}, "SUCCEEDED", True, JobState.CANCELLED, None),
    ({"t": "result", "state": "stopped"}, "SUCCEEDED", False, JobState.INTERRUPTED, "worker_stopped"),
    (None, "FAILED", False, JobState.INTERRUPTED, "ray_job_failed"),  # the driver was killed, a node lost
    (None, "STOPPED", True, JobState.CANCELLED, None),
    (None, "UNREACHABLE", False, JobState.INTERRUPTED, "cluster_unreachable"),
])
def test_how_a_job_ended(follower, result, status, cancelled, state, code):
    if result is not None:
        feed(follower, result)
    got_state, error, _ = follower.outcome(status, "Job entrypoint command failed", cancelled)
    assert got_state == state and (error.code if error else None) == code


def test_the_package_is_refused_before_anything_is_copied_when_too_large(store, tmp_path, monkeypatch):
    import fts_mcp.jobs.ray.runner as ray_runner
    from fts_mcp.errors import FtsError

    data = tmp_path / "data.jsonl"
    data.write_bytes(b"x" * 2048)
    job = store.create("train", {"dataset": str(data), "base_model": "org/hub-model", "output_name": "x"})
    monkeypatch.setattr(ray_runner, "MAX_PACKAGE_BYTES", 1024)
    folder = tmp_path / "package"
    with pytest.raises(FtsError, match="the largest dataset") as refused:
        package(job, folder, store.settings, "fts-x-1")
    assert refused.value.param == "dataset" and not folder.exists()
    monkeypatch.setattr(ray_runner, "MAX_PACKAGE_BYTES", 10_000)
    description = package(job, folder, store.settings, "fts-x-1")
    assert description["inputs"] == [[["dataset"], "inputs/0-data.jsonl"]]  # the hub id travels as it is
    assert (folder / "inputs" / "0-data.jsonl").read_bytes() == data.read_bytes()
    assert json.loads((folder / "job.json").read_text())["spec"]["base_model"] == "org/hub-model"
    assert Path(description["server_dir"]) == store.job_dir(job.job_id)


def test_the_runtime_environment_carries_the_job_and_what_the_cluster_needs(tmp_path):
    from fts_mcp.jobs.ray.runner import runtime_env

    added = {"pip": ["peft==0.18.0"], "env_vars": {"HF_TOKEN": "hf_x", "PYTHONUNBUFFERED": "0"}}
    settings = Settings.from_env({"FTS_HOME": str(tmp_path), "FTS_RUNNER": "ray", "FTS_RAY_ADDRESS": "http://h:8265",
                                  "FTS_CANCEL_GRACE_SECONDS": "0.5", "FTS_RAY_RUNTIME_ENV": json.dumps(added)})
    env = runtime_env(tmp_path / "package", settings)
    assert env["working_dir"] == str(tmp_path / "package") and env["pip"] == ["peft==0.18.0"]
    assert Path(env["py_modules"][0], "jobs", "ray", "entry.py").is_file()  # the server's own fts-mcp travels along
    assert env["env_vars"]["HF_TOKEN"] == "hf_x"
    assert env["env_vars"]["PYTHONUNBUFFERED"] == "1"  # the job's own settings win
    assert env["env_vars"]["RAY_JOB_STOP_WAIT_TIME_S"] == "1"  # a grace under a second still leaves one
