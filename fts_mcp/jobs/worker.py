"""`python -m fts_mcp.jobs.worker JOB_ID`: the detached process that owns one job.

It is two processes, as rq's worker and its work horse are:

* the **supervisor** (this module's `supervise`) starts the job's work in a child, writes the heartbeat
  every second, forwards SIGTERM, and when the child exits without recording a terminal state it records
  how it died (`interrupted` with the exit code or signal; `cancelled` if a cancel was asked for);
* the **work horse** (`--run`) runs the job's recipe (`fts_mcp.jobs.kinds`), the only place torch is imported.
  It hands the recipe a `JobContext` over the store, so recipes never touch SQLite. SIGTERM asks it to
  checkpoint and stop.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import threading
import time
import traceback

from fts_mcp.config import Settings
from fts_mcp.errors import FtsError
from fts_mcp.io import write_json_atomic
from fts_mcp.jobs.context import JobContext, Stop, StopSignal
from fts_mcp.jobs.kinds import KINDS, recipe
from fts_mcp.jobs.models import Artifacts, Job, JobError, error_of
from fts_mcp.jobs.ranks import RankLost, run_ranks
from fts_mcp.jobs.runner import Runner, settle
from fts_mcp.jobs.states import JobState, check_job_id
from fts_mcp.jobs.store import RESULT_NAME, JobStore

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


def _watch_parent(stop: StopSignal) -> None:
    """The work horse stops itself (with a checkpoint) if its supervisor dies."""
    parent = os.getppid()
    while os.getppid() == parent:
        time.sleep(1.0)
    stop.reason = stop.reason or "supervisor_lost"
    if not stop.in_loop:
        os.kill(os.getpid(), signal.SIGTERM)


def work(job_id: str) -> int:
    settings = Settings.from_env()
    store = JobStore(settings)
    stop = StopSignal()
    signal.signal(signal.SIGTERM, lambda *_: stop.set("cancel" if _cancel_asked(store, job_id) else "terminated"))
    threading.Thread(target=_watch_parent, args=(stop,), daemon=True, name="parent-watch").start()
    job = store.get(job_id, log_lines=0)
    (store.job_dir(job_id) / RESULT_NAME).unlink(missing_ok=True)  # a resumed job starts without an outcome
    try:
        if _cancel_asked(store, job_id):
            raise Stop("cancel")
        outcome = run_job(job, store, stop)
    except Stop:
        outcome = None
    except RankLost as exc:  # a data-parallel rank died: like a killed worker, it resumes from the checkpoint
        log.error("job %s: %s", job_id, exc.message)
        record_outcome(store, job_id, JobState.INTERRUPTED, JobError(code=exc.code, message=exc.message))
        return 1
    except FtsError as exc:
        log.error("job %s failed: %s", job_id, exc)
        record_outcome(store, job_id, JobState.FAILED, error_of(exc))
        return 1
    except Exception as exc:  # process boundary: anything else is recorded, with the traceback in the log
        traceback.print_exc()
        record_outcome(store, job_id, JobState.FAILED, error_of(exc))
        return 1
    if outcome is not None:
        record_outcome(store, job_id, JobState.SUCCEEDED, None, artifacts=outcome)
        return 0
    if _cancel_asked(store, job_id):
        record_outcome(store, job_id, JobState.CANCELLED, None)
    else:
        record_outcome(store, job_id, JobState.INTERRUPTED, JobError(
            code="worker_stopped", message=f"the worker stopped before finishing ({stop.reason}); "
                                           "resume_job continues from the last checkpoint"))
    return 0


def run_job(job: Job, store: JobStore, stop: StopSignal) -> Artifacts | None:
    """Run the job's recipe with a context over the store; None means it stopped early with a checkpoint."""
    spec = KINDS[job.kind].spec.model_validate(job.spec)

    def report(figures: dict, event: bool = True) -> None:
        store.update_progress(job.job_id, figures, event="progress" if event else None)

    workers = getattr(getattr(spec, "training", None), "workers", 1)
    if workers > 1:  # data parallel: the ranks run the recipe, rank 0 reports
        return run_ranks(job, store, stop, workers)
    ctx = JobContext(job_id=job.job_id, workdir=store.job_dir(job.job_id), report=report,
                     checkpoint=lambda folder: store.set_checkpoint(job.job_id, folder),
                     stop=stop, rewind=lambda step: store.rewind_progress(job.job_id, step))
    return recipe(job.kind)(spec, ctx)


def _cancel_asked(store: JobStore, job_id: str) -> bool:
    return store.raw(job_id)["cancel_requested_at"] is not None


def record_outcome(store: JobStore, job_id: str, state: JobState, error: JobError | None,
                   artifacts: Artifacts | None = None) -> None:
    """Leave the job's outcome in its folder (result.json); `settle` records it once the work has stopped."""
    write_json_atomic(store.job_dir(job_id) / RESULT_NAME, {
        "state": state.value, "error": error.model_dump() if error else None,
        "artifacts": artifacts.model_dump() if artifacts else None})


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        stream=sys.stderr)
    if args and args[0] == "--run":
        return work(check_job_id(args[1]))
    return supervise(check_job_id(args[0]))


if __name__ == "__main__":
    raise SystemExit(main())
