"""Jobs on a real local Ray cluster (FTS_RUNNER=ray), through MCP, with no filesystem shared with the server.

The cluster is `ray start --head` on 127.0.0.1 with its own FTS_HOME and temp folder. Every Python process of the
cluster runs an audit hook (a `sitecustomize` on its PYTHONPATH) that records any file operation under the
server's folders (its FTS_HOME, the model and the dataset it was given); each test ends by checking that there
was none, so a cluster worker that read or wrote the server's files directly would fail it.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import pytest

from fts_mcp.network import free_port
from tests.conftest import FAST_TRAINING, SAMPLE_COMPLETION
from tests.test_e2e import TERMINAL, call, connect, generate_all, until

pytestmark = [pytest.mark.ray, pytest.mark.anyio]
ray = pytest.importorskip("ray", reason="the Ray tests need fts-mcp[ray]")

AUDIT_HOOK = '''
import os, sys
_prefixes = tuple(p for p in os.environ.get("FTS_TEST_FORBIDDEN", "").split(os.pathsep) if p)
_out = os.environ.get("FTS_TEST_VIOLATIONS")
_events = {"open", "os.mkdir", "os.rename", "os.replace", "os.remove", "os.rmdir", "os.listdir", "os.scandir"}
_busy = []
def _hook(event, args):
    if _busy or event not in _events or not args:
        return
    path = args[0]
    if isinstance(path, bytes):
        path = os.fsdecode(path)
    elif hasattr(path, "__fspath__"):
        path = os.fspath(path)
    if isinstance(path, str) and path.startswith(_prefixes):
        _busy.append(1)
        try:
            with open(_out, "a") as fh:
                fh.write(f"{os.getpid()} {event} {path} {sys.argv[:3]}\\n")
        finally:
            _busy.clear()
if _prefixes and _out:
    sys.addaudithook(_hook)
'''


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """A local Ray head node (2 cores here, 4 logical CPUs: two Train workers and the job's driver fit)."""
    root = Path(tempfile.mkdtemp(prefix="ray", dir="/tmp"))  # short: Ray's socket paths must fit 107 characters
    (root / "hook").mkdir()
    (root / "hook" / "sitecustomize.py").write_text(AUDIT_HOOK)
    violations = root / "violations.log"
    forbidden = [str(tmp_path_factory.getbasetemp()), str(SAMPLE_COMPLETION.parent)]
    dashboard = free_port()
    env = {**os.environ, "FTS_HOME": str(root / "home"), "PYTHONPATH": str(root / "hook"),
           "FTS_TEST_FORBIDDEN": os.pathsep.join(forbidden), "FTS_TEST_VIOLATIONS": str(violations),
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}", "RAY_USAGE_STATS_ENABLED": "0"}
    for name in ("FTS_RUNNER", "FTS_RAY_ADDRESS", "FTS_ROOTS", "VIRTUAL_ENV_PROMPT"):
        env.pop(name, None)
    ray_cli = [sys.executable, "-m", "ray.scripts.scripts"]
    subprocess.run([*ray_cli, "start", "--head", "--num-cpus=4", "--node-ip-address=127.0.0.1",
                    f"--port={free_port()}", "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard}",
                    f"--dashboard-agent-listen-port={free_port()}", "--include-dashboard=true",
                    "--disable-usage-stats", f"--temp-dir={root / 't'}"],
                   env=env, cwd=root, check=True, capture_output=True, timeout=120)
    try:
        yield {"address": f"http://127.0.0.1:{dashboard}", "violations": violations, "forbidden": forbidden,
               "storage": root / "bucket"}
    finally:
        subprocess.run([*ray_cli, "stop", "--force"], env=env, capture_output=True, timeout=120)
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def ray_home(fts_home, cluster, monkeypatch):
    """A server whose jobs go to the cluster. FTS_RAY_GPUS_PER_WORKER is left unset: a CPU cluster's jobs ask for no
    GPU by themselves."""
    monkeypatch.setenv("FTS_RUNNER", "ray")
    monkeypatch.setenv("FTS_RAY_ADDRESS", cluster["address"])
    for name in ("FTS_RAY_GPUS_PER_WORKER", "FTS_RAY_RUNTIME_ENV", "FTS_RAY_START_TIMEOUT_SECONDS", "FTS_RAY_STORAGE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("FTS_CANCEL_GRACE_SECONDS", "30")
    yield fts_home
    touched = cluster["violations"].read_text() if cluster["violations"].exists() else ""
    assert not touched, f"the cluster touched the server's files:\n{touched[:2000]}"


def client_for(address: str):
    from ray.job_submission import JobSubmissionClient

    return JobSubmissionClient(address)


RECORDS = [json.loads(line) for line in SAMPLE_COMPLETION.read_text().splitlines()]


async def train(client, model: Path, steps: int, workers: int = 1, **training) -> dict:
    return await call(client, "start_qlora_job", base_model=str(model), dataset=str(SAMPLE_COMPLETION),
                      quantization="nf4", lora={"r": 16, "dropout": 0.0},
                      training={**FAST_TRAINING, "max_steps": steps, "workers": workers,
                                "micro_batch_size": 16 // workers, **training})


async def test_one_and_two_worker_jobs_learn_and_merge_and_generate_on_the_cluster(ray_home, tiny_model):
    """Train (1 worker, then 2 Ray Train workers), merge and generate, all on the cluster: the adapters come back
    into the server's job folders and have memorised the data."""
    async with connect(ray_home) as client:
        one = await train(client, tiny_model, 100)
        one = await until(client, one["job_id"], lambda j: j["state"] in TERMINAL, 240, "the 1-worker job")
        assert one["state"] == "succeeded", (one["error"], one["log_tail"])
        job = json.loads((await client.read_resource(f"fts://jobs/{one['job_id']}")).contents[0].text)
        assert job["ray_job_id"] == f"fts-{one['job_id']}-1" and job["slot"] == "ray:0"
        assert one["progress"]["plan"].endswith("; on the Ray cluster: 1 worker x (1 CPU, 0 GPU) (0 GPUs per worker "
                                                "(CPU training): FTS_RAY_GPUS_PER_WORKER is unset and the cluster "
                                                "has no GPU)")  # the run's plan says where it ran, and why
        adapter = Path(job["artifacts"]["adapter_dir"])
        assert adapter.is_relative_to(ray_home / "jobs" / one["job_id"])  # back in the server's own folder
        assert generate_all(tiny_model, adapter, RECORDS) == [r["completion"] for r in RECORDS]
        assert Path(job["artifacts"]["checkpoint_dir"], "trainer_state.json").is_file()
        curve = await client.read_resource(f"fts://jobs/{one['job_id']}/loss.png")  # progress came back as events
        assert curve.contents[0].mime_type == "image/png"

        merge = await call(client, "merge_adapter", adapter=one["job_id"], dtype="float32")
        merge = await until(client, merge["job_id"], lambda j: j["state"] in TERMINAL, 180, "the merge")
        assert merge["state"] == "succeeded", (merge["error"], merge["log_tail"])
        merged = json.loads((await client.read_resource(f"fts://jobs/{merge['job_id']}")).contents[0].text)
        assert merged["artifacts"]["verification"]["passed"]
        assert (Path(merged["artifacts"]["output_dir"]) / "config.json").is_file()

        await call(client, "deploy_adapter", adapter=one["job_id"], name="codewords")
        record = RECORDS[0]
        answer = await call(client, "generate", model="codewords", prompt=record["prompt"], max_tokens=12)
        assert answer["text"] == record["completion"]

        two = await train(client, tiny_model, 100, workers=2)
        two = await until(client, two["job_id"], lambda j: j["state"] in TERMINAL, 300, "the 2-worker job")
        assert two["state"] == "succeeded", (two["error"], two["log_tail"])
        assert two["spec"]["workers"] == 2 and "2 workers x (1 CPU, 0 GPU)" in two["progress"]["plan"]
        job = json.loads((await client.read_resource(f"fts://jobs/{two['job_id']}")).contents[0].text)
        metrics = json.loads(Path(job["artifacts"]["metrics"]).read_text())
        assert metrics["speed"]["micro_batch_size"] == 8  # two ranks of 8 make the global batch of 16
        log = (await client.read_resource(f"fts://jobs/{two['job_id']}/log")).contents[0].text
        assert "world_size=2" in log  # the workers' own log lines came back
        adapter = Path(job["artifacts"]["adapter_dir"])
        assert generate_all(tiny_model, adapter, RECORDS) == [r["completion"] for r in RECORDS]


async def test_cancel_checkpoints_on_the_cluster_and_resume_continues_from_it(ray_home, tiny_model, cluster,
                                                                             monkeypatch):
    """With two Ray Train workers: the stop request reaches both ranks, rank 0's checkpoint comes back, and the
    resumed attempt starts both ranks from it. Folders come back through FTS_RAY_STORAGE here (a folder both
    sides reach, standing for a bucket), not the log."""
    monkeypatch.setenv("FTS_RAY_STORAGE", str(cluster["storage"]))
    async with connect(ray_home) as client:
        job = await train(client, tiny_model, 100_000, workers=2, checkpoint_every_steps=1_000_000)
        await until(client, job["job_id"], lambda j: j["progress"]["step"] >= 3, 180, "training on the cluster")
        await call(client, "cancel_job", job_id=job["job_id"])
        ended = await until(client, job["job_id"], lambda j: j["state"] in TERMINAL, 90, "the cancel")
        assert ended["state"] == "cancelled" and ended["resumable"], ended
        record = json.loads((await client.read_resource(f"fts://jobs/{job['job_id']}")).contents[0].text)
        checkpoint = Path(record["artifacts"]["checkpoint_dir"])
        assert checkpoint.is_relative_to(ray_home / "jobs" / job["job_id"])
        saved_at = json.loads((checkpoint / "trainer_state.json").read_text())["global_step"]
        assert saved_at >= 3

        raw = client_for(cluster["address"]).get_job_logs(f"fts-{job['job_id']}-1")  # the Ray job's own log
        assert '"t":"tree_ref"' in raw and '"t":"tree"' not in raw  # references only: the bytes went via storage
        assert not list(cluster["storage"].rglob("*.tar"))  # fetched, then removed

        await call(client, "resume_job", job_id=job["job_id"])
        resumed = await until(client, job["job_id"], lambda j: j["state"] == "running" and
                              j["progress"]["step"] > saved_at + 2, 180, "the resumed run")
        record = json.loads((await client.read_resource(f"fts://jobs/{job['job_id']}")).contents[0].text)
        assert record["ray_job_id"] == f"fts-{job['job_id']}-2" and resumed["progress"]["step"] > saved_at
        log = (await client.read_resource(f"fts://jobs/{job['job_id']}/log")).contents[0].text
        assert "resuming from" in log and f"checkpoint-{saved_at}" in log
        await call(client, "cancel_job", job_id=job["job_id"])
        again = await until(client, job["job_id"], lambda j: j["state"] in TERMINAL, 90, "the second cancel")
        assert again["state"] == "cancelled"


async def test_killing_the_ray_jobs_process_ends_the_job_interrupted(ray_home, tiny_model, cluster):
    async with connect(ray_home) as client:
        job = await train(client, tiny_model, 100_000)
        await until(client, job["job_id"], lambda j: j["progress"]["step"] >= 1, 180, "training on the cluster")
        sid = json.loads((await client.read_resource(f"fts://jobs/{job['job_id']}")).contents[0].text)["ray_job_id"]
        assert client_for(cluster["address"]).get_job_status(sid) == "RUNNING"
        drivers = [p for p in psutil.process_iter(["cmdline"]) if "fts_mcp.jobs.ray.entry" in (p.info["cmdline"] or [])
                   and p.info["cmdline"][0] != "/bin/sh"]
        assert len(drivers) == 1, drivers  # the job's entrypoint process, started by Ray's job supervisor
        drivers[0].send_signal(signal.SIGKILL)
        killed_at = time.monotonic()
        ended = await until(client, job["job_id"], lambda j: j["state"] in TERMINAL, 60, "the kill to be noticed")
        assert time.monotonic() - killed_at < 30
        assert ended["state"] == "interrupted" and ended["resumable"], ended
        assert ended["error"]["code"] == "ray_job_failed" and "FAILED" in ended["error"]["message"], ended["error"]


async def test_a_lost_supervisor_stops_its_ray_job_and_the_job_ends_interrupted(ray_home, tiny_model, cluster):
    """Nobody would bring the cluster's work back: the server stops the Ray job rather than leave it running."""
    async with connect(ray_home) as client:
        job = await train(client, tiny_model, 100_000)
        running = await until(client, job["job_id"], lambda j: j["progress"]["step"] >= 1, 180, "training")
        sid = running["process"]["ray_job_id"]
        os.kill(running["process"]["pid"], signal.SIGKILL)  # the job's supervisor on the server's host
        ended = await until(client, job["job_id"], lambda j: j["state"] in TERMINAL, 60, "the loss to be noticed")
        assert ended["state"] == "interrupted" and ended["error"]["code"] == "worker_lost", ended["error"]
        ray_jobs = client_for(cluster["address"])
        deadline = time.monotonic() + 30
        while ray_jobs.get_job_status(sid) not in ("STOPPED", "FAILED") and time.monotonic() < deadline:
            time.sleep(0.5)
        assert ray_jobs.get_job_status(sid) in ("STOPPED", "FAILED")


def test_ray_auth_token_reaches_the_cluster_as_a_bearer_token(tmp_path):
    """A cluster with token authentication sees RAY_AUTH_TOKEN on every Jobs API request."""
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    from fts_mcp.config import Settings
    from fts_mcp.jobs.ray.cluster import connect

    seen: list[str | None] = []

    class Head(BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 - http.server's name
            seen.append(self.headers.get("Authorization"))
            body = json.dumps({"version": "4", "ray_version": ray.__version__, "ray_commit": "x"}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Head)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        settings = Settings.from_env({"FTS_HOME": str(tmp_path), "FTS_RUNNER": "ray", "RAY_AUTH_TOKEN": "s3cret",
                                      "FTS_RAY_ADDRESS": f"http://127.0.0.1:{server.server_address[1]}"})
        connect(settings)
    finally:
        server.shutdown()
        server.server_close()
    assert seen and all(header == "Bearer s3cret" for header in seen)


# ---- a job the cluster cannot run says so at once -------------------------------------------------------------


async def test_a_job_the_cluster_could_never_hold_is_refused_at_submit_with_the_fix(ray_home, tiny_model,
                                                                                  monkeypatch):
    """A GPU asked of a CPU cluster, or more workers than its CPUs: `start_qlora_job` itself refuses, naming the
    numbers and the setting to change; no job is created."""
    monkeypatch.setenv("FTS_RAY_GPUS_PER_WORKER", "1")
    async with connect(ray_home) as client:
        began = time.monotonic()
        refused = await refusal(client, tiny_model)
        assert time.monotonic() - began < 15
        assert ("FTS_RAY_GPUS_PER_WORKER: the Ray cluster cannot run this job: the cluster has 0 GPUs; this job asks "
                "for 1 per worker: set FTS_RAY_GPUS_PER_WORKER=0 for a CPU cluster") in refused, refused
        assert (await call(client, "list_jobs"))["jobs"] == []  # nothing was created, nothing submitted

    monkeypatch.setenv("FTS_RAY_GPUS_PER_WORKER", "0")  # the server reads its settings when it starts
    async with connect(ray_home) as client:
        refused = await refusal(client, tiny_model, workers=8)
        assert ("training.workers: the Ray cluster cannot run this job: the cluster holds at most 4 workers of 1 CPU "
                "and 0 GPU") in refused, refused


async def refusal(client, model: Path, workers: int = 1) -> str:
    result = await client.call_tool("start_qlora_job", {
        "base_model": str(model), "dataset": str(SAMPLE_COMPLETION), "quantization": "nf4",
        "training": {**FAST_TRAINING, "max_steps": 10, "workers": workers}})
    assert result.is_error, result.structured_content
    return result.content[0].text


async def test_a_cluster_python_without_torch_fails_the_job_at_once_naming_it(ray_home, tiny_model, monkeypatch,
                                                                             cluster):
    """The job's `python` is a fresh virtual environment (no torch, no fts-mcp dependency at all), as on a head
    started from a shell outside the project's environment: the job fails within seconds, naming what to add."""
    bare = cluster["violations"].parent / "bare-python"  # the cluster's side: not among the server's files
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(bare)], check=True, timeout=60)
    monkeypatch.setenv("FTS_RAY_RUNTIME_ENV", json.dumps(
        {"env_vars": {"PATH": f"{bare / 'bin'}{os.pathsep}{os.environ['PATH']}"}}))
    async with connect(ray_home) as client:
        began = time.monotonic()
        job = await train(client, tiny_model, 10)
        ended = await until(client, job["job_id"], lambda j: j["state"] in TERMINAL, 60, "the cluster's refusal")
        assert time.monotonic() - began < 45
        assert ended["state"] == "failed" and ended["error"]["code"] == "ray_environment", ended
        message = ended["error"]["message"]
        assert message.startswith(f"the cluster's Python ({bare / 'bin' / 'python'}, ") and "lacks torch, " in message
        assert "FTS_RAY_RUNTIME_ENV='{\"pip\": [\"torch\", " in message


async def test_a_job_waiting_for_busy_resources_says_so_and_gives_up_after_the_start_timeout(ray_home, tiny_model,
                                                                                             cluster, monkeypatch):
    """Another Ray job holds every CPU: the job's answer says what it waits for and for how long, and after
    FTS_RAY_START_TIMEOUT_SECONDS it fails with that reason (its Ray job stopped)."""
    from fts_mcp.config import Settings
    from fts_mcp.jobs.ray.cluster import connect as ray_connect
    from fts_mcp.jobs.ray.cluster import read_resources

    monkeypatch.setenv("FTS_RAY_START_TIMEOUT_SECONDS", "20")
    ray_jobs = client_for(cluster["address"])
    blocker = ray_jobs.submit_job(entrypoint="sleep 300", entrypoint_num_cpus=4)
    try:
        head = ray_connect(Settings.from_env())
        deadline = time.monotonic() + 60  # the dashboard's report follows the cluster within a few seconds
        while read_resources(head).free("CPU") > 0:
            assert time.monotonic() < deadline, "the blocker never took the cluster's CPUs"
            time.sleep(0.5)
        async with connect(ray_home) as client:
            job = await train(client, tiny_model, 10)
            waiting = await until(client, job["job_id"], lambda j: "resources busy" in (j["progress"]["phase"] or ""),
                                  30, "the reason it waits")
            phase = waiting["progress"]["phase"]
            assert phase.startswith("waiting_for_cluster: resources busy: it asks for 1 worker x (1 CPU, 0 GPU) and "
                                    "0 of 4 CPUs are free (other work holds the rest) (")
            assert phase.endswith(" s; gives up after 20 s)")
            ended = await until(client, job["job_id"], lambda j: j["state"] in TERMINAL, 60, "the start timeout")
            assert ended["state"] == "failed" and ended["error"]["code"] == "ray_start_timeout", ended
            assert "did not start on the Ray cluster within 20 s" in ended["error"]["message"]
            assert "resources busy" in ended["error"]["message"]
    finally:
        ray_jobs.stop_job(blocker)
    # Ray queues a stop for a job it has not placed: once the blocker is gone, the job stops rather than runs
    sid = ended["process"]["ray_job_id"]
    deadline = time.monotonic() + 60
    while ray_jobs.get_job_status(sid) not in ("STOPPED", "FAILED"):
        assert time.monotonic() < deadline, "the Ray job was not stopped"
        time.sleep(0.5)
