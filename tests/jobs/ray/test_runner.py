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


class FakeHead:
    """A Jobs API client whose dashboard reports `statuses` as its cluster status, one per request, the last one
    from then on (None: the dashboard has no such page)."""

    def __init__(self, *statuses: dict | None) -> None:
        self.statuses = list(statuses)

    def _do_request(self, method, endpoint, **kwargs):
        assert (method, endpoint) == ("GET", "/api/cluster_status")
        status = self.statuses.pop(0) if len(self.statuses) > 1 else self.statuses[0]

        class Response:
            status_code = 200 if status is not None else 404

            @staticmethod
            def json():
                return {"data": {"clusterStatus": status}}

        return Response()


CPU_HEAD = {"autoscalerReport": {"nodeTypeMapping": {"ab12": "node_ab12"}},
            "loadMetricsReport": {"usageByNode": {"ab12": {"CPU": [0.0, 4.0]}}}}


def ray_settings(tmp_path, **env) -> Settings:
    return Settings.from_env({"FTS_HOME": str(tmp_path), "FTS_RUNNER": "ray", "FTS_RAY_ADDRESS": "http://h:8265",
                              **env})


def test_unset_gpus_per_worker_are_chosen_from_the_cluster_and_said(tmp_path):
    from fts_mcp.jobs.ray.runner import placement

    just_started = {"loadMetricsReport": {"usageByNode": {}}}  # its monitor has not reported the head yet
    ask, note = placement(FakeHead(just_started, CPU_HEAD), ray_settings(tmp_path), 2)
    assert (ask.workers, ask.cpus, ask.gpus) == (2, 1.0, 0.0)
    assert note == ("on the Ray cluster: 2 workers x (1 CPU, 0 GPU) (0 GPUs per worker (CPU training): "
                    "FTS_RAY_GPUS_PER_WORKER is unset and the cluster has no GPU)")
    ask, note = placement(FakeHead(None), ray_settings(tmp_path, FTS_RAY_GPUS_PER_WORKER="0"), 1)
    assert ask.gpus == 0 and "could not be read, so it was not checked" in note  # submitted as set, unchecked


def test_a_job_asking_for_gpus_a_cpu_cluster_lacks_is_refused_before_it_is_submitted(tmp_path):
    from fts_mcp.errors import FtsError
    from fts_mcp.jobs.ray.runner import placement

    with pytest.raises(FtsError) as refused:
        placement(FakeHead(CPU_HEAD), ray_settings(tmp_path, FTS_RAY_GPUS_PER_WORKER="1"), 1)
    assert refused.value.code == "ray_cluster_too_small" and refused.value.param == "FTS_RAY_GPUS_PER_WORKER"
    assert "the cluster has 0 GPUs; this job asks for 1 per worker: set FTS_RAY_GPUS_PER_WORKER=0" in \
        refused.value.message


def test_a_waiting_job_says_why_until_it_reports_its_own_progress(follower, store):
    follower.note = "on the Ray cluster: 1 worker x (1 CPU, 0 GPU)"
    assert follower.waiting("waiting_for_cluster: resources busy (3 s; gives up after 600 s)")
    assert store.get(follower.job_id).progress.phase.startswith("waiting_for_cluster: resources busy")
    feed(follower, {"t": "report", "figures": {"phase": "loading_model"}, "event": False})
    assert not follower.waiting("waiting_for_cluster: late")  # never over the job's own
    feed(follower, {"t": "report", "figures": {"plan": "micro-batch 16"}, "event": False})
    progress = store.get(follower.job_id).progress
    assert progress.phase == "loading_model"
    assert progress.plan == "micro-batch 16; on the Ray cluster: 1 worker x (1 CPU, 0 GPU)"


def test_a_job_that_did_not_start_in_time_fails_with_the_reason(follower):
    from fts_mcp.jobs.records import JobError

    follower.refused = JobError(code="ray_start_timeout", message="resources busy")
    state, error, _ = follower.outcome("STOPPED", "Job was intentionally stopped.", cancelled=False)
    assert state == JobState.FAILED and error.code == "ray_start_timeout"


def test_start_qlora_job_asks_the_cluster_first_refusing_what_it_cannot_hold_and_choosing_from_it(
        tmp_path, tiny_model, monkeypatch):
    """Before a training job exists: a CPU cluster with FTS_RAY_GPUS_PER_WORKER unset gets a CPU job (so `auto`
    picks 16-bit LoRA, as on a CPU host), and the choice is recorded; a GPU asked of it is refused, no job made."""
    import fts_mcp.jobs.ray.cluster as cluster
    from fts_mcp.errors import FtsError
    from fts_mcp.jobs.runner import Runner
    from fts_mcp.jobs.service import Jobs
    from fts_mcp.training.service import Training
    from tests.conftest import SAMPLE_COMPLETION

    monkeypatch.setattr(cluster, "connect", lambda settings: FakeHead(CPU_HEAD))
    monkeypatch.setattr(Runner, "tick", lambda self: None)  # nothing is started: the job is only queued
    roots = {"FTS_ROOTS": f"{tiny_model}:{SAMPLE_COMPLETION.parent}"}
    jobs = Jobs(ray_settings(tmp_path, **roots))
    job = Training(jobs.settings, jobs).start(str(tiny_model), str(SAMPLE_COMPLETION))
    assert job.spec["quantization"] == "none" and job.spec["choices"][0].startswith("auto: 16-bit LoRA on the CPU")
    assert job.spec["choices"][-1] == ("on the Ray cluster: 1 worker x (1 CPU, 0 GPU) (0 GPUs per worker (CPU "
                                       "training): FTS_RAY_GPUS_PER_WORKER is unset and the cluster has no GPU)")

    gpu = Jobs(ray_settings(tmp_path, FTS_RAY_GPUS_PER_WORKER="1", **roots))
    with pytest.raises(FtsError) as refused:
        Training(gpu.settings, gpu).start(str(tiny_model), str(SAMPLE_COMPLETION))
    assert refused.value.code == "ray_cluster_too_small" and refused.value.param == "FTS_RAY_GPUS_PER_WORKER"
    assert [j.job_id for j in gpu.list().jobs] == [job.job_id]  # the refused one was never created


@pytest.mark.parametrize("cluster", ["closed", "silent"])
def test_a_cluster_that_cannot_be_asked_at_submit_leaves_the_check_to_the_supervisor_and_never_hangs(
        tmp_path, monkeypatch, cluster):
    """Nobody listening, or a dashboard that accepts and never answers: the tool answers within its bound, saying
    the cluster was not checked (the supervisor checks again, and retries an unreachable cluster)."""
    import socket
    import time

    import fts_mcp.jobs.service as service
    from fts_mcp.jobs.service import Jobs

    monkeypatch.setattr(service, "PLACEMENT_SECONDS", 1.5)
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        if cluster == "silent":
            listener.listen(8)  # connections are accepted by the kernel, and nothing is ever said
        port = listener.getsockname()[1]
        jobs = Jobs(ray_settings(tmp_path, FTS_RAY_ADDRESS=f"http://127.0.0.1:{port}", FTS_RAY_GPUS_PER_WORKER="0"))
        began = time.monotonic()
        gpus, note = jobs.placement(1)
        assert time.monotonic() - began < 5
    assert gpus == 0 and note.startswith("on the Ray cluster: 1 worker x (1 CPU, 0 GPU) (0 GPU per worker: "
                                         "FTS_RAY_GPUS_PER_WORKER); the cluster's resources could not be read, so "
                                         "it was not checked"), note
