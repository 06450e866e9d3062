"""Data-parallel training on one host (`training.workers`): two gloo ranks on the CPU follow the one-process loss
trajectory, and a killed rank or a cancel stops every rank and frees every slot."""

import json
import signal
import time
from pathlib import Path

import psutil
import pytest

from fts_mcp.config import Settings
from fts_mcp.core import Core
from fts_mcp.errors import InvalidArgument
from fts_mcp.jobs.runner import pid_alive
from fts_mcp.training.spec import LoraSpec, TrainingSpec
from tests.conftest import FAST_TRAINING, SAMPLE_COMPLETION, wait_for

pytestmark = pytest.mark.distributed
LORA = LoraSpec(r=8, dropout=0.0)  # no dropout: its random masks would differ between layouts


@pytest.fixture
def core(fts_home, monkeypatch):
    monkeypatch.setenv("FTS_CPU_SLOTS", "2")
    with Core(Settings.from_env()) as core:
        yield core


def train(core: Core, tiny_model, workers: int, micro: int, steps: int, **extra):
    training = TrainingSpec(**{**FAST_TRAINING, "micro_batch_size": micro, "gradient_accumulation_steps": 1,
                               "max_steps": steps, "logging_steps": 1, "workers": workers, **extra})
    return core.training.start(str(tiny_model), str(SAMPLE_COMPLETION), lora=LORA, training=training)


def finished(core: Core, job_id: str, timeout: float = 240):
    return wait_for(lambda: (j := core.jobs.get(job_id, log_lines=40)).state.terminal and j, timeout,
                    what=f"job {job_id} to end")


def ranks_of(core: Core, job_id: str) -> list[psutil.Process]:
    horse = core.jobs.get(job_id, log_lines=0).pid
    try:
        return [p for p in psutil.Process(horse).children() if "fts_mcp.jobs.ranks" in " ".join(p.cmdline())]
    except psutil.NoSuchProcess:
        return []


def test_two_gloo_ranks_follow_the_one_process_loss_trajectory(core, tiny_model):
    """Same seed, data order and global batch (1 x 16 vs 2 ranks x 8): the same loss at every step."""
    single = finished(core, train(core, tiny_model, workers=1, micro=16, steps=6).job_id)
    double = finished(core, train(core, tiny_model, workers=2, micro=8, steps=6).job_id)
    assert (single.state, double.state) == ("succeeded", "succeeded"), (single.error, double.error, double.log_tail)

    def losses(job):
        history = json.loads(Path(job.artifacts.metrics).read_text())["log_history"]
        return [h["loss"] for h in history if "loss" in h]

    one, two = losses(single), losses(double)
    assert len(one) == len(two) == 6
    assert two == pytest.approx(one, rel=2e-3, abs=1e-4)
    assert one[-1] < one[0] * 0.8  # and it learned
    one_metrics, two_metrics = (json.loads(Path(j.artifacts.metrics).read_text()) for j in (single, double))
    assert two_metrics["speed"]["micro_batch_size"] == 8
    assert two_metrics["tokens_seen"] == one_metrics["tokens_seen"] > 0  # counted over both ranks


def test_a_killed_rank_stops_the_job_and_every_rank_within_seconds(core, tiny_model):
    job = train(core, tiny_model, workers=2, micro=8, steps=100_000)
    ranks = wait_for(lambda: len(r := ranks_of(core, job.job_id)) == 2 and
                     core.jobs.get(job.job_id, log_lines=0).progress.step > 0 and r, 180,
                     what="both ranks training")
    ranks[1].send_signal(signal.SIGKILL)
    killed_at = time.monotonic()
    ended = finished(core, job.job_id, timeout=30)
    assert time.monotonic() - killed_at < 5 + 2  # within 5 s (the poll loop of the test itself adds a little)
    assert ended.state == "interrupted" and "rank 1 of 2 was killed by SIGKILL" in ended.error.message
    assert not any(pid_alive(r.pid) for r in ranks)
    follow = train(core, tiny_model, workers=2, micro=8, steps=1)  # both slots are free again
    assert finished(core, follow.job_id).state == "succeeded"


def test_a_cancel_checkpoints_and_stops_every_rank(core, tiny_model):
    job = train(core, tiny_model, workers=2, micro=8, steps=100_000, checkpoint_every_steps=1_000_000)
    ranks = wait_for(lambda: len(r := ranks_of(core, job.job_id)) == 2 and
                     core.jobs.get(job.job_id, log_lines=0).progress.step >= 2 and r, 180,
                     what="both ranks training")
    core.jobs.cancel(job.job_id)
    ended = finished(core, job.job_id, timeout=60)
    assert ended.state == "cancelled" and ended.resumable and ended.artifacts.checkpoint_dir
    assert not any(pid_alive(r.pid) for r in ranks)


def test_a_job_that_can_never_fit_is_refused_with_the_slots_this_host_has(core, tiny_model):
    with pytest.raises(InvalidArgument, match=r"this host has 2 slot\(s\) \(cpu, cpu:1\)") as refused:
        train(core, tiny_model, workers=3, micro=8, steps=1)
    assert refused.value.param == "training.workers"
