"""The job state machine, written down once.

    validating -> queued -> running -> succeeded | failed | cancelled | interrupted

    interrupted -> queued            (resume_job: the worker continues from the last checkpoint)
    cancelled   -> queued            (resume_job, when the cancel left a checkpoint)

`validating` covers the checks a job needs before it may wait for a slot (its base model can be found);
`interrupted` is a worker that died or was stopped without finishing (killed, OOM-killed, host shutdown).
`resumable` below is the one rule for which stopped jobs `resume_job` continues in place.
"""

from __future__ import annotations

import re
from enum import StrEnum

from fts_mcp.errors import IllegalTransition, InvalidArgument


class JobState(StrEnum):
    VALIDATING = "validating"
    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"
    INTERRUPTED = "interrupted"

    @property
    def terminal(self) -> bool:
        return self in TERMINAL


TERMINAL = frozenset({JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLED, JobState.INTERRUPTED})

TRANSITIONS: dict[JobState, frozenset[JobState]] = {
    JobState.VALIDATING: frozenset({JobState.QUEUED, JobState.FAILED, JobState.CANCELLED}),
    JobState.QUEUED: frozenset({JobState.RUNNING, JobState.FAILED, JobState.CANCELLED}),
    JobState.RUNNING: frozenset({JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLED, JobState.INTERRUPTED}),
    JobState.INTERRUPTED: frozenset({JobState.QUEUED}),
    JobState.SUCCEEDED: frozenset(),
    JobState.FAILED: frozenset(),
    JobState.CANCELLED: frozenset({JobState.QUEUED}),
}


def resumable(state: JobState, has_checkpoint: bool) -> bool:
    """Whether `resume_job` continues a job in place: an interrupted job always (from its last checkpoint, or
    from the start when it had none: merge and generate jobs simply run again); a cancelled job when the cancel
    left a checkpoint to continue from. Succeeded and failed jobs do not resume."""
    return state == JobState.INTERRUPTED or (state == JobState.CANCELLED and has_checkpoint)


class StaleState(Exception):
    """The job left the state the caller expected before the caller could act (another process won)."""


def check_transition(job_id: str, current: JobState, target: JobState) -> None:
    """Raise `IllegalTransition` unless the table allows `current -> target`."""
    if target not in TRANSITIONS[current]:
        allowed = ", ".join(sorted(TRANSITIONS[current])) or "none (terminal)"
        raise IllegalTransition(f"job {job_id} is {current}; it cannot become {target} "
                                f"(allowed from {current}: {allowed})", param="job_id")


JOB_ID_RE = re.compile(r"job-[0-9a-f]{12}")  # use with fullmatch: `$` would let a trailing newline in


def check_job_id(job_id: str, param: str = "job_id") -> str:
    if not isinstance(job_id, str) or not JOB_ID_RE.fullmatch(job_id):
        raise InvalidArgument(f"{job_id!r} is not a job id; job ids look like 'job-' followed by 12 hex digits "
                              "(list_jobs shows them)", param=param)
    return job_id
