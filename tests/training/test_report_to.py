"""training.report_to: the run's parameters, losses and final metrics reach a real MLflow tracking server through
transformers' own integration, and the job says where (experiment, run id); a tracker that is missing, unreachable
or failing costs a warning in the job's log and record, never the training."""

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import httpx2
import pytest

from fts_mcp.config import Settings
from fts_mcp.core import Core
from fts_mcp.training import tracking
from fts_mcp.training.spec import LoraSpec, TrainingSpec
from tests.conftest import FAST_TRAINING, SAMPLE_CHAT, wait_for

MLFLOW = Path(sys.executable).with_name("mlflow")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def train(tiny_model: Path, **training) -> dict:
    """A short training job through the core, to its end; the job record and its folder."""
    spec = TrainingSpec(**{**FAST_TRAINING, "max_steps": 6, "logging_steps": 1, **training})
    with Core(Settings.from_env()) as core:
        job = core.training.start(str(tiny_model), str(SAMPLE_CHAT), output_name="codewords",
                                  lora=LoraSpec(r=8, dropout=0.0), quantization="none", training=spec)
        done = wait_for(lambda: (j := core.jobs.get(job.job_id, log_lines=200)).state.terminal and j, 240,
                        what="the job to end")
        return {"job": done, "folder": core.jobs.folder(job.job_id), "log": core.jobs.log(job.job_id)}


@pytest.fixture
def mlflow_server(tmp_path, monkeypatch):
    """`mlflow server` on loopback with a SQLite store; its URL, set as the host's MLFLOW_TRACKING_URI."""
    if not MLFLOW.exists():
        if os.environ.get("CI"):
            pytest.fail("mlflow is not installed; .ci/run installs the mlflow extra")
        pytest.skip("pip install 'fts-mcp[mlflow]' for the MLflow test")
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    store = tmp_path / "mlflow"
    store.mkdir()
    proc = subprocess.Popen([str(MLFLOW), "server", "--backend-store-uri", f"sqlite:///{store / 'runs.db'}",
                             "--default-artifact-root", str(store / "artifacts"), "--host", "127.0.0.1",
                             "--port", str(port), "--workers", "1"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        wait_for(lambda: proc.poll() is not None or tracking.mlflow_unreachable(url, 1) is None, 90,
                 interval=0.5, what="the MLflow server")
        assert proc.poll() is None, "mlflow server exited"
        monkeypatch.setenv("MLFLOW_TRACKING_URI", url)
        monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "fts-report-to")
        yield url
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # a throwaway server: its store goes with tmp_path
        proc.wait(timeout=30)


@pytest.mark.extended  # about 90 s with the server's start: CI's second step
def test_a_run_lands_in_mlflow_with_its_parameters_and_loss_history(fts_home, tiny_model, mlflow_server):
    ran = train(tiny_model, report_to=["mlflow"], eval_fraction=0.25, checkpoint_every_steps=3)
    job, folder = ran["job"], ran["folder"]
    assert job.state == "succeeded", ran["log"][-3000:]
    where = json.loads((folder / "metrics.json").read_text())["tracking"]["mlflow"]
    assert where["tracking_uri"] == mlflow_server and where["experiment"] == "fts-report-to"
    assert where["run_name"] == f"codewords-{job.job_id}" and "error" not in where
    assert f"run_id {where['run_id']}" in ran["log"]  # the job's log says where the run is

    api = f"{mlflow_server}/api/2.0/mlflow"
    with httpx2.Client(timeout=30) as http:
        run = http.get(f"{api}/runs/get", params={"run_id": where["run_id"]}).json()["run"]
        history = {key: http.get(f"{api}/metrics/get-history",
                                 params={"run_id": where["run_id"], "metric_key": key}).json().get("metrics", [])
                   for key in ("loss", "eval_loss", "train_loss")}
        runs = http.post(f"{api}/runs/search", json={"experiment_ids": [where["experiment_id"]]}).json()["runs"]
    assert len(runs) == 1  # the final evaluation went into the same run, not a stray one
    assert run["info"]["status"] == "FINISHED"
    params = {p["key"]: p["value"] for p in run["data"]["params"]}
    assert params["learning_rate"] == "0.01" and params["max_steps"] == "6"
    assert sorted(m["step"] for m in history["loss"]) == [1, 2, 3, 4, 5, 6]
    logged = {p["step"]: p["loss"] for p in json.loads((folder / "metrics.json").read_text())["log_history"]
              if "loss" in p}
    assert {m["step"]: round(m["value"], 5) for m in history["loss"]} == {s: round(v, 5) for s, v in logged.items()}
    assert len(history["eval_loss"]) >= 3  # at steps 3 and 6, and the final evaluation
    assert history["train_loss"]  # the run's final metrics


@pytest.mark.slow
@pytest.mark.extended  # a training run in a worker (CI's second step, beside the real MLflow server's test)
def test_an_unreachable_tracker_costs_a_warning_never_the_training(fts_home, tiny_model, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{free_port()}")
    tensorboard = tracking.installed("tensorboard")
    ran = train(tiny_model, report_to=["mlflow", "tensorboard"] if tensorboard else ["mlflow"])
    assert ran["job"].state == "succeeded", ran["log"][-3000:]
    assert "WARNING" in ran["log"] and "report_to mlflow: the tracking server http://127.0.0.1:" in ran["log"]
    assert "training goes on without it" in ran["log"]
    state = json.loads((ran["folder"] / "metrics.json").read_text())["tracking"]
    assert "did not answer" in state["mlflow"]["error"]
    if tensorboard:  # the other tracker still got the run
        assert Path(state["tensorboard"]["log_dir"]) == ran["folder"] / "tensorboard"
        assert list((ran["folder"] / "tensorboard").glob("events.out.tfevents.*"))


# ---- the guard, without a training run ------------------------------------------------------------------------

class Flaky:
    """An integration callback whose tracker breaks at its second call."""

    def __init__(self):
        self.calls = []

    def on_train_begin(self, args, state, control, **kwargs):
        self.calls.append("begin")

    def on_log(self, args, state, control, **kwargs):
        self.calls.append("log")
        raise ConnectionError("tracking server went away\nwith a long traceback")

    def on_train_end(self, args, state, control, **kwargs):
        self.calls.append("end")


class State:
    is_world_process_zero = True


def test_a_tracker_that_fails_mid_run_is_switched_off_and_reported(caplog):
    reports = []
    trackers = tracking.Trackers({}, lambda figures, event=True: reports.append(figures))
    inner = Flaky()
    guarded = tracking.Guarded("trackio", inner, trackers)
    trackers.guarded.append(guarded)
    args = type("Args", (), {"project": "fts-mcp", "run_name": "codewords-job-1"})()
    with caplog.at_level("WARNING"):
        guarded.on_train_begin(args, State(), None)
        assert guarded.on_log(args, State(), None, logs={"loss": 1.0}) is None  # the training never sees it
        guarded.on_log(args, State(), None, logs={"loss": 0.5})
        guarded.on_train_end(args, State(), None)  # deferred ...
        trackers.finish()  # ... and, switched off, never called
    assert inner.calls == ["begin", "log"]
    assert reports[0] == {"tracking": {"trackio": {"project": "fts-mcp", "run": "codewords-job-1"}}}
    assert reports[-1]["tracking"]["trackio"]["error"] == "ConnectionError: tracking server went away"
    assert "report_to trackio failed and is switched off" in caplog.text


def test_the_end_of_a_run_waits_for_finish():
    inner = Flaky()
    guarded = tracking.Guarded("tensorboard", inner, tracking.Trackers({}, lambda figures, event=True: None))
    guarded.on_train_end(None, State(), None)
    assert inner.calls == []
    guarded.finish()
    guarded.finish()
    assert inner.calls == ["end"]


def test_a_tracker_not_installed_is_left_out_with_the_command_that_installs_it(monkeypatch):
    monkeypatch.setattr(tracking, "installed", lambda name: name != "trackio")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    kept, dropped = tracking.usable(["mlflow", "trackio"])
    assert kept == ["mlflow"] and "pip install 'fts-mcp[trackio]'" in dropped["trackio"]


def test_report_to_is_validated_by_the_spec():
    assert TrainingSpec(report_to=["mlflow", "mlflow", "tensorboard"]).report_to == ["mlflow", "tensorboard"]
    assert TrainingSpec().report_to == []
    with pytest.raises(ValueError, match="'mlflow', 'tensorboard' or 'trackio'"):
        TrainingSpec(report_to=["wandb"])


def test_local_stores_are_not_probed():
    assert tracking.mlflow_unreachable(None) is None
    assert tracking.mlflow_unreachable("file:///tmp/mlruns") is None
    assert "did not answer" in tracking.mlflow_unreachable(f"http://127.0.0.1:{free_port()}", 1)

