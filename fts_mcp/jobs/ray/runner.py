"""`python -m fts_mcp.jobs.ray.runner JOB_ID`: the supervisor of a job that runs on a Ray cluster (FTS_RUNNER=ray).

It is to a Ray job what `fts_mcp.jobs.worker` is to a local one, started the same way by the same runner on the
server's host, with the same duties:

1. check the job fits the cluster (`fts_mcp.jobs.ray.placement`): GPUs and CPUs per worker, and workers, against
   what its nodes have. A job it could never hold fails at once, naming the numbers and the setting to change;
   with FTS_RAY_GPUS_PER_WORKER unset, the GPUs per worker are chosen from the cluster here (0 on a CPU cluster);
2. build the job's package: its spec, with every input path (dataset, local base model, adapters) replaced by a
   copy inside the package, and the last checkpoint of a resumed job. The cluster shares no filesystem with the
   server; the package travels as the Ray job's `working_dir`, this version of fts-mcp as a `py_module`;
3. submit it with Ray's Jobs API. The submission id is the job id and its attempt number, and it is recorded
   before the submit: the store's claim already gives each attempt to one server, and Ray refuses a second
   submit under the same id. Until the job reports its own progress its phase says what it waits for (busy
   resources with the numbers, its runtime environment) and for how long; past FTS_RAY_START_TIMEOUT_SECONDS the
   Ray job is stopped and the job fails with that reason;
4. follow the Ray job's log: ordinary lines go to the job's `worker.log`, frames (`fts_mcp.jobs.ray.frames`) to the
   store (progress, loss curve) and into the job's folder (checkpoints, the adapter, a merge's output);
5. pass a cancel (SIGTERM from `cancel_job`) on as `stop_job`: Ray sends the job SIGTERM, gives it
   FTS_CANCEL_GRACE_SECONDS to checkpoint, then kills it;
6. record the outcome once the Ray job has ended: the job's own result frame, else `cancelled` (a cancel was
   asked) or `interrupted` with what Ray says happened (a killed driver, a lost node).

A job whose supervisor dies is stopped on the cluster (by the local runner, through `fts_mcp.jobs.ray.cluster`) and
ends `interrupted`; resume_job submits it again from the last checkpoint that came back.
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
import re
import shutil
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any

import fts_mcp
from fts_mcp.config import Settings
from fts_mcp.errors import FtsError
from fts_mcp.files import write_json_atomic
from fts_mcp.jobs.outcome import error_of, record_outcome, settle
from fts_mcp.jobs.ray.cluster import bounded, connect, read_resources, try_stop
from fts_mcp.jobs.ray.frames import BadFrame, LineBuffer, Receiver, Storage, decode
from fts_mcp.jobs.ray.placement import Ask, Cluster, choose_gpus, free_resources, never_fits, waiting_for
from fts_mcp.jobs.records import Artifacts, Job, JobError, Progress
from fts_mcp.jobs.runner import Runner
from fts_mcp.jobs.states import JobState, check_job_id
from fts_mcp.jobs.store import JobStore
from fts_mcp.training.checkpoints import checkpoints, is_checkpoint, latest_checkpoint

log = logging.getLogger("fts_mcp.jobs.ray.runner")  # also run as __main__
ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")

PACKAGE = "ray-package"
MAX_PACKAGE_BYTES = 500 * 2**20  # Ray's working_dir limit is 512 MiB (its largest gRPC message)
INPUT_KEYS = frozenset({"base_model", "dataset", "resume_checkpoint", "path", "adapter_dir", "merged_dir"})
CHECKPOINTS_KEPT = 2  # as the trainer keeps them (save_total_limit)
UNREACHABLE_SECONDS = 120.0  # how long the cluster may not answer before the job is given up as interrupted
START_POLL_SECONDS = 2.0  # how often a job that has not started yet is looked at (its phase says why it waits)
WAITING = "waiting_for_cluster"


# ---- the package --------------------------------------------------------------------------------------------


def _inputs(node: Any, where: list[Any]) -> list[tuple[list[Any], Path]]:
    """Every (place in the spec, local path) the job reads: values of INPUT_KEYS that are existing absolute paths."""
    found: list[tuple[list[Any], Path]] = []
    items = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else ()
    for key, value in items:
        if isinstance(value, dict | list):
            found += _inputs(value, [*where, key])
        elif key in INPUT_KEYS and isinstance(value, str) and Path(value).is_absolute() and Path(value).exists():
            found.append(([*where, key], Path(value)))
    return found


def _link_or_copy(source: Path, target: Path) -> None:
    def one(src: str, dst: str) -> None:
        try:
            os.link(src, dst)  # no copy of a model's weights when the package is on the same filesystem
        except OSError:
            shutil.copy2(src, dst)

    target.parent.mkdir(parents=True, exist_ok=True)
    if source.is_dir():
        shutil.copytree(source, target, copy_function=one, ignore=shutil.ignore_patterns("__pycache__"))
    else:
        one(str(source), str(target))


def _size(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def _dotted(where: list[Any]) -> str:
    return "".join(f"[{k}]" if isinstance(k, int) else f".{k}" for k in where).lstrip(".")


def workers_of(job: Job) -> int:
    return (job.spec.get("training") or {}).get("workers", 1) if job.kind == "train" else 1


def package(job: Job, folder: Path, settings: Settings, sid: str, gpus: float | None = None) -> dict[str, Any]:
    """Lay out the job's package in `folder`; return its `job.json`. Refused before anything is copied when the
    inputs are over what a Ray job carries, naming the largest. `gpus`: per worker (FTS_RAY_GPUS_PER_WORKER, or
    what `placement` chose)."""
    spec = job.spec
    inputs = _inputs(spec, [])
    latest = latest_checkpoint(settings.job_dir(job.job_id) / "checkpoints") if job.kind == "train" else None
    sizes = {str(path): (_dotted(where), _size(path)) for where, path in inputs}
    if latest is not None:
        sizes[str(latest)] = ("the job's last checkpoint", _size(latest))
    total = sum(size for _, size in sizes.values())
    if total > MAX_PACKAGE_BYTES:
        name, size = max(sizes.values(), key=lambda item: item[1])
        raise InputsTooLarge(
            f"the job's inputs come to {total / 2**20:,.0f} MiB, the largest {name} ({size / 2**20:,.0f} MiB); a Ray "
            f"job carries at most {MAX_PACKAGE_BYTES // 2**20} MiB to the cluster. Name a base model by its Hugging "
            "Face id (each node downloads it), or run this job with FTS_RUNNER=local",
            param=name if not name.startswith("the job") else "job_id")
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    placed, copies = [], {}
    for where, path in inputs:
        if path not in copies:
            copies[path] = f"inputs/{len(copies)}-{path.name}"
            _link_or_copy(path, folder / copies[path])
        placed.append([where, copies[path]])
    if latest is not None:  # a resumed job continues from the last checkpoint that came back
        _link_or_copy(latest, folder / "work" / "checkpoints" / latest.name)
    description = {"job_id": job.job_id, "kind": job.kind, "spec": spec, "inputs": placed,
                   "output": [["output_dir"], Path(spec["output_dir"]).name] if spec.get("output_dir") else None,
                   "workers": workers_of(job),
                   "gpus_per_worker": settings.ray_gpus_per_worker if gpus is None else gpus,
                   "server_version": fts_mcp.__version__,  # the cluster's entrypoint checks it runs the same
                   "server_dir": str(settings.job_dir(job.job_id)),
                   "storage": {"uri": settings.ray_storage, "prefix": sid} if settings.ray_storage else None}
    write_json_atomic(folder / "job.json", description)
    return description


class InputsTooLarge(FtsError):
    code = "inputs_too_large"


class ClusterTooSmall(FtsError):
    code = "ray_cluster_too_small"


def placement(client, settings: Settings, workers: int, *, timeout: float = 60.0) -> tuple[Ask, str]:
    """What the job asks of the cluster, and a line saying so and why. Refused (ClusterTooSmall) when the cluster
    could never hold the job; submitted unchecked, and said so, when its resources cannot be read in `timeout`
    seconds. Asked twice: by the tools that submit a job, before it exists (`Jobs.placement`), and by the job's
    supervisor before it submits, since the cluster may have changed in between."""
    try:
        cluster, unread = bounded(read_resources, client, timeout=timeout), None
    except Exception as exc:  # noqa: BLE001 - an older dashboard, a proxy in front of it: submitted unchecked
        cluster, unread = None, str(exc)
    return decide(cluster, settings, workers, unread)


def decide(cluster: Cluster | None, settings: Settings, workers: int, unread: str | None = None) -> tuple[Ask, str]:
    """`placement` once the cluster is read (None: it could not be, `unread` says why)."""
    if settings.ray_gpus_per_worker_set:
        gpus = settings.ray_gpus_per_worker
        why = f"{gpus:g} GPU per worker: FTS_RAY_GPUS_PER_WORKER"
    else:
        gpus, why = choose_gpus(cluster)
    ask = Ask(workers=workers, gpus=gpus)
    if cluster is not None and (problem := never_fits(ask, cluster)) is not None:
        message, param = problem
        raise ClusterTooSmall(f"the Ray cluster cannot run this job: {message}", param=param)
    unchecked = f"; the cluster's resources could not be read, so it was not checked ({unread})" if unread else ""
    return ask, f"on the Ray cluster: {ask.describe()} ({why}){unchecked}"


def submission_id(job_id: str, attempt: int) -> str:
    return f"fts-{job_id}-{attempt}"


def runtime_env(folder: Path, settings: Settings) -> dict[str, Any]:
    """The Ray job's runtime environment: the package and this server's fts-mcp, with what FTS_RAY_RUNTIME_ENV adds
    (the packages or image the cluster needs, environment variables such as HF_TOKEN)."""
    added = settings.ray_runtime_env
    return {
        **{k: v for k, v in added.items() if k != "env_vars"},
        "working_dir": str(folder),
        "py_modules": [str(Path(fts_mcp.__file__).parent)],  # this server's version of the recipes
        "excludes": ["__pycache__/"],
        "env_vars": {
            **added.get("env_vars", {}),
            "PYTHONUNBUFFERED": "1",
            "TOKENIZERS_PARALLELISM": "false",
            # how long Ray waits after its SIGTERM before SIGKILL: the time a cancel has to checkpoint
            "RAY_JOB_STOP_WAIT_TIME_S": str(max(1, math.ceil(settings.cancel_grace_seconds))),
        },
    }


# ---- following the job --------------------------------------------------------------------------------------


class Follower:
    """Applies one Ray job's log to the store: lines to worker.log, frames to progress, files and the outcome.
    `note` (where and how the job runs on the cluster) is added to the run's plan as it reports one."""

    def __init__(self, store: JobStore, job: Job, storage: Storage | None = None, note: str | None = None) -> None:
        self.store, self.job_id, self.note = store, job.job_id, note
        output = Path(job.spec["output_dir"]) if job.spec.get("output_dir") else None
        self.receiver = Receiver(store.job_dir(job.job_id), output, storage=storage)
        self.log = store.log_path(job.job_id).open("a", encoding="utf-8")
        self.buffer = LineBuffer()
        self.seen = 0  # characters of the log taken so far
        self.result: dict[str, Any] | None = None
        self.bad: BadFrame | None = None
        self.refused: JobError | None = None  # it did not start in time (`watch_start`)
        self.reported = False  # the job has reported progress of its own (it started), or it has ended
        self.progress_lock = threading.Lock()  # between the job's own reports and what `watch_start` says

    def text(self, text: str, offset: int = 0) -> None:
        """Take the log from character `offset` on (a reconnect re-sends what was seen: it is skipped)."""
        skip = max(0, self.seen - offset)
        if skip >= len(text):
            return
        self.seen = offset + len(text)
        for line in self.buffer.feed(text[skip:]):
            self.line(line)
        self.log.flush()

    def end(self) -> None:
        with self.progress_lock:
            self.reported = True  # the job is over: nothing says it waits any more
        for line in self.buffer.flush():
            self.line(line)
        self.log.close()
        self.receiver.close()

    def line(self, line: str) -> None:
        if self.bad is not None:
            return
        try:
            frame = decode(line)
            if frame is None:
                self.log.write(ANSI.sub("", line) + "\n")  # Ray colours its workers' prefixes
            elif (frame := self.receiver.feed(frame)) is not None:
                self.apply(frame)
        except BadFrame as exc:
            log.error("job %s: %s", self.job_id, exc.message)
            self.bad = exc
        except Exception as exc:  # noqa: BLE001 - whatever a line did, the job is stopped and told, not lost
            log.error("job %s: a frame could not be applied: %s", self.job_id, exc)
            self.bad = BadFrame(f"a frame from the cluster could not be applied: {type(exc).__name__}: {exc}")

    def apply(self, frame: dict[str, Any]) -> None:
        kind = frame["t"]
        if kind == "report":
            figures = frame.get("figures")
            if not isinstance(figures, dict):
                raise BadFrame("a report frame carries its figures as an object")
            Progress.model_validate(figures)  # each known figure has the right type
            if self.note and isinstance(figures.get("plan"), str):
                figures = {**figures, "plan": f"{figures['plan']}; {self.note}"}
            with self.progress_lock:
                self.reported = True
                self.store.update_progress(self.job_id, figures,
                                           event="progress" if frame.get("event", True) else None)
        elif kind == "rewind":
            if not isinstance(frame.get("step"), int):
                raise BadFrame("a rewind frame carries a whole step")
            self.store.rewind_progress(self.job_id, frame["step"])
        elif kind == "checkpoint":
            self.checkpoint(frame.get("path"))
        elif kind == "result":
            if self.result is None:  # the first outcome counts
                self.result = check_result(frame)
        else:
            raise BadFrame(f"unknown frame {kind!r}")

    def waiting(self, phase: str) -> bool:
        """Show `phase` while the job has not reported its own; whether it was shown."""
        with self.progress_lock:
            if not self.reported:
                self.store.update_progress(self.job_id, {"phase": phase}, event=None)
            return not self.reported

    def checkpoint(self, relative: Any) -> None:
        """A checkpoint folder that came back is the job's latest; older ones go, as the trainer keeps them."""
        folder = self.receiver.local(relative)
        if folder.parent != self.receiver.job_dir / "checkpoints" or not is_checkpoint(folder):
            raise BadFrame(f"{relative!r} is not a finished checkpoint under work/checkpoints/")
        self.store.set_checkpoint(self.job_id, folder)
        for stale in checkpoints(folder.parent)[:-CHECKPOINTS_KEPT]:
            if stale != folder:
                shutil.rmtree(stale, ignore_errors=True)

    def outcome(self, status: str, message: str | None, cancelled: bool
                ) -> tuple[JobState, JobError | None, Artifacts | None]:
        """How the job ended: its own result, else what the cancel or Ray's status says."""
        if self.bad is not None:
            return JobState.FAILED, JobError(code=self.bad.code, message=self.bad.message), None
        if self.refused is not None and self.result is None:
            return JobState.FAILED, self.refused, None
        result = self.result or {}
        if result.get("state") == "succeeded":
            try:
                return JobState.SUCCEEDED, None, self.receiver.artifacts(result.get("artifacts"))
            except BadFrame as exc:
                return JobState.FAILED, JobError(code=exc.code, message=exc.message), None
        if result.get("state") == "failed":
            return JobState.FAILED, result["error"], None
        if cancelled:
            return JobState.CANCELLED, None, None
        if result.get("state") == "stopped":
            return JobState.INTERRUPTED, JobError(
                code="worker_stopped", message="the job stopped on the cluster before finishing; resume_job "
                                               "continues from the last checkpoint"), None
        detail = result["error"].message if result.get("error") else message or "no reason given"
        code = {"FAILED": "ray_job_failed", "STOPPED": "ray_job_stopped", UNREACHABLE: "cluster_unreachable"}
        return JobState.INTERRUPTED, JobError(
            code=code.get(status, "worker_lost"),
            message=f"the Ray job ended {status} without finishing: {detail}; resume_job submits it again from the "
                    "last checkpoint that came back"), None


RESULT_STATES = frozenset({"succeeded", "failed", "stopped", "lost"})


def check_result(frame: dict[str, Any]) -> dict[str, Any]:
    """A result frame as the cluster sends it, checked: a known state, a well-formed error."""
    if frame.get("state") not in RESULT_STATES:
        raise BadFrame(f"a result's state is one of {', '.join(sorted(RESULT_STATES))}, got {frame.get('state')!r}")
    checked = {"state": frame["state"], "artifacts": frame.get("artifacts")}
    if frame.get("error") is not None:
        try:
            checked["error"] = JobError.model_validate(frame["error"])
        except ValueError:
            raise BadFrame(f"a result's error is {{code, message, param}}, got {str(frame['error'])[:200]}") from None
    elif frame["state"] == "failed":
        raise BadFrame("a failed result carries its error")
    return checked


# ---- supervising the Ray job --------------------------------------------------------------------------------

UNREACHABLE = "UNREACHABLE"
NOT_STARTED = "NOT_STARTED"


def open_storage(settings: Settings, sid: str) -> Storage | None:
    """FTS_RAY_STORAGE for this attempt, checked before anything is submitted (it may need credentials)."""
    if not settings.ray_storage:
        return None
    try:
        storage = bounded(lambda: Storage(settings.ray_storage, sid))
        bounded(storage.fs.get_file_info, storage.base)
    except Exception as exc:  # noqa: BLE001 - any filesystem's own error: named, and the job fails before it runs
        raise FtsError(f"FTS_RAY_STORAGE {settings.ray_storage} cannot be used: {type(exc).__name__}: {exc}",
                       param="FTS_RAY_STORAGE") from None
    return storage


async def _tail(client, sid: str, follower: Follower, idle: float) -> None:
    """Stream the job's log into the follower until it ends, or until it is refused for not starting in time.
    After `idle` seconds without a line, ask Ray whether the job is still running: a stream that went quiet because
    its connection died ends here once the job has, and `follow` reads the rest."""
    last = [time.monotonic()]

    async def consume() -> None:
        offset = 0
        async for chunk in client.tail_job_logs(sid):
            follower.text(chunk, offset)
            offset += len(chunk)
            last[0] = time.monotonic()

    task = asyncio.create_task(consume())
    while not task.done():
        await asyncio.wait({task}, timeout=min(idle, 1.0))
        if not task.done() and follower.refused is not None:
            task.cancel()
            return
        if not task.done() and time.monotonic() - last[0] >= idle:
            status = await asyncio.to_thread(bounded, client.get_job_status, sid)
            if status.is_terminal():
                task.cancel()
                return
    task.result()


def follow(client, sid: str, follower: Follower, *, idle: float = 30.0) -> tuple[str, str | None]:
    """Follow the Ray job's log until it has ended; its final status and Ray's message. A cluster that does not
    answer for UNREACHABLE_SECONDS in a row ends it with status UNREACHABLE; a job refused for not starting in time
    (`watch_start`) with NOT_STARTED at once: Ray cannot stop a job whose driver it has not placed, it only queues
    the stop for when it does."""
    unreachable_since: float | None = None
    while True:
        try:
            asyncio.run(_tail(client, sid, follower, idle))
            if follower.refused is not None:
                return NOT_STARTED, None
            info = bounded(client.get_job_info, sid)
            if not info.status.is_terminal():
                unreachable_since = None
                time.sleep(1.0)  # the stream ended early: follow again (what was seen is skipped)
                continue
            if follower.result is None:  # anything the stream did not deliver
                follower.text(bounded(client.get_job_logs, sid, timeout=300.0), 0)
            return str(info.status), info.message
        except Exception as exc:  # noqa: BLE001 - the connection or the cluster: retried for a while
            unreachable_since = unreachable_since or time.monotonic()
            if time.monotonic() - unreachable_since > UNREACHABLE_SECONDS:
                return UNREACHABLE, f"the cluster stopped answering ({exc})"
            log.warning("following Ray job %s: %s; retrying", sid, exc)
            time.sleep(2.0)


def why_waiting(client, sid: str, ask: Ask) -> str | None:
    """What a submitted job that has not reported yet waits for, from Ray's status and the cluster's resources;
    None once that is no longer the cluster's doing (it ended, or a one-worker job's process runs)."""
    info = bounded(client.get_job_info, sid)
    status = str(info.status)
    if status not in ("PENDING", "RUNNING") or (status == "RUNNING" and ask.workers == 1):
        return None
    try:
        cluster = bounded(lambda: read_resources(client, wait=0.0))
    except Exception:  # noqa: BLE001 - the numbers are a courtesy: Ray's own status stands without them
        cluster = None
    if status == "PENDING":
        if cluster is None:
            return f"not started yet (Ray: {info.message or status})"
        return waiting_for(ask, cluster) or ("the cluster is setting up the job's runtime environment (its package, "
                                             "the packages FTS_RAY_RUNTIME_ENV adds)")
    free = f"; free now: {free_resources(cluster)}" if cluster is not None else ""
    return f"its driver runs; its Ray Train workers ({ask.describe()}) are being placed and started{free}"


def watch_start(client, sid: str, follower: Follower, ask: Ask, timeout: float, done: threading.Event) -> None:
    """Until the job reports progress of its own, its phase says what it waits for and for how long. Past `timeout`
    (FTS_RAY_START_TIMEOUT_SECONDS) the Ray job is stopped (one Ray has not placed stops as soon as it would start)
    and the job is refused with that reason: `follow` stops following it, and it fails."""
    began, reason = time.monotonic(), "submitted"
    while not done.wait(START_POLL_SECONDS):
        try:
            reason = why_waiting(client, sid, ask)
        except Exception as exc:  # noqa: BLE001 - a cluster that does not answer is `follow`'s to judge
            log.warning("job %s: could not ask the cluster how it is: %s", follower.job_id, exc)
            continue
        if reason is None:
            follower.waiting("starting")  # unless it has reported already, or ended (which clears the phase)
            return
        waited = time.monotonic() - began
        if waited > timeout:
            try_stop(client, sid)  # before `follow` gives up on it (and the heartbeat with it)
            follower.refused = JobError(
                code="ray_start_timeout", param="FTS_RAY_START_TIMEOUT_SECONDS",
                message=f"the job did not start on the Ray cluster within {timeout:g} s "
                        f"(FTS_RAY_START_TIMEOUT_SECONDS): {reason}. Submit it again when the cluster has room, ask "
                        "for less (training.workers, FTS_RAY_GPUS_PER_WORKER), or allow a longer wait")
            return
        if not follower.waiting(f"{WAITING}: {reason} ({waited:.0f} s; gives up after {timeout:g} s)"):
            return


def supervise(job_id: str) -> int:
    settings = Settings.from_env()
    store = JobStore(settings)
    store.set_fields(job_id, supervisor_pid=os.getpid(), pid=os.getpid())  # cancel_job signals this process
    store.heartbeat(job_id)
    cancel = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: cancel.set())
    signal.signal(signal.SIGINT, lambda *_: cancel.set())
    job = store.get(job_id, log_lines=0)
    store.result_path(job_id).unlink(missing_ok=True)
    sid = submission_id(job_id, store.raw(job_id)["attempts"])
    folder = store.job_dir(job_id) / PACKAGE
    client = storage = None
    try:
        storage = open_storage(settings, sid)
        client = connect(settings)
        ask, note = placement(client, settings, workers_of(job))  # a job the cluster cannot hold fails here
        with store.log_path(job_id).open("a") as logfile:
            logfile.write(f"submitting to the Ray cluster at {settings.ray_address} as {sid}, {note}\n")
        store.update_progress(job_id, {"phase": f"{WAITING}: submitting", "plan": note}, event=None)
        description = package(job, folder, settings, sid, ask.gpus)
        if cancel.is_set() or store.raw(job_id)["cancel_requested_at"] is not None:
            record_outcome(store, job_id, JobState.CANCELLED, None)
            return _settle(settings, store, job_id)
        single = description["workers"] == 1  # its own process is the worker; a Train job's driver takes nothing
        store.set_fields(job_id, ray_job_id=sid)  # before the submit: a lost supervisor's job is stopped by id
        bounded(lambda: client.submit_job(
            entrypoint="python -m fts_mcp.jobs.ray.entry", submission_id=sid, runtime_env=runtime_env(folder, settings),
            metadata={"fts_job_id": job_id}, entrypoint_num_cpus=ask.cpus if single else 0,
            entrypoint_num_gpus=ask.gpus if single else 0), timeout=600.0)
    except (FtsError, ValueError, TypeError) as exc:  # ours, or Ray refusing the submission as malformed
        record_outcome(store, job_id, JobState.FAILED, error_of(exc) if isinstance(exc, FtsError) else JobError(
            code="ray_submit_refused", message=f"the Ray cluster refused the job: {exc}"))
        return _settle(settings, store, job_id)
    except Exception as exc:  # noqa: BLE001 - an unreachable cluster, a refused submit: try again later
        if client is not None and store.raw(job_id)["ray_job_id"]:
            try_stop(client, sid)  # in case the submit went through and only its answer was lost
        record_outcome(store, job_id, JobState.INTERRUPTED, JobError(
            code="ray_submit_failed", message=f"the Ray cluster at {settings.ray_address} did not take the job: "
                                              f"{exc}; resume_job submits it again"))
        return _settle(settings, store, job_id)
    finally:
        shutil.rmtree(folder, ignore_errors=True)  # uploaded, or not needed

    follower = Follower(store, job, storage, note)
    follower.waiting(f"{WAITING}: submitted")
    done = threading.Event()

    def beat() -> None:  # heartbeat; a cancel, or a bad frame, stops the Ray job (asked until Ray takes it)
        stopped = False
        while not done.wait(settings.heartbeat_seconds):
            try:
                store.heartbeat(job_id)
                asked = cancel.is_set() or store.raw(job_id)["cancel_requested_at"] is not None
            except Exception as exc:  # noqa: BLE001 - a busy store: next beat
                log.warning("job %s: heartbeat: %s", job_id, exc)
                continue
            if not stopped and (asked or follower.bad is not None):
                stopped = try_stop(client, sid)

    threading.Thread(target=beat, daemon=True, name="heartbeat").start()
    threading.Thread(target=watch_start, args=(client, sid, follower, ask, settings.ray_start_timeout_seconds, done),
                     daemon=True, name="start-watch").start()
    try:
        status, message = follow(client, sid, follower)
        if status == UNREACHABLE:
            try_stop(client, sid)
    finally:
        done.set()
        follower.end()
        if storage is not None:  # what the job put there and nobody fetched (it stopped midway)
            try:
                bounded(storage.clear)
            except Exception as exc:  # noqa: BLE001 - leftovers in storage are not the job's outcome
                log.warning("could not clear %s/%s: %s", settings.ray_storage, sid, exc)
    cancelled = store.raw(job_id)["cancel_requested_at"] is not None
    record_outcome(store, job_id, *follower.outcome(status, message, cancelled))
    return _settle(settings, store, job_id)


def _settle(settings: Settings, store: JobStore, job_id: str) -> int:
    settle(store, job_id, None)
    log.info("job %s: %s", job_id, store.raw(job_id)["state"])
    Runner(settings, store).tick()  # hand the freed slot to the next queued job
    store.close()
    return 0


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        stream=sys.stderr)
    return supervise(check_job_id(args[0]))


if __name__ == "__main__":
    raise SystemExit(main())
