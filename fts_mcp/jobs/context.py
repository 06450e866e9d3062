"""What a recipe gets from the runner: `run(spec, ctx) -> Artifacts`.

A recipe knows nothing of the job store. It reads its typed spec, works in `ctx.workdir`, reports figures with
`ctx.report`, records checkpoints with `ctx.checkpoint`, and looks at `ctx.stop` between steps. A job process on
this host hands it a context over the store (`fts_mcp.jobs.host`), a Ray job one over frames in its log
(`fts_mcp.jobs.ray.node`), a data-parallel rank other than 0 a silent one; a test can build one over a list.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any


class Stop(BaseException):
    """Raised in the work horse's main thread when it must stop before a loop could checkpoint."""


class StopSignal:
    """Set by SIGTERM (cancel) or by losing the supervisor; read by a recipe's loop at each step end.

    Outside a loop (`in_loop` false: loading, tokenizing) there is nothing to checkpoint, so setting it raises
    `Stop` at once.
    """

    def __init__(self) -> None:
        self.reason: str | None = None
        self.in_loop = False

    def set(self, reason: str) -> None:
        self.reason = self.reason or reason
        if not self.in_loop:
            raise Stop(reason)

    def __bool__(self) -> bool:
        return self.reason is not None


@dataclass
class JobContext:
    job_id: str
    workdir: Path
    report: Callable[..., None]
    """`report(figures, event=True)`: merge figures (step, loss, phase...) into the job's progress; with `event`,
    also append them to the job's events (the loss curve and `fts://jobs/{id}/metrics` read those)."""
    checkpoint: Callable[[Path], None]
    """Record the latest resumable checkpoint folder."""
    stop: StopSignal
    rewind: Callable[[int], None] = lambda step: None
    """`rewind(step)`: the run continues from a checkpoint at `step`; figures reported past it by an earlier
    attempt are dropped, so no step appears twice in the job's events (and loss curve)."""

    def phase(self, name: str) -> None:
        self.report({"phase": name}, event=False)


def silent_context(job_id: str, workdir: Path, stop: StopSignal) -> JobContext:
    """A data-parallel rank other than 0: it trains, and reports and records nothing (rank 0 does)."""
    return JobContext(job_id=job_id, workdir=workdir, stop=stop, checkpoint=lambda folder: None,
                      report=lambda figures, event=True: None)


def recording_context(workdir: Path, job_id: str = "job-000000000000") -> tuple[JobContext, list[dict[str, Any]]]:
    """A context that keeps what the recipe reports in a list: for tests and benchmarks, without a store."""
    reports: list[dict[str, Any]] = []
    checkpoints: list[Path] = []

    def rewind(step: int) -> None:
        reports[:] = [r for r in reports if r.get("step") is None or r["step"] <= step]

    ctx = JobContext(job_id=job_id, workdir=workdir,
                     report=lambda figures, event=True: reports.append(dict(figures)),
                     checkpoint=checkpoints.append, stop=StopSignal(), rewind=rewind)
    return ctx, reports
