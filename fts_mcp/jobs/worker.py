"""`python -m fts_mcp.jobs.worker JOB_ID`: the detached process that owns one job.

It is two processes, as rq's worker and its work horse are:

* the **supervisor** (this module's `supervise`) starts the job's work in a child, writes the heartbeat
  every second, forwards SIGTERM, and when the child exits without recording a terminal state it records
  how it died (`interrupted` with the exit code or signal; `cancelled` if a cancel was asked for);
* the **work horse** (`--run`) runs the job's recipe (`fts_mcp.jobs.kinds`), or a data-parallel job's ranks
  (`fts_mcp.jobs.ranks`), the only place torch is imported. It hands the recipe a `JobContext` over the store
  (`fts_mcp.jobs.host`), so recipes never touch SQLite; `fts_mcp.jobs.outcome` says how the run ended, which it
  leaves in the job's folder for the supervisor to record. SIGTERM asks it to checkpoint and stop.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import threading
from functools import partial

from pydantic import BaseModel

from fts_mcp.config import Settings
from fts_mcp.errors import FtsError
from fts_mcp.jobs.context import JobContext, Stop, StopSignal
from fts_mcp.jobs.host import store_context, watch_parent
from fts_mcp.jobs.kinds import recipe
from fts_mcp.jobs.outcome import Outcome, record_outcome, run_recipe, settle
from fts_mcp.jobs.ranks import run_ranks
from fts_mcp.jobs.records import Artifacts, JobError
from fts_mcp.jobs.runner import Runner
from fts_mcp.jobs.states import JobState, check_job_id
from fts_mcp.jobs.store import JobStore

log = logging.getLogger("fts_mcp.worker")


def supervise(job_id: str) -> int:
    settings = Settings.from_env()
    store = JobStore(settings)
    store.set_fields(job_id, supervisor_pid=os.getpid())
    store.heartbeat(job_id)
    child: subprocess.Popen | None = None
    cancel_before_start = threading.Event()

    def forward(signum: int, _frame: object) -> None:
        if child is not None and child.poll() is None:
            child.send_signal(signum)
        else:
            cancel_before_start.set()

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    child = subprocess.Popen([sys.executable, "-m", "fts_mcp.jobs.worker", "--run", job_id],
                             stdin=subprocess.DEVNULL)
    store.set_fields(job_id, pid=child.pid)
    if cancel_before_start.is_set() or store.raw(job_id)["cancel_requested_at"] is not None:
        child.send_signal(signal.SIGTERM)  # cancelled before anyone could see the pid (see Runner.cancel)
    while True:
        try:
            code = child.wait(timeout=settings.heartbeat_seconds)
            break
        except subprocess.TimeoutExpired:
            store.heartbeat(job_id)
    settle(store, job_id, code)
    log.info("job %s: work horse exited with %s", job_id, code)
    Runner(settings, store).tick()  # hand the freed slot to the next queued job, with or without a live server
    store.close()
    return 0


def work(job_id: str) -> int:
    """The work horse: run the job, leave its outcome; 1 when it failed or lost a rank, else 0."""
    settings = Settings.from_env()
    store = JobStore(settings)
    stop = StopSignal()
    signal.signal(signal.SIGTERM, lambda *_: stop.set("cancel" if _cancel_asked(store, job_id) else "terminated"))
    watch_parent(partial(_supervisor_lost, stop), every=1.0)
    job = store.get(job_id, log_lines=0)
    store.result_path(job_id).unlink(missing_ok=True)  # a resumed job starts without an outcome
    try:
        if _cancel_asked(store, job_id):
            raise Stop("cancel")
        outcome = run_recipe(job.kind, job.spec, store_context(store, job_id, stop), launch=partial(launch, job.kind))
    except Stop:
        outcome = Outcome("stopped")
    if outcome.state == "lost":  # a data-parallel rank died: like a killed worker, it resumes from the checkpoint
        log.error("job %s: %s", job_id, outcome.error.message)
        record_outcome(store, job_id, JobState.INTERRUPTED, outcome.error)
        return 1
    if outcome.state == "failed":
        if isinstance(outcome.exception, FtsError):  # anything else left its traceback in the log
            log.error("job %s failed: %s", job_id, outcome.exception)
        record_outcome(store, job_id, JobState.FAILED, outcome.error)
        return 1
    if outcome.state == "succeeded":
        record_outcome(store, job_id, JobState.SUCCEEDED, None, artifacts=outcome.artifacts)
    elif _cancel_asked(store, job_id):
        record_outcome(store, job_id, JobState.CANCELLED, None)
    else:
        record_outcome(store, job_id, JobState.INTERRUPTED, JobError(
            code="worker_stopped", message=f"the worker stopped before finishing ({stop.reason}); "
                                           "resume_job continues from the last checkpoint"))
    return 0


def launch(kind: str, spec: BaseModel, ctx: JobContext) -> Artifacts | None:
    """What the work horse runs: the kind's recipe, or for a data-parallel job (`workers: N`) its N ranks, rank 0
    reporting."""
    workers = getattr(getattr(spec, "training", None), "workers", 1)
    if workers > 1:
        return run_ranks(ctx, workers)
    return recipe(kind)(spec, ctx)


def _supervisor_lost(stop: StopSignal) -> None:
    """The work horse stops itself (with a checkpoint) if its supervisor dies."""
    stop.reason = stop.reason or "supervisor_lost"
    if not stop.in_loop:
        os.kill(os.getpid(), signal.SIGTERM)


def _cancel_asked(store: JobStore, job_id: str) -> bool:
    return store.raw(job_id)["cancel_requested_at"] is not None


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        stream=sys.stderr)
    if args and args[0] == "--run":
        return work(check_job_id(args[1]))
    return supervise(check_job_id(args[0]))


if __name__ == "__main__":
    raise SystemExit(main())
