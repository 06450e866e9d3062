"""How a job's run ended, decided in one place.

Every process that runs a recipe hosts it through `run_recipe`: the local work horse, each local data-parallel
rank, and on a Ray cluster the job's entrypoint and each Ray Train rank. It validates the spec, runs the recipe
with the context it is given and turns however that ended into an `Outcome`; what each process then does with it
(leave it in `result.json`, exit with a status its parent reads, send it as a frame) is its own business.

The rest is how an outcome becomes the job's record: `record_outcome` leaves it in the job's folder, and `settle`
applies it once the work has stopped, reading a process that died without one as `death_error` says.

A Ray job imports this module on the cluster, where there is no job store: it must not load the store (SQLite).
"""

from __future__ import annotations

import signal
import sys
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel

from fts_mcp.errors import FtsError
from fts_mcp.files import write_json_atomic
from fts_mcp.jobs.context import JobContext, Stop
from fts_mcp.jobs.kinds import KINDS, recipe
from fts_mcp.jobs.records import Artifacts, JobError, JobResult
from fts_mcp.jobs.states import JobState, StaleState

if TYPE_CHECKING:  # only for the annotation: see the module's last paragraph
    from fts_mcp.jobs.store import JobStore


@dataclass(frozen=True)
class Outcome:
    """How one run of a recipe ended.

    `succeeded` with its artifacts; `stopped` by a cancel or a lost supervisor (after a checkpoint, when it got that
    far); `failed` with its error; `lost` when another rank of the job died under it (the job is then interrupted and
    resumes, as for any killed worker).
    """

    state: Literal["succeeded", "stopped", "failed", "lost"]
    artifacts: Artifacts | None = None
    error: JobError | None = None
    exception: Exception | None = None
    """What ended a failed or lost run, for a caller that passes it on (a Ray Train rank raises it again)."""


def run_recipe(kind: str, spec: dict[str, Any], ctx: JobContext, *, peers: bool = False,
               launch: Callable[[BaseModel, JobContext], Artifacts | None] | None = None) -> Outcome:
    """Validate `spec` as the kind's spec, run it with `ctx` and say how that ended.

    `launch` runs the valid spec (default: the kind's recipe; the work horse passes one that starts ranks). `peers`:
    this run is one rank of several, so an error that says a collective's connection broke (`peer_lost`) means
    another rank is gone. The process boundary of every job process: any exception becomes the outcome, with its
    traceback in the job's log unless it is one of ours (an FtsError says what went wrong itself).
    """
    try:
        valid = KINDS[kind].spec.model_validate(spec)
        artifacts = (launch or recipe(kind))(valid, ctx)
    except Stop:
        return Outcome("stopped")
    except Exception as exc:  # the process boundary (see above)
        if not isinstance(exc, FtsError):
            traceback.print_exc()
        lost = isinstance(exc, RankLost) or (peers and peer_lost(exc))
        return Outcome("lost" if lost else "failed", error=error_of(exc), exception=exc)
    return Outcome("succeeded", artifacts) if artifacts is not None else Outcome("stopped")


# ---- error and death codes ----------------------------------------------------------------------------------


class RankLost(FtsError):
    """A rank of a data-parallel job died; the others were stopped."""

    code = "worker_killed"


PEER_GONE = ("connection closed by peer", "connection reset by peer", "broken pipe", "socket timeout")


def peer_lost(exc: BaseException) -> bool:
    """Whether a data-parallel rank failed because another rank is gone (a collective's connection broke), not by
    a fault of its own: the job is then `interrupted` like any lost worker, not `failed`."""
    dist = sys.modules.get("torch.distributed")
    if dist is not None and isinstance(exc, getattr(dist, "DistError", ())):
        return True
    text = str(exc).lower()
    return any(words in text for words in PEER_GONE)


def error_of(exc: BaseException) -> JobError:
    """The job's error for an exception: an FtsError as it says (code, message, the argument at fault), anything
    else as `unexpected_error` does."""
    if isinstance(exc, FtsError):
        return JobError(code=exc.code, message=exc.message, param=exc.param)
    return unexpected_error(exc)


def unexpected_error(exc: BaseException) -> JobError:
    """A job's error for an exception its recipe did not expect (the traceback goes to the job's log)."""
    name = type(exc).__name__
    if "OutOfMemoryError" in name:
        return JobError(code="out_of_memory", message=f"{exc}. Lower training.micro_batch_size or "
                        "training.max_seq_len, keep gradient_checkpointing on, or use quantization='nf4'")
    return JobError(code="internal_error", message=f"{name}: {exc}")


def signal_name(code: int) -> str:
    """The signal behind a negative exit status (-9: SIGKILL)."""
    try:
        return signal.Signals(-code).name
    except ValueError:
        return f"signal {-code}"


def death_error(exit_code: int | None, *, cancelled: bool = False) -> JobError:
    """How a worker ended, for the job's `error` field."""
    if exit_code is None:
        return JobError(code="worker_lost", message="the worker process disappeared and nobody saw it exit "
                                                    "(its supervisor was killed or the host restarted)")
    if exit_code < 0:
        name = signal_name(exit_code)
        hint = " (SIGKILL is also what the kernel's out-of-memory killer sends)" if name == "SIGKILL" else ""
        return JobError(code="worker_killed", message=f"the worker was killed by {name}{hint}")
    return JobError(code="worker_crashed", message=f"the worker exited with status {exit_code} without finishing; "
                                                  "see log_tail")


# ---- the job's record ---------------------------------------------------------------------------------------


def record_outcome(store: JobStore, job_id: str, state: JobState, error: JobError | None,
                   artifacts: Artifacts | None = None) -> None:
    """Leave the job's outcome in its folder (result.json); `settle` records it once the work has stopped."""
    write_json_atomic(store.result_path(job_id), JobResult(state=state.value, error=error, artifacts=artifacts)
                      .model_dump(mode="json"))


def settle(store: JobStore, job_id: str, exit_code: int | None) -> None:
    """Record how a job ended, once its work horse has exited (so its GPU memory is already free).

    The work horse's own result file wins (an unreadable one is set aside and reads `interrupted`, naming the
    file: `JobStore.read_result`); without one, a requested cancel reads `cancelled` and anything else
    `interrupted`, with the exit code or signal.
    """
    raw = store.raw(job_id)
    if raw["state"] != JobState.RUNNING:
        return
    artifacts = None
    if (result := store.read_result(job_id)) is not None:
        state, error, artifacts = JobState(result.state), result.error, result.artifacts
    elif raw["cancel_requested_at"] is not None:
        state, error = JobState.CANCELLED, None
    else:
        state, error = JobState.INTERRUPTED, death_error(exit_code)
    try:
        store.transition(job_id, state, expect=JobState.RUNNING, error=error, exit_code=exit_code, artifacts=artifacts)
    except StaleState:
        pass
