"""The job runner: schedules queued jobs onto free slots, starts one detached supervisor per job, and notices
supervisors that died without recording how their job ended.

A job's supervisor is either a local worker (`fts_mcp.jobs.worker`, on this host's GPU or CPU slots) or, with
`FTS_RUNNER=ray`, a Ray job's supervisor (`fts_mcp.jobs.ray.runner`, on a `ray:N` slot) that submits the job to a
Ray cluster and brings its progress, log and artifacts back. Either way the job looks the same to its callers.
Runtime jobs (a managed edge runtime listening on this host's loopback) always run locally, on slots of their own
when the host has no GPU (`store.pools` says which slots each kind takes).

Every server process runs `tick()` about once a second. All decisions go through the store's atomic
transitions and claims, so any number of servers can share one FTS_HOME. Trouble with one job is logged once and
never stops the tick from checking the others and starting queued jobs.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import threading
import time

import psutil

from fts_mcp.config import Settings
from fts_mcp.errors import InvalidArgument
from fts_mcp.jobs.outcome import settle
from fts_mcp.jobs.records import Job, JobError
from fts_mcp.jobs.states import JobState, StaleState
from fts_mcp.jobs.store import LOG_NAME, JobStore, StoreUnavailable, pools

log = logging.getLogger(__name__)


def pid_alive(pid: int | None) -> bool:
    """True while `pid` is a live (non-zombie) process."""
    if not pid:
        return False
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False
    except psutil.AccessDenied:
        return True


class Runner:
    def __init__(self, settings: Settings, store: JobStore) -> None:
        self.settings = settings
        self.store = store
        self._lock = threading.Lock()  # the monitor loop and tool calls may tick at once
        self._troubles: dict[str, str] = {}  # running job -> the unexpected error last logged for it

    # ---- operations the tools call -------------------------------------------------------------------------

    def cancel(self, job_id: str) -> Job:
        """Cancel a job: at once if it has not started; else SIGTERM, the worker checkpoints and records it.
        A job that has already ended is returned unchanged (cancelling is idempotent)."""
        job = self.store.get(job_id)
        if job.state in (JobState.VALIDATING, JobState.QUEUED):
            try:
                return self.store.transition(job_id, JobState.CANCELLED, expect=job.state)
            except StaleState:
                job = self.store.get(job_id)  # it started meanwhile: cancel the running worker below
        if job.state != JobState.RUNNING:
            return job
        # Flag first, then look for the work horse: either we see its pid and signal it, or its supervisor (which
        # records the pid before reading the flag) sees the flag and forwards SIGTERM itself.
        if self.store.raw(job_id)["cancel_requested_at"] is None:
            self.store.set_fields(job_id, cancel_requested_at=time.time())
        self._signal(self.store.raw(job_id)["pid"], signal.SIGTERM)
        return self.store.get(job_id)

    def resume(self, job_id: str) -> Job:
        """Queue a stopped job again (the rule is `states.resumable`); its worker continues from the last
        checkpoint."""
        job = self.store.get(job_id)
        if not job.resumable:
            why = "it left no checkpoint" if job.state == JobState.CANCELLED else f"it is {job.state}"
            hint = (" A finished training job continues as a new job: start_qlora_job(resume_from=...)"
                    if job.state in (JobState.SUCCEEDED, JobState.FAILED) and job.kind == "train" else "")
            raise InvalidArgument(f"job {job_id} cannot resume: {why}; interrupted jobs, and cancelled jobs with a "
                                  f"checkpoint, resume in place.{hint}", param="job_id")
        try:
            self.store.transition(job_id, JobState.QUEUED, expect=job.state)
        except StaleState:
            pass  # another process resumed it first: the same outcome
        self.tick()
        return self.store.get(job_id)

    # ---- the loop every server runs ------------------------------------------------------------------------

    def tick(self) -> None:
        """Declare dead workers, enforce the cancel grace period, start queued jobs on free slots."""
        with self._lock:
            running = self.store.ids_in(JobState.RUNNING)
            self._troubles = {job_id: said for job_id, said in self._troubles.items() if job_id in running}
            for job_id in running:
                self._check_guarded(job_id)
            for pool in pools(self.settings):
                while (claim := self.store.claim_next(pool.slots, pool.kinds, pool.one_slot_each)) is not None:
                    self._spawn(*claim)

    def _check_guarded(self, job_id: str) -> None:
        """Check one running job; an error about it is logged (once, until it changes) and the tick goes on."""
        try:
            self._check_running(job_id)
        except StaleState:
            pass  # another process moved it on first
        except StoreUnavailable:
            raise  # the whole store, not this job: the caller reports it
        except Exception as exc:  # a boundary: one job's trouble must not stop every other job (see the module)
            said = f"{type(exc).__name__}: {exc}"
            if self._troubles.get(job_id) != said:
                log.exception("job %s could not be checked (%s); the other jobs go on", job_id, said)
                self._troubles[job_id] = said
            return
        self._troubles.pop(job_id, None)

    def _check_running(self, job_id: str) -> None:
        raw = self.store.raw(job_id)
        now = time.time()
        # A Ray job's supervisor is given longer: the cluster enforces the grace period, then the supervisor still
        # brings the checkpoint back.
        grace = self.settings.cancel_grace_seconds
        if raw["ray_job_id"]:
            grace = 2 * grace + 60
        if raw["cancel_requested_at"] and now - raw["cancel_requested_at"] > grace:
            log.warning("job %s did not stop within %.0fs of SIGTERM; sending SIGKILL", job_id, grace)
            self._signal(raw["pid"], signal.SIGKILL)
        supervisor = raw["supervisor_pid"]
        if supervisor is None:
            if now - (raw["claimed_at"] or now) > self.settings.start_timeout_seconds:
                self.store.transition(job_id, JobState.INTERRUPTED, expect=JobState.RUNNING, error=JobError(
                    code="worker_not_started", message="the job was claimed but its worker never started "
                                                       "(the server that claimed it may have exited)"))
            return
        if pid_alive(supervisor):
            return
        beat = raw["heartbeat_at"] or raw["claimed_at"] or 0
        if now - beat < self.settings.heartbeat_stale_seconds:
            return  # just exited: give it a moment to record its own terminal state
        # The supervisor normally records how its worker ended; it is gone without doing so.
        if raw["ray_job_id"]:  # its supervisor is gone: nobody brings the cluster's work back, so stop it there
            from fts_mcp.jobs.ray.cluster import stop_abandoned  # lazy: the one door to Ray, used only for its jobs

            stop_abandoned(self.settings, raw["ray_job_id"])
        elif pid_alive(raw["pid"]):
            # An orphaned worker must not keep the slot's GPU: ask it to checkpoint and stop, as a cancel does,
            # and kill it once the grace period has passed too. It is settled on a later tick, once it has exited.
            late = now - beat > self.settings.heartbeat_stale_seconds + self.settings.cancel_grace_seconds
            self._signal(raw["pid"], signal.SIGKILL if late else signal.SIGTERM)
            return
        settle(self.store, job_id, None)

    def _spawn(self, job_id: str, slot: str) -> None:
        folder = self.store.job_dir(job_id)
        env = {**os.environ, "FTS_HOME": str(self.settings.home), "PYTHONUNBUFFERED": "1",
               "TOKENIZERS_PARALLELISM": "false"}
        gpus = [self._physical_gpu(s) for s in slot.split(",") if s.startswith("cuda:")]
        env["CUDA_VISIBLE_DEVICES"] = ",".join(gpus)  # several: one per data-parallel rank; none: the CPU
        # Double fork through sh: the worker is not our child, so it outlives this process and leaves no zombie
        # for us to reap; `echo $!` hands back its pid.
        module = "fts_mcp.jobs.ray.runner" if slot.startswith("ray:") else "fts_mcp.jobs.worker"
        command = [sys.executable, "-m", module, job_id]
        try:
            with (folder / LOG_NAME).open("ab") as logfile:
                done = subprocess.run(["/bin/sh", "-c", '"$@" </dev/null 2>&1 & echo $! >&2', "sh", *command],
                                      cwd=folder, env=env, stdin=subprocess.DEVNULL, stdout=logfile,
                                      stderr=subprocess.PIPE, start_new_session=True, check=True, timeout=30)
            pid = int(done.stderr)
        except (OSError, ValueError, subprocess.SubprocessError) as exc:
            self.store.transition(job_id, JobState.FAILED, error=JobError(
                code="worker_spawn_failed", message=f"could not start the worker: {exc}"))
            return
        self.store.set_fields(job_id, supervisor_pid=pid)
        log.info("job %s started on %s (supervisor pid %d)", job_id, slot, pid)

    def _physical_gpu(self, slot: str) -> str:
        index = int(slot.split(":")[1])
        wanted = self.settings.env.get("FTS_GPUS")
        if wanted and wanted.strip().lower() not in ("none", "cpu"):
            return wanted.split(",")[index].strip()
        visible = self.settings.env.get("CUDA_VISIBLE_DEVICES")
        if visible:
            return visible.split(",")[index].strip()
        return str(index)

    @staticmethod
    def _signal(pid: int | None, sig: signal.Signals) -> None:
        if pid:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
