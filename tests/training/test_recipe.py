"""The training recipe's progress reporting, driven the way the HF Trainer drives its callbacks."""

from types import SimpleNamespace

import pytest

from fts_mcp.jobs.context import recording_context
from fts_mcp.training import recipe


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_tokens_per_second_after_a_resume_counts_only_this_runs_tokens(tmp_path, monkeypatch):
    """The trainer calls on_train_begin before it restores the checkpoint's step and tokens seen; the rate
    must not count the restored tokens as if they were trained in this run."""
    clock = Clock()
    monkeypatch.setattr(recipe.time, "monotonic", clock)
    ctx, reports = recording_context(tmp_path)
    progress = recipe.ReportProgress(ctx)
    args, control = SimpleNamespace(output_dir=str(tmp_path)), SimpleNamespace()
    state = SimpleNamespace(global_step=0, max_steps=100, epoch=0.0, num_input_tokens_seen=0)

    progress.on_train_begin(args, state, control)
    state.global_step, state.num_input_tokens_seen = 50, 100_000  # the checkpoint's state is restored
    clock.now = 5.0  # restoring took a while
    for step in (51, 52):
        progress.on_step_begin(args, state, control)
        clock.now += 1.0
        state.global_step, state.num_input_tokens_seen = step, state.num_input_tokens_seen + 1_000
        progress.on_step_end(args, state, control)
        progress.on_log(args, state, control, logs={"loss": 1.0, "learning_rate": 1e-4})

    rates = [r["tokens_per_second"] for r in reports if "tokens_per_second" in r]
    assert rates == [pytest.approx(1_000.0), pytest.approx(1_000.0)]
    etas = [r["eta_seconds"] for r in reports if r.get("eta_seconds") is not None]
    assert etas[-1] == pytest.approx(48.0)  # 2 steps in 2 s, 48 to go: the restored steps are not counted


def test_a_resumed_run_forgets_what_an_earlier_attempt_logged_past_its_checkpoint(tmp_path):
    ctx, reports = recording_context(tmp_path)
    for step in range(1, 8):  # the first attempt logged steps 1-7, checkpointed at 5, then was killed
        ctx.report({"step": step, "loss": 1.0 / step, "logged": True})
    progress = recipe.ReportProgress(ctx)
    state = SimpleNamespace(global_step=5, max_steps=10, epoch=0.5, num_input_tokens_seen=500)
    progress.on_step_begin(None, state, SimpleNamespace())
    for step in (6, 7, 8):
        state.global_step = step
        progress.on_log(None, state, SimpleNamespace(), logs={"loss": 0.1, "learning_rate": 1e-4})
    steps = [r["step"] for r in reports if r.get("logged")]
    assert steps == [1, 2, 3, 4, 5, 6, 7, 8]  # each step once


def test_a_stop_request_asks_the_trainer_to_save_and_stop(tmp_path):
    ctx, _ = recording_context(tmp_path)
    ctx.stop.in_loop = True
    ctx.stop.set("cancel")
    progress = recipe.ReportProgress(ctx)
    control = SimpleNamespace(should_save=False, should_training_stop=False)
    state = SimpleNamespace(global_step=3, max_steps=10, epoch=0.1, num_input_tokens_seen=30)
    progress.on_step_begin(None, state, control)
    progress.on_step_end(None, state, control)
    assert control.should_save and control.should_training_stop


def test_step_progress_reaches_the_store_about_once_a_second(tmp_path, monkeypatch):
    """Fifty 10 ms steps report their step and ETA a handful of times, not fifty; the last step always."""
    clock = Clock()
    monkeypatch.setattr(recipe.time, "monotonic", clock)
    ctx, reports = recording_context(tmp_path)
    progress = recipe.ReportProgress(ctx)
    state = SimpleNamespace(global_step=0, max_steps=50, epoch=0.0, num_input_tokens_seen=0)
    control = SimpleNamespace()
    for step in range(1, 51):
        progress.on_step_begin(None, state, control)
        clock.now += 0.01
        state.global_step = step
        progress.on_step_end(None, state, control)
    steps = [r["step"] for r in reports if "eta_seconds" in r]
    assert steps[-1] == 50 and len(steps) <= 3, steps
