"""Jobs as callers see them: one submit path for every kind, status, list, cancel, resume, logs, loss curve.

Everything here goes through the store's atomic transitions and the runner, so it is safe from any number of
server and CLI processes sharing one FTS_HOME.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel

from fts_mcp.config import Settings
from fts_mcp.errors import FtsError, InvalidArgument
from fts_mcp.jobs.records import Job, JobError, JobKind, JobList
from fts_mcp.jobs.runner import Runner
from fts_mcp.jobs.states import JobState, check_job_id
from fts_mcp.jobs.store import JobStore
from fts_mcp.models.refs import check_available

LOG_BYTES = 256 * 1024
PLACEMENT_SECONDS = 10.0  # reading the cluster's resources at submit; past it the job is submitted unchecked


class Jobs:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        if settings.runner == "ray":
            from fts_mcp.jobs.ray.cluster import require_ray  # lazy: the Ray adapter only when jobs go to a cluster

            require_ray()
        self.store = JobStore(settings)
        self.runner = Runner(settings, self.store)

    def close(self) -> None:
        self.store.close()

    def placement(self, workers: int) -> tuple[float, str] | None:
        """On a Ray cluster (FTS_RUNNER=ray): the GPUs each of the job's workers will ask for, and a line saying
        where it runs and why. A job the cluster could never hold is refused here, before it exists, with the
        numbers and the setting to change (`ray_cluster_too_small`). None with the local runner."""
        if self.settings.runner != "ray":
            return None
        from fts_mcp.jobs.ray.cluster import bounded, connect, read_resources
        from fts_mcp.jobs.ray.runner import decide

        try:  # connecting asks the dashboard too: an unreachable or silent cluster is not checked now, never a hang
            cluster, unread = bounded(lambda: read_resources(connect(self.settings)), timeout=PLACEMENT_SECONDS), None
        except Exception as exc:  # noqa: BLE001 - its supervisor checks again, and retries an unreachable cluster
            cluster, unread = None, f"{type(exc).__name__}: {exc}"[:300]
        ask, note = decide(cluster, self.settings, workers, unread)
        return ask.gpus, note

    def submit(self, kind: JobKind, spec: BaseModel, *, model: str | None = None, placed: bool = False) -> Job:
        """Create a job (validating), check its base model can be found, queue it and start it if a slot is free.

        A model that cannot be found fails the job with the reason (it stays on record); on a Ray cluster a job it
        could never hold is refused before it is created (`placed`: the caller has asked `placement` already).
        Everything else was checked by the caller before calling here.
        """
        if not placed and kind != "runtime":  # runtimes always run on this host
            self.placement(1)  # only training jobs have several workers, and they ask first
        job = self.store.create(kind, spec.model_dump())
        if model is not None:
            try:
                check_available(model, self.settings)
            except FtsError as exc:
                return self.store.transition(job.job_id, JobState.FAILED,
                                             error=JobError(code=exc.code, message=exc.message, param=exc.param))
        self.store.transition(job.job_id, JobState.QUEUED)
        self.runner.tick()
        return self.store.get(job.job_id)

    def get(self, job_id: str, log_lines: int = 20) -> Job:
        return self.store.get(check_job_id(job_id), log_lines=log_lines)

    def list(self, state: str | None = None, limit: int = 20) -> JobList:
        if state is not None and state not in JobState.__members__.values():
            raise InvalidArgument(f"{state!r} is not a job state; use one of {', '.join(JobState)}", param="state")
        if not 1 <= limit <= 1000:
            raise InvalidArgument(f"limit must be between 1 and 1000, got {limit}", param="limit")
        return self.store.list(JobState(state) if state else None, limit)

    def cancel(self, job_id: str) -> Job:
        return self.runner.cancel(check_job_id(job_id))

    def resume(self, job_id: str) -> Job:
        return self.runner.resume(check_job_id(job_id))

    def log(self, job_id: str, max_bytes: int = LOG_BYTES) -> str:
        """The end of the job's worker log (at most `max_bytes`)."""
        self.get(job_id, log_lines=0)
        path = self.store.log_path(job_id)
        if not path.exists():
            return ""
        with path.open("rb") as fh:
            size = fh.seek(0, 2)
            fh.seek(max(0, size - max_bytes))
            return fh.read().decode("utf-8", "replace")

    def log_from(self, job_id: str, offset: int, max_bytes: int = LOG_BYTES) -> tuple[str, int]:
        """The log from byte `offset` on (at most `max_bytes`), and the offset to read from next."""
        self.get(job_id, log_lines=0)
        path = self.store.log_path(job_id)
        if not path.exists():
            return "", offset
        with path.open("rb") as fh:
            fh.seek(offset)
            data = fh.read(max_bytes)
        return data.decode("utf-8", "replace"), offset + len(data)

    def ids_in(self, *states: JobState) -> list[str]:
        return self.store.ids_in(*states)

    def folder(self, job_id: str) -> Path:
        return self.store.job_dir(check_job_id(job_id))

    def events(self, job_id: str, kind: str | None = None) -> list[dict]:
        self.get(job_id, log_lines=0)
        return self.store.events(job_id, kind=kind)

    def loss_curve(self, job_id: str) -> bytes:
        from fts_mcp.plots import loss_curve_png  # lazy: matplotlib is only loaded when a plot is asked for

        job = self.get(job_id, log_lines=0)
        return loss_curve_png(self.store.events(job_id, kind="progress"),
                              title=f"{job.spec.get('output_name', job.kind)} ({job_id})")
