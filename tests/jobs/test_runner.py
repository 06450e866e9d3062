import os
import signal
import subprocess
import sys

import pytest

from fts_mcp.config import Settings
from fts_mcp.jobs.runner import death_error, pid_alive
from fts_mcp.service import FineTuneService
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
    service = FineTuneService(Settings.from_env())
    training = TrainingSpec(**{**FAST_TRAINING, "max_steps": 5})
    first = service.start_training(str(tiny_model), str(SAMPLE_CHAT), training=training)
    second = service.start_training(str(tiny_model), str(SAMPLE_CHAT), training=training)
    assert (first.state, second.state) == ("running", "queued")
    service.close()

    reader = FineTuneService(Settings.from_env())
    done = wait_for(lambda: all(reader.job_status(j.job_id).state.terminal for j in (first, second)), 120,
                    interval=0.5, what="both jobs")
    assert done
    assert [reader.job_status(j.job_id).state for j in (first, second)] == ["succeeded", "succeeded"]
    reader.close()
