"""kill -9 at several points of a training job, a merge and a publish: afterwards the job is `interrupted` (or
finished), nothing partial is visible under a final name, and resuming works."""

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fts_mcp.adapters.sources import StoreSource
from fts_mcp.adapters.store import AdapterStore
from fts_mcp.config import Settings
from fts_mcp.core import Core
from fts_mcp.training.spec import TrainingSpec
from tests.conftest import FAST_TRAINING, SAMPLE_CHAT, make_adapter, wait_for

pytestmark = pytest.mark.chaos


def kill_when(core: Core, job_id: str, predicate, timeout: float = 120):
    """SIGKILL the job's work horse as soon as `predicate(job)` holds; returns the job as it was then."""
    job = wait_for(lambda: (j := core.jobs.get(job_id, log_lines=0)).pid and predicate(j) and j, timeout, 0.02,
                   "the kill point")
    try:
        os.kill(job.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass  # it finished between the poll and the kill: the job's own outcome stands
    return job


def settled(core: Core, job_id: str, timeout: float = 60):
    return wait_for(lambda: (j := core.jobs.get(job_id)).state.terminal and j, timeout, 0.2, "the job to settle")


@pytest.mark.parametrize("point", ["loading", "training", "last step"])
def test_training_killed_at_any_point_resumes_to_a_whole_adapter(fts_home, tiny_model, point):
    core = Core(Settings.from_env())
    steps = 24
    job = core.training.start(str(tiny_model), str(SAMPLE_CHAT), quantization="nf4",
                              training=TrainingSpec(**{**FAST_TRAINING, "max_steps": steps,
                                                       "checkpoint_every_steps": 8}))
    when = {"loading": lambda j: True,
            "training": lambda j: j.progress.step >= 10,
            "last step": lambda j: j.progress.step >= steps}[point]
    kill_when(core, job.job_id, when)
    done = settled(core, job.job_id)
    adapter = fts_home / "jobs" / job.job_id / "adapter"
    if done.state == "succeeded":  # the kill came after the outcome was written: it must be whole
        assert (adapter / "adapter_model.safetensors").is_file()
    else:
        assert done.state == "interrupted" and done.resumable and done.error.code == "worker_killed"
        assert not adapter.exists() or (adapter / "adapter_model.safetensors").is_file()
        core.jobs.resume(job.job_id)
        done = settled(core, job.job_id, 180)
    assert done.state == "succeeded", (done.error, done.log_tail)
    assert done.progress.step == steps and (adapter / "adapter_config.json").is_file()
    assert not list((fts_home / "jobs" / job.job_id).glob(".adapter.tmp"))
    core.close()


def test_a_merge_killed_midway_leaves_nothing_and_resumes(fts_home, tiny_model, adapter_a):
    core = Core(Settings.from_env())
    job = core.merging.merge(str(adapter_a), base_model=str(tiny_model), dtype="float32", output_name="chaos")
    out = Path(job.spec["output_dir"])
    kill_when(core, job.job_id, lambda j: j.progress.phase in ("loading_model", "merging", "saving"))
    done = settled(core, job.job_id)
    if done.state == "interrupted":
        assert not out.exists()  # nothing under the final name
        core.jobs.resume(job.job_id)
        done = settled(core, job.job_id, 120)
    assert done.state == "succeeded" and done.artifacts.verification.passed
    assert json.loads((out / "merge.json").read_text())["job_id"] == job.job_id
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".")]  # no staging left behind
    core.close()


PUBLISH = """
import sys
from pathlib import Path
from fts_mcp.adapters.store import AdapterStore
AdapterStore(Path(sys.argv[1])).publish(Path(sys.argv[2]), "support", alias="prod")
"""


def test_a_publish_killed_at_any_moment_leaves_a_consistent_store(tmp_path, tiny_model):
    store_root = tmp_path / "store"
    sources = [make_adapter(tiny_model, tmp_path / f"src{i}", r=4, seed=i) for i in range(3)]
    rng = random.Random(7)
    for source in sources:
        publisher = subprocess.Popen([sys.executable, "-c", PUBLISH, str(store_root), str(source)])
        time.sleep(rng.uniform(0.2, 2.0))
        publisher.send_signal(signal.SIGKILL)
        publisher.wait()
        store = AdapterStore(store_root)
        source_reader = StoreSource(store_root, tmp_path / "cache")
        for version in store.versions("support"):  # every visible version is whole and verifies
            source_reader.folder(store.manifest("support", version))
        assert set(store.aliases("support").values()) <= set(store.versions("support"))
    store.publish(sources[0], "support")  # publishing still works afterwards, and repairs what a kill left
    assert store.resolve("support:latest").version in store.versions("support")
    index = json.loads((store_root / "index.json").read_text())["adapters"]["support"]
    assert index == {"versions": store.versions("support"), "aliases": store.aliases("support")}
    assert not list((store_root / "support").glob(".publish-*"))  # no staging left behind
