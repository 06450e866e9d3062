"""End to end through MCP over a stdio subprocess: real QLoRA jobs on a tiny model, in detached workers.

Each test states the character of its job (finishes, runs long, is killed) as rq's fixtures do.
"""

import base64
import json
import os
import signal
import time
from contextlib import asynccontextmanager
from pathlib import Path

import anyio
import pytest
from mcp import Client

from fts_mcp.jobs.runner import pid_alive
from tests.conftest import FAST_TRAINING, SAMPLE_CHAT, SAMPLE_COMPLETION, server_params

pytestmark = [pytest.mark.anyio, pytest.mark.slow]
TERMINAL = {"succeeded", "failed", "cancelled", "interrupted"}


@asynccontextmanager
async def connect(home: Path, mode: str = "auto"):
    async with Client(server_params(home), mode=mode) as client:
        yield client


async def call(client: Client, tool: str, **args) -> dict:
    result = await client.call_tool(tool, args)
    assert not result.is_error, result.content[0].text
    return result.structured_content


async def start(client: Client, model: Path, steps: int, *, data: Path = SAMPLE_COMPLETION, every: int = 50,
                **training) -> dict:
    return await call(client, "start_qlora_job", base_model=str(model), dataset=str(data), quantization="nf4",
                      lora={"r": 16}, training={**FAST_TRAINING, "max_steps": steps,
                                                "checkpoint_every_steps": every, **training})


async def until(client: Client, job_id: str, predicate, timeout: float, what: str, notes: list | None = None,
                sizes: list | None = None) -> dict:
    """Long-poll job_status until predicate(job) holds; bounded by `timeout`. Progress notifications go to notes,
    the size of each answer (text, structured) to sizes."""
    deadline = time.monotonic() + timeout

    async def on_progress(progress: float, total: float | None, message: str | None) -> None:
        if notes is not None:
            notes.append((progress, total, message))

    while True:
        result = await client.call_tool("job_status", {"job_id": job_id, "wait_seconds": 0.5},
                                        progress_callback=on_progress)
        assert not result.is_error, result.content[0].text
        job = result.structured_content
        if sizes is not None:
            sizes.append((job["state"], len(result.content[0].text), len(json.dumps(job))))
        if predicate(job):
            return job
        assert time.monotonic() < deadline, f"timed out waiting for {what}; last: {job['state']} " \
                                            f"{job['progress']} {job['error']} {job['log_tail'][-5:]}"
        await anyio.sleep(0.1)


def assert_plots_a_falling_curve(png: bytes) -> None:
    """The loss-curve image draws a line whose left end sits higher than its right end (y grows downwards)."""
    import io

    import numpy as np
    from matplotlib import image

    pixels = image.imread(io.BytesIO(png), format="png")[..., :3]
    line = (np.abs(pixels - np.array([0x1F, 0x77, 0xB4]) / 255).sum(axis=-1) < 0.1)  # the train-loss colour
    columns = np.flatnonzero(line.any(axis=0))
    assert columns.size > 100, "no loss line drawn"
    first, last = columns[:10], columns[-10:]
    top = lambda cols: np.mean([np.flatnonzero(line[:, c]).mean() for c in cols])  # noqa: E731
    assert top(first) < top(last), "the plotted loss does not fall"


def generate_all(model_dir: Path, adapter: Path | None, records: list[dict]) -> list[str]:
    """Greedy answers from the 4-bit base the adapter was trained on (with the adapter when given)."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

    from fts_mcp.models.prompts import encode_prompt

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                               bnb_4bit_compute_dtype=torch.float32, bnb_4bit_quant_storage=torch.float32)
    model = AutoModelForCausalLM.from_pretrained(model_dir, quantization_config=quant, dtype=torch.float32,
                                                 device_map={"": "cpu"})
    if adapter is not None:
        model = PeftModel.from_pretrained(model, adapter)
    model.eval()
    answers = []
    for record in records:
        ids = encode_prompt(tokenizer, record["prompt"])
        with torch.no_grad():
            out = model.generate(torch.tensor([ids]), max_new_tokens=12, do_sample=False,
                                 pad_token_id=tokenizer.pad_token_id)
        answers.append(tokenizer.decode(out[0][len(ids):], skip_special_tokens=True))
    return answers


async def test_qlora_job_learns_the_training_targets(fts_home, tiny_model):
    """Finishes: 16 prompt -> code word pairs, memorised by a QLoRA adapter on a random 4-bit base."""

    async with connect(fts_home) as client:
        job = await call(client, "start_qlora_job", base_model=str(tiny_model), dataset=str(SAMPLE_COMPLETION),
                         lora={"r": 16, "dropout": 0.0}, quantization="nf4",
                         training={**FAST_TRAINING, "max_steps": 160, "lr_scheduler": "cosine"})
        assert job["state"] in ("queued", "running")
        losses = []

        def record(j):
            if j["progress"]["loss"] is not None:
                losses.append(j["progress"]["loss"])
            return j["state"] in TERMINAL

        notes: list = []
        sizes: list = []
        job = await until(client, job["job_id"], record, 240, "training to finish", notes, sizes)
        assert job["state"] == "succeeded", job
        resource = (await client.read_resource(f"fts://jobs/{job['job_id']}/loss.png")).contents[0]
        png = base64.b64decode(resource.blob)
        assert resource.mime_type == "image/png"
    running = [(text, structured) for state, text, structured in sizes if state == "running"]
    assert running and max(max(pair) for pair in running) <= 2_500, max(running)  # an agent's context is a budget
    steps = [progress for progress, _, _ in notes]
    assert len(steps) >= 3 and steps == sorted(steps) and notes[-1][1] == 160  # MCP progress while long-polling
    assert "loss" in notes[-1][2]
    assert job["progress"]["step"] == 160 == job["progress"]["total_steps"]
    assert len(losses) >= 3 and max(losses[-3:]) < losses[0], losses  # the loss fell, seen through job_status
    history = json.loads(Path(job["artifacts"]["metrics"]).read_text())["log_history"]
    curve = [h["loss"] for h in history if "loss" in h]
    assert len(curve) == 160 and sum(curve[-10:]) / 10 < curve[0] / 10, curve[:3] + curve[-3:]
    adapter = Path(job["artifacts"]["adapter_dir"])
    assert {"adapter_config.json", "adapter_model.safetensors"} <= {p.name for p in adapter.iterdir()}
    assert json.loads((adapter / "adapter_config.json").read_text())["r"] == 16
    assert Path(job["artifacts"]["loss_curve"]).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert_plots_a_falling_curve(png)

    records = [json.loads(line) for line in SAMPLE_COMPLETION.read_text().splitlines()]
    targets = [r["completion"] for r in records]
    assert generate_all(tiny_model, adapter, records) == targets
    assert not set(generate_all(tiny_model, None, records)) & set(targets)


async def test_cancel_checkpoints_then_resumes_in_place_and_as_a_new_job(fts_home, tiny_model):
    """Runs long: cancelled mid-run with a checkpoint; resume_job continues it in place, and a finished job's
    checkpoint seeds a new job (resume_from) that continues the step count."""
    async with connect(fts_home) as client:
        job = await start(client, tiny_model, 40, every=100_000, data=SAMPLE_CHAT)
        job_id = job["job_id"]
        running = await until(client, job_id, lambda j: j["progress"]["step"] >= 5, 120, "a few steps")
        assert running["progress"]["eta_seconds"] is not None
        pid = running["process"]["pid"]
        await call(client, "cancel_job", job_id=job_id)
        job = await until(client, job_id, lambda j: j["state"] in TERMINAL, 60, "the cancel")
        assert job["state"] == "cancelled" and job["error"] is None
        assert job["progress"]["eta_seconds"] is None and job["progress"]["phase"] is None  # nothing stale
        assert not pid_alive(pid)  # the worker (and its GPU memory) is gone once the job reads cancelled
        checkpoint = Path(job["artifacts"]["checkpoint_dir"])
        stopped_at = int(checkpoint.name.split("-")[1])
        assert stopped_at >= 5 and (checkpoint / "optimizer.pt").exists()
        assert job["resumable"]  # a cancel that left a checkpoint can continue in place

        again = await call(client, "cancel_job", job_id=job_id)  # idempotent: an ended job comes back unchanged
        assert again["state"] == "cancelled" and again["times"] == job["times"]
        resumed = await call(client, "resume_job", job_id=job_id)
        assert resumed["state"] in ("queued", "running") and not resumed["process"]["cancel_requested"]
        done = await until(client, job_id, lambda j: j["state"] in TERMINAL, 120, "the resumed job")
        assert done["state"] == "succeeded", done
        assert done["progress"]["step"] == 40 and done["process"]["attempts"] == 2
        assert done["progress"]["phase"] is None and not done["resumable"]
        log = (await client.read_resource(f"fts://jobs/{job_id}/log")).contents[0].text
        assert f"resuming from {checkpoint}" in log

        follow = await call(client, "start_qlora_job", base_model=str(tiny_model), dataset=str(SAMPLE_CHAT),
                            lora={"r": 16}, resume_from=job_id,
                            training={**FAST_TRAINING, "max_steps": 45, "checkpoint_every_steps": 100_000})
        done = await until(client, follow["job_id"], lambda j: j["state"] in TERMINAL, 120, "the follow-up job")
        assert done["state"] == "succeeded", done
        assert done["progress"]["step"] == 45


@pytest.mark.chaos  # kill -9 of a training worker (CI's second step; the README run keeps the quicker kill tests)
async def test_killed_worker_is_interrupted_and_resumes_where_it_left_off(fts_home, tiny_model):
    """Is killed: SIGKILL mid-run -> interrupted with the signal; resume_job finishes it, steps continuing."""
    async with connect(fts_home) as client:
        job = await start(client, tiny_model, 400, every=10, data=SAMPLE_CHAT)
        job_id = job["job_id"]
        job = await until(client, job_id, lambda j: j["progress"]["step"] >= 25, 120, "step 25")
        os.kill(job["process"]["pid"], signal.SIGKILL)
        killed_at = time.monotonic()
        job = await until(client, job_id, lambda j: j["state"] in TERMINAL, 20, "the kill to be noticed")
        assert time.monotonic() - killed_at < 15  # the mechanism is tested exactly in tests/jobs; this has slack
        assert job["state"] == "interrupted" and job["resumable"]
        assert job["error"]["code"] == "worker_killed" and "SIGKILL" in job["error"]["message"]
        assert job["process"]["exit_code"] == -signal.SIGKILL
        checkpoint_step = int(Path(job["artifacts"]["checkpoint_dir"]).name.split("-")[1])
        assert checkpoint_step >= 20

        resumed = await call(client, "resume_job", job_id=job_id)
        assert resumed["state"] in ("queued", "running") and resumed["error"] is None
        steps_seen = []

        def watch(j):
            if j["state"] == "running" and j["progress"]["phase"] == "training":
                steps_seen.append(j["progress"]["step"])
            return j["state"] in TERMINAL

        done = await until(client, job_id, watch, 240, "the resumed run")
        assert done["state"] == "succeeded" and done["process"]["attempts"] == 2 and done["progress"]["step"] == 400
        assert steps_seen and min(steps_seen) >= checkpoint_step  # continued, not restarted from 0
        import json

        history = json.loads(Path(done["artifacts"]["metrics"]).read_text())["log_history"]
        logged = [h["step"] for h in history if "loss" in h]
        assert logged[0] == 1 and logged[-1] == 400  # the loss curve runs on across the resume
        from fts_mcp.config import Settings
        from fts_mcp.jobs.store import JobStore

        store = JobStore(Settings.from_env())
        events = [e["step"] for e in store.events(job_id, kind="progress") if e.get("logged")]
        store.close()
        assert events == sorted(set(events)) and events[-1] == 400  # no step twice in the loss events


@pytest.mark.extended  # CI's second step, beside the chaos suite's kill -9 tests
async def test_worker_and_supervisor_killed_is_detected_by_the_server(fts_home, tiny_model):
    """Dies silently: both worker processes SIGKILLed, so only the server's liveness check can notice."""
    async with connect(fts_home) as client:
        job = await start(client, tiny_model, 100_000, every=100_000, data=SAMPLE_CHAT)
        job = await until(client, job["job_id"], lambda j: j["progress"]["step"] >= 1, 120, "training")
        from fts_mcp.config import Settings
        from fts_mcp.jobs.store import JobStore

        store = JobStore(Settings.from_env())
        supervisor = store.raw(job["job_id"])["supervisor_pid"]
        store.close()
        os.kill(supervisor, signal.SIGKILL)
        os.kill(job["process"]["pid"], signal.SIGKILL)
        died = time.monotonic()
        job = await until(client, job["job_id"], lambda j: j["state"] in TERMINAL, 20, "the deaths to be noticed")
        assert time.monotonic() - died <= 15.0  # the mechanism is tested exactly in tests/jobs; this has slack
        assert job["state"] == "interrupted" and job["error"]["code"] == "worker_lost"


def server_children() -> list[int]:
    """Pids of the `fts_mcp serve` processes this test process spawned (stdio clients start them)."""
    found = []
    for proc in Path("/proc").iterdir():
        try:
            ppid = int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1])
            argv = (proc / "cmdline").read_bytes().split(b"\0")
        except (OSError, ValueError, IndexError):
            continue
        if ppid == os.getpid() and b"fts_mcp" in argv and b"serve" in argv:
            found.append(int(proc.name))
    return found


@pytest.mark.extended  # CI's second step; the main run keeps tests/jobs/test_runner.py's queue draining with no server
async def test_job_survives_its_server_and_a_new_server_sees_it_finish(fts_home, tiny_model):
    """Finishes, unattended: the server that started it is SIGKILLed mid-run."""
    killed: list[int] = []
    try:
        async with connect(fts_home) as client:
            job = await start(client, tiny_model, 150, data=SAMPLE_CHAT)
            job_id = job["job_id"]
            await until(client, job_id, lambda j: j["progress"]["step"] >= 5, 120, "training")
            (server_pid,) = server_children()
            os.kill(server_pid, signal.SIGKILL)
            killed.append(server_pid)
            await call(client, "list_jobs")  # the session dies with its server, however that surfaces
    except Exception:
        if not killed:  # anything before the kill is a real failure
            raise
    assert killed and not pid_alive(killed[0])
    async with connect(fts_home, mode="legacy") as client:
        job = await call(client, "job_status", job_id=job_id)
        assert job["state"] == "running" and job["progress"]["step"] >= 5  # live status from the new server
        job = await until(client, job_id, lambda j: j["state"] in TERMINAL, 180, "the orphaned job")
    assert job["state"] == "succeeded" and job["progress"]["step"] == 150


@pytest.mark.chaos  # a race between two server processes (CI's second step)
async def test_two_servers_sharing_one_home_never_run_two_jobs_on_one_slot(fts_home, tiny_model):
    """Finish, one after another: two servers each queue jobs on the single CPU slot."""
    async with connect(fts_home) as a, connect(fts_home, mode="legacy") as b:
        ids = [(await start(c, tiny_model, 30, data=SAMPLE_CHAT))["job_id"] for c in (a, b, a)]
        max_running = 0
        finished: set[str] = set()
        deadline = time.monotonic() + 300
        while len(finished) < len(ids):
            assert time.monotonic() < deadline, "jobs did not finish"
            listing = await call(b, "list_jobs", limit=10)
            states = {j["job_id"]: j["state"] for j in listing["jobs"]}
            max_running = max(max_running, sum(s == "running" for s in states.values()))
            finished = {i for i, s in states.items() if s in TERMINAL}
            await anyio.sleep(0.2)
        assert max_running == 1
        assert all(states[i] == "succeeded" for i in ids), states
        jobs = [await call(a, "job_status", job_id=i) for i in ids]
        spans = sorted((j["times"]["started"], j["times"]["finished"]) for j in jobs)
        assert all(prev[1] <= nxt[0] for prev, nxt in zip(spans, spans[1:], strict=False))  # one after another


@pytest.mark.extended  # CI's second step (packing's planner and speed paths are unit-tested)
async def test_plain_lora_with_eval_split_and_packing(fts_home, tiny_model, tmp_path):
    """Finishes: 16-bit base (no quantization), a held-out split with eval loss, packed text examples."""
    import json

    data = tmp_path / "text.jsonl"
    data.write_text("".join(json.dumps({"text": f"The code word for {w} is {w[::-1]}."}) + "\n"
                            for w in ("apple", "river", "cloud", "stone", "ocean", "tiger", "candle", "meadow")))
    async with connect(fts_home) as client:
        job = await call(client, "start_qlora_job", base_model=str(tiny_model), dataset=str(data), quantization="none",
                         lora={"r": 4, "target_modules": ["q_proj", "v_proj"]},
                         training={**FAST_TRAINING, "max_steps": 12, "eval_fraction": 0.25, "packing": True,
                                   "max_seq_len": 64, "checkpoint_every_steps": 6})
        job = await until(client, job["job_id"], lambda j: j["state"] in TERMINAL, 120, "the LoRA job")
    assert job["state"] == "succeeded", job
    assert job["progress"]["eval_loss"] is not None
    metrics = json.loads(Path(job["artifacts"]["metrics"]).read_text())
    assert metrics["quantization"] == "none" and metrics["eval_loss"] == pytest.approx(job["progress"]["eval_loss"],
                                                                                      abs=1e-4)
    config = json.loads((Path(job["artifacts"]["adapter_dir"]) / "adapter_config.json").read_text())
    assert sorted(config["target_modules"]) == ["q_proj", "v_proj"] and config["r"] == 4


@pytest.mark.extended  # CI's second step: a worker that fails at its start
async def test_unknown_target_module_fails_naming_the_argument(fts_home, tiny_model):
    """Fails in the worker: the module names are only known once the model is loaded."""
    async with connect(fts_home) as client:
        job = await call(client, "start_qlora_job", base_model=str(tiny_model), dataset=str(SAMPLE_CHAT),
                         lora={"target_modules": ["c_attn"]}, training={**FAST_TRAINING, "max_steps": 2})
        job = await until(client, job["job_id"], lambda j: j["state"] in TERMINAL, 120, "the failure")
    assert job["state"] == "failed" and job["error"]["param"] == "lora.target_modules"
    assert "q_proj" in job["error"]["message"]
