"""The job store: SQLite in WAL mode under FTS_HOME, shared by every server and worker process.

Writers use `BEGIN IMMEDIATE`, which SQLite serialises across processes; that is what makes claiming a slot
atomic when several servers share one FTS_HOME. Each job also has a folder (`jobs/<id>/`) for its spec,
worker log, checkpoints and outputs.

The folders are the durable record: `spec.json` (what was asked) and `result.json` (how it ended) are written
by the job itself, so a lost or unreadable database is rebuilt from them (`rebuild`, `fts-mcp jobs reindex`),
with a training job's progress and loss history from its `metrics.json`. An unreadable database is reported once,
naming the file and what to do, as `StoreUnavailable`; an unreadable `result.json` is set aside and read as a
worker death (`read_result`), so one torn file never stalls the job, the monitor or a rebuild.

Which slots each kind of job competes for is decided here once (`pools`): the runner claims by it, and a queued
job's `waiting` says what it waits behind by it.
"""

from __future__ import annotations

import json
import logging
import math
import os
import secrets
import sqlite3
import threading
import time
from collections import deque
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, NamedTuple, get_args

from pydantic import ValidationError

from fts_mcp.config import Settings
from fts_mcp.errors import FtsError, JobNotFound
from fts_mcp.files import write_json_atomic
from fts_mcp.jobs.records import Artifacts, Job, JobError, JobKind, JobList, JobResult, Progress
from fts_mcp.jobs.states import JOB_ID_RE, JobState, StaleState, check_job_id, check_transition, resumable

log = logging.getLogger(__name__)

SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    id TEXT PRIMARY KEY,
    kind TEXT NOT NULL,
    state TEXT NOT NULL,
    spec TEXT NOT NULL,
    created_at REAL NOT NULL,
    updated_at REAL NOT NULL,
    started_at REAL,
    finished_at REAL,
    claimed_at REAL,
    progress TEXT NOT NULL DEFAULT '{}',
    error TEXT,
    artifacts TEXT NOT NULL DEFAULT '{}',
    slot TEXT,
    supervisor_pid INTEGER,
    pid INTEGER,
    exit_code INTEGER,
    heartbeat_at REAL,
    cancel_requested_at REAL,
    attempts INTEGER NOT NULL DEFAULT 0,
    ray_job_id TEXT
);
CREATE INDEX IF NOT EXISTS jobs_state ON jobs(state, created_at);
CREATE TABLE IF NOT EXISTS events (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    job_id TEXT NOT NULL,
    ts REAL NOT NULL,
    kind TEXT NOT NULL,
    data TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS events_job ON events(job_id, seq);
"""

LOG_NAME = "worker.log"
SPEC_NAME = "spec.json"
RESULT_NAME = "result.json"  # written by the work horse just before it exits; applied once it has exited
METRICS_NAME = "metrics.json"  # a training job's final figures and the trainer's log history
RESULT_MAX_BYTES = 64 << 20  # a generate job's text and an artifact's file list fit many times over
METRICS_MAX_POINTS = 100_000  # logged points a rebuild restores as progress events


class StoreUnavailable(FtsError):
    """The job database cannot be read or written."""

    code = "job_store_unavailable"


def unreadable(settings: Settings, exc: BaseException) -> StoreUnavailable:
    return StoreUnavailable(
        f"the job database {settings.db_path} cannot be used ({exc}); stop every fts-mcp server and worker using "
        f"{settings.home}, then run `fts-mcp jobs reindex`: it moves the database aside and rebuilds it from the "
        "job folders (each job's spec and outcome)")


def iso(ts: float | None) -> str | None:
    return None if ts is None else datetime.fromtimestamp(ts, UTC).isoformat(timespec="seconds")


def tail_lines(path: Path, count: int) -> list[str]:
    if count <= 0 or not path.exists():
        return []
    with path.open("rb") as fh:
        fh.seek(0, os.SEEK_END)
        fh.seek(max(0, fh.tell() - 64 * 1024))
        lines = fh.read().decode("utf-8", "replace").splitlines()
    return list(deque((line for line in lines if line.strip()), maxlen=count))


def slots_needed(spec: dict[str, Any]) -> int:
    """Slots a job runs on: a training job's `workers` (data-parallel ranks), else one."""
    training = spec.get("training") if isinstance(spec, dict) else None
    workers = training.get("workers", 1) if isinstance(training, dict) else 1
    return workers if isinstance(workers, int) and workers >= 1 else 1


# ---- which slots each kind of job competes for ------------------------------------------------------------------

ALL_KINDS = frozenset(get_args(JobKind))
SERVING_KINDS = frozenset({"runtime"})  # serve until cancelled


class Pool(NamedTuple):
    """Slots some kinds of job share, first in first out."""

    slots: tuple[str, ...]
    kinds: frozenset[str]
    one_slot_each: bool = False
    """Every job takes one slot whatever its spec asks (a cluster schedules its workers, not this host)."""


def pools(settings: Settings) -> tuple[Pool, ...]:
    """Where each kind of job runs, in the order the runner claims: the one rule for slots.

    Runtime jobs (a managed edge runtime on this host's loopback) always run here: on a GPU slot when the host has
    GPUs (they load the model there), else on serving slots of their own (`serve:N`, FTS_RUNTIME_SLOTS), so a runtime
    serving for hours never holds the CPU slot a train or generate job needs. Every other kind goes to the cluster
    with FTS_RUNNER=ray (one `ray:N` slot each), else shares this host's slots with them.
    """
    compute = ALL_KINDS - SERVING_KINDS
    gpu_host = any(slot.startswith("cuda:") for slot in settings.slots)
    serving = Pool(settings.slots if gpu_host else settings.serve_slots, SERVING_KINDS)
    if settings.runner == "ray":
        return Pool(settings.ray_slots, compute, one_slot_each=True), serving
    if gpu_host:
        return (Pool(settings.slots, ALL_KINDS),)
    return Pool(settings.slots, compute), serving


def pool_of(settings: Settings, kind: str) -> Pool | None:
    """The pool a kind of job claims its slots from (None for a kind this version does not know)."""
    return next((pool for pool in pools(settings) if kind in pool.kinds), None)


def plural(count: int, word: str) -> str:
    return f"{count} {word}{'' if count == 1 else 's'}"


def waiting_reason(pool: Pool, need: int, running: list[tuple[str, str, list[str]]], ahead: int) -> str:
    """What a queued job that needs `need` of `pool`'s slots waits behind: the `running` jobs (id, kind, slots)
    holding some of them and the `ahead` jobs queued before it for them; "starting" when nothing does (the next
    tick claims it)."""
    if pool.one_slot_each:
        need = 1
    if need > len(pool.slots):
        return (f"needs {plural(need, 'slot')} and this host has {len(pool.slots)} for it ({', '.join(pool.slots)}): "
                f"it will never start; cancel_job it and ask for at most {len(pool.slots)} workers")
    held = [(job_id, kind, here) for job_id, kind, slots in running if (here := [s for s in slots if s in pool.slots])]
    free = len(pool.slots) - sum(len(here) for _, _, here in held)
    if not ahead and free >= need:
        return "starting"
    behind = [f"runtime {job_id} on {','.join(here)}" if kind in SERVING_KINDS
              else f"{kind} {job_id} (running on {','.join(here)})" for job_id, kind, here in held[:3]]
    if len(held) > 3:
        behind.append(f"{plural(len(held) - 3, 'more running job')}")
    if ahead:
        behind.append(plural(ahead, "earlier queued job"))
    text = "queued behind " + (", ".join(behind[:-1]) + " and " + behind[-1] if len(behind) > 1 else behind[0])
    if runtimes := [job_id for job_id, kind, _ in held if kind in SERVING_KINDS]:
        return text + f"; a runtime serves until it is cancelled: cancel_job {' or '.join(runtimes)} to free its slot"
    if held:
        return text + f"; it starts when a slot frees (sooner if you cancel_job {' or '.join(i for i, _, _ in held)})"
    return text + " (first in, first out)"


class JobStore:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        settings.jobs_dir.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        fresh = not settings.db_path.exists() or settings.db_path.stat().st_size == 0
        try:
            self._db = sqlite3.connect(settings.db_path, timeout=30, isolation_level=None, check_same_thread=False)
            self._db.row_factory = sqlite3.Row
            self._db.execute("PRAGMA busy_timeout=30000")
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")
            if not fresh and (check := self._db.execute("PRAGMA quick_check(1)").fetchone()[0]) != "ok":
                raise sqlite3.DatabaseError(f"integrity check: {check}")
            self._db.executescript(SCHEMA)
            columns = {row[1] for row in self._db.execute("PRAGMA table_info(jobs)")}
            if "ray_job_id" not in columns:  # a database from before the Ray runner
                self._db.execute("ALTER TABLE jobs ADD COLUMN ray_job_id TEXT")
        except sqlite3.Error as exc:
            raise unreadable(settings, exc) from None
        if fresh and reindex_jobs(self):  # an empty database beside job folders: they hold the record
            log.warning("the job database %s was empty; rebuilt it from the job folders", settings.db_path)

    def close(self) -> None:
        with self._lock:
            self._db.close()

    @contextmanager
    def _locked(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            try:
                yield self._db
            except sqlite3.DatabaseError as exc:
                raise unreadable(self.settings, exc) from None

    @contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        with self._locked() as db:
            db.execute("BEGIN IMMEDIATE")
            try:
                yield db
            except BaseException:
                db.execute("ROLLBACK")
                raise
            db.execute("COMMIT")

    def _row(self, db: sqlite3.Connection, job_id: str) -> sqlite3.Row:
        row = db.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone()
        if row is None:
            raise JobNotFound(f"no job {job_id} in {self.settings.home}; list_jobs shows the jobs there",
                              param="job_id")
        return row

    # ---- reading -------------------------------------------------------------------------------------------

    def job_dir(self, job_id: str) -> Path:
        return self.settings.job_dir(job_id)

    def log_path(self, job_id: str) -> Path:
        return self.job_dir(job_id) / LOG_NAME

    def result_path(self, job_id: str) -> Path:
        return self.job_dir(job_id) / RESULT_NAME

    def get(self, job_id: str, *, log_lines: int = 20) -> Job:
        check_job_id(job_id)
        with self._locked() as db:
            row = self._row(db, job_id)
            waiting = self._waiting(db, row)
        return self._to_job(row, log_lines=log_lines, waiting=waiting)

    def list(self, state: JobState | None = None, limit: int = 20) -> JobList:
        where, args = ("WHERE state = ?", [state.value]) if state else ("", [])
        with self._locked() as db:
            total = db.execute(f"SELECT count(*) FROM jobs {where}", args).fetchone()[0]
            rows = db.execute(f"SELECT * FROM jobs {where} ORDER BY created_at DESC, id LIMIT ?",
                                    [*args, limit]).fetchall()
            waiting = [self._waiting(db, r) for r in rows]
        return JobList(jobs=[self._to_job(r, log_lines=0, waiting=w) for r, w in zip(rows, waiting, strict=True)],
                       total=total)

    def _waiting(self, db: sqlite3.Connection, row: sqlite3.Row) -> str | None:
        """A queued job's `waiting`, from one query: the running jobs, and the jobs queued before it (the order
        `claim_next` takes them in) that compete for its slots."""
        if row["state"] != JobState.QUEUED or (pool := pool_of(self.settings, row["kind"])) is None:
            return None
        others = db.execute("SELECT id, kind, state, slot FROM jobs WHERE state = 'running' OR (state = 'queued' AND "
                            "(created_at < ? OR (created_at = ? AND id < ?))) ORDER BY started_at, created_at, id",
                            (row["created_at"], row["created_at"], row["id"])).fetchall()
        running = [(r["id"], r["kind"], r["slot"].split(",")) for r in others if r["state"] == "running" and r["slot"]]
        ahead = sum(1 for r in others if r["state"] == "queued" and r["kind"] in pool.kinds)
        return waiting_reason(pool, slots_needed(json.loads(row["spec"])), running, ahead)

    def ids_in(self, *states: JobState) -> list[str]:
        marks = ",".join("?" * len(states))
        with self._locked() as db:
            rows = db.execute(f"SELECT id FROM jobs WHERE state IN ({marks}) ORDER BY created_at",
                                    [s.value for s in states]).fetchall()
        return [r["id"] for r in rows]

    def raw(self, job_id: str) -> dict[str, Any]:
        """The stored row, with the bookkeeping fields the runner needs (heartbeat, supervisor pid...)."""
        with self._locked() as db:
            return dict(self._row(db, job_id))

    def events(self, job_id: str, kind: str | None = None, after: int = 0) -> list[dict[str, Any]]:
        query = "SELECT seq, ts, kind, data FROM events WHERE job_id = ? AND seq > ?"
        args: list[Any] = [job_id, after]
        if kind:
            query += " AND kind = ?"
            args.append(kind)
        with self._locked() as db:
            rows = db.execute(query + " ORDER BY seq", args).fetchall()
        return [{"seq": r["seq"], "ts": r["ts"], "kind": r["kind"], **json.loads(r["data"])} for r in rows]

    def _to_job(self, row: sqlite3.Row, *, log_lines: int, waiting: str | None = None) -> Job:
        state = JobState(row["state"])
        artifacts = Artifacts(**json.loads(row["artifacts"]))
        return Job(
            job_id=row["id"],
            kind=row["kind"],
            state=state,
            created_at=iso(row["created_at"]),
            started_at=iso(row["started_at"]),
            finished_at=iso(row["finished_at"]),
            updated_at=iso(row["updated_at"]),
            spec=json.loads(row["spec"]),
            progress=Progress(**json.loads(row["progress"])),
            error=JobError(**json.loads(row["error"])) if row["error"] else None,
            artifacts=artifacts,
            slot=row["slot"],
            pid=row["pid"],
            exit_code=row["exit_code"],
            attempts=row["attempts"],
            ray_job_id=row["ray_job_id"],
            cancel_requested=row["cancel_requested_at"] is not None,
            resumable=resumable(state, artifacts.checkpoint_dir is not None),
            log_tail=tail_lines(self.log_path(row["id"]), log_lines),
            waiting=waiting,
        )

    # ---- writing -------------------------------------------------------------------------------------------

    def create(self, kind: str, spec: dict[str, Any]) -> Job:
        """Insert a job in `validating` and lay out its folder (spec.json written atomically)."""
        job_id = f"job-{secrets.token_hex(6)}"
        folder = self.job_dir(job_id)
        folder.mkdir(parents=True)
        write_json_atomic(folder / SPEC_NAME, {"kind": kind, **spec})
        now = time.time()
        with self._write() as db:
            db.execute("INSERT INTO jobs (id, kind, state, spec, created_at, updated_at) VALUES (?, ?, ?, ?, ?, ?)",
                       (job_id, kind, JobState.VALIDATING.value, json.dumps(spec), now, now))
        return self.get(job_id)

    def transition(self, job_id: str, target: JobState, *, error: JobError | None = None,
                   exit_code: int | None = None, artifacts: Artifacts | None = None,
                   expect: JobState | None = None) -> Job:
        """Move a job to `target` if the state machine allows it (and, with `expect`, if it is still in it)."""
        now = time.time()
        with self._write() as db:
            current = JobState(self._row(db, job_id)["state"])
            if expect is not None and current != expect:
                raise StaleState(f"job {job_id} is {current}, no longer {expect}")
            check_transition(job_id, current, target)
            fields: dict[str, Any] = {"state": target.value, "updated_at": now}
            if target.terminal:  # a finished job is doing nothing and will take no more time
                fields["finished_at"] = now
                progress = json.loads(self._row(db, job_id)["progress"])
                fields["progress"] = json.dumps({**progress, "phase": None, "eta_seconds": None})
            if target == JobState.QUEUED:  # a resume clears what the last attempt left
                fields.update(finished_at=None, error=None, exit_code=None, pid=None, supervisor_pid=None,
                              heartbeat_at=None, claimed_at=None, cancel_requested_at=None, slot=None,
                              ray_job_id=None)
            if error is not None:
                fields["error"] = error.model_dump_json()
            if exit_code is not None:
                fields["exit_code"] = exit_code
            if artifacts is not None:
                fields["artifacts"] = artifacts.model_dump_json()
            self._update(db, job_id, fields)
            event = {"state": target.value, **({"error": error.model_dump()} if error else {})}
            self._event(db, job_id, "state", event)
        job = self.get(job_id)
        if target == JobState.QUEUED:  # a resumed job has no outcome yet
            (self.job_dir(job_id) / RESULT_NAME).unlink(missing_ok=True)
        if target.terminal:  # the folder keeps the outcome too: the database can be rebuilt from the folders
            write_json_atomic(self.result_path(job_id), JobResult(
                state=job.state.value, error=job.error, artifacts=job.artifacts).model_dump(mode="json"))
        return job

    def read_result(self, job_id: str) -> JobResult | None:
        """The outcome the job's folder holds (`read_result`)."""
        return read_result(self.result_path(job_id))

    def claim_next(self, slots: tuple[str, ...], kinds: frozenset[str] | None = None,
                   one_slot_each: bool = False) -> tuple[str, str] | None:
        """Atomically give the oldest queued job (of `kinds`, when given) the slots it needs, all or none:
        (job_id, slots joined by ','), or None. A job waits its turn (first in, first out) until enough slots are
        free. With `one_slot_each` every job takes one slot (a cluster schedules its workers, not this host)."""
        now = time.time()
        with self._write() as db:
            busy = {s for r in db.execute("SELECT slot FROM jobs WHERE state = 'running'") if r["slot"]
                    for s in r["slot"].split(",")}
            free = [s for s in slots if s not in busy]
            if not free:
                return None
            of_kind = f"AND kind IN ({','.join('?' * len(kinds))})" if kinds else ""
            row = db.execute(f"SELECT id, spec FROM jobs WHERE state = 'queued' {of_kind} ORDER BY created_at, id "
                             "LIMIT 1", sorted(kinds or ())).fetchone()
            if row is None:
                return None
            need = 1 if one_slot_each else slots_needed(json.loads(row["spec"]))
            if len(free) < need:
                return None
            claimed = ",".join(free[:need])
            self._update(db, row["id"], {"state": JobState.RUNNING.value, "slot": claimed, "claimed_at": now,
                                         "started_at": now, "updated_at": now, "heartbeat_at": None})
            db.execute("UPDATE jobs SET attempts = attempts + 1 WHERE id = ?", (row["id"],))
            self._event(db, row["id"], "state", {"state": JobState.RUNNING.value, "slot": claimed})
        return row["id"], claimed

    def set_fields(self, job_id: str, **fields: Any) -> None:
        """Bookkeeping fields that are not state: pids, heartbeat, cancel request."""
        allowed = {"supervisor_pid", "pid", "heartbeat_at", "cancel_requested_at", "exit_code", "ray_job_id"}
        assert set(fields) <= allowed, set(fields) - allowed
        with self._write() as db:
            self._update(db, job_id, {**fields, "updated_at": time.time()})

    def heartbeat(self, job_id: str) -> None:
        with self._write() as db:
            db.execute("UPDATE jobs SET heartbeat_at = ? WHERE id = ?", (time.time(), job_id))

    def update_progress(self, job_id: str, progress: dict[str, Any], *, event: str | None = "progress") -> None:
        """Merge figures into the job's progress and append them as an event."""
        with self._write() as db:
            merged = {**json.loads(self._row(db, job_id)["progress"]), **progress}
            self._update(db, job_id, {"progress": json.dumps(merged), "updated_at": time.time()})
            if event:
                self._event(db, job_id, event, progress)

    def rewind_progress(self, job_id: str, step: int) -> None:
        """Drop progress events past `step` (an earlier attempt's, beyond the checkpoint a resume starts from)."""
        with self._write() as db:
            db.execute("DELETE FROM events WHERE job_id = ? AND kind = 'progress' "
                       "AND CAST(json_extract(data, '$.step') AS INTEGER) > ?", (job_id, step))

    def set_checkpoint(self, job_id: str, folder: Path) -> None:
        """Record the job's latest resumable checkpoint folder."""
        artifacts = self.get(job_id, log_lines=0).artifacts
        artifacts.checkpoint_dir = str(folder)
        self.set_artifacts(job_id, artifacts)

    def set_artifacts(self, job_id: str, artifacts: Artifacts) -> None:
        with self._write() as db:
            self._update(db, job_id, {"artifacts": artifacts.model_dump_json(), "updated_at": time.time()})

    def _update(self, db: sqlite3.Connection, job_id: str, fields: dict[str, Any]) -> None:
        sets = ", ".join(f"{k} = ?" for k in fields)
        db.execute(f"UPDATE jobs SET {sets} WHERE id = ?", [*fields.values(), job_id])

    def _event(self, db: sqlite3.Connection, job_id: str, kind: str, data: dict[str, Any]) -> None:
        db.execute("INSERT INTO events (job_id, ts, kind, data) VALUES (?, ?, ?, ?)",
                   (job_id, time.time(), kind, json.dumps(data)))


def _read_json(path: Path) -> dict | None:
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return value if isinstance(value, dict) else None


def read_result(path: Path) -> JobResult | None:
    """The outcome a job's `result.json` holds; None when there is none.

    One that cannot be read as an outcome (torn write, full disk, edited by hand: not JSON, not an object, a state
    that is not an ending, fields of the wrong shape) is moved aside (`result.json.corrupt-<time>`, kept for a look)
    and read as a worker death: the job is `interrupted` and resume_job runs it again, with an error naming the file.
    """
    try:
        if path.stat().st_size > RESULT_MAX_BYTES:
            raise ValueError(f"it is larger than {RESULT_MAX_BYTES >> 20} MiB")
        return JobResult.model_validate_json(path.read_bytes())
    except FileNotFoundError:
        return None
    except ValidationError as exc:
        why = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'the file'}: {e['msg']}" for e in exc.errors()[:3])
    except (OSError, ValueError) as exc:
        why = str(exc)
    aside = set_aside(path)
    where = f"it was moved aside to {aside.name}" if aside else "it could not be moved aside"
    log.error("the job outcome file %s is unreadable (%s); %s", path, why, where)
    return JobResult(state="interrupted", error=JobError(
        code="result_unreadable", message=f"the job's outcome file {path} could not be read ({why}); {where}. How the "
                                          "job ended is unknown, so it is interrupted: resume_job runs it again (from "
                                          "its last checkpoint, if it has one)"))


def set_aside(path: Path) -> Path | None:
    """Rename an unreadable file to `<name>.corrupt-<time>` beside it (kept, never deleted); None when it is gone
    already (another process set it aside first) or cannot be renamed."""
    stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime())
    for n in range(100):
        aside = path.with_name(f"{path.name}.corrupt-{stamp}" + (f"-{n}" if n else ""))
        if aside.exists():
            continue
        try:
            path.rename(aside)
        except OSError:
            return None
        return aside
    return None


def _number(value: Any) -> float | None:
    """A figure from a file we wrote but no longer trust: a number, else None."""
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None


# a preference-tuning job's last figures, as its metrics.json records them (fts_mcp.training.preference)
PREFERENCE_FIGURES = ("reward_margin", "preference_accuracy", "eval_reward_margin", "eval_preference_accuracy")


def progress_from_metrics(path: Path) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """A finished training job's progress and its logged points (the loss curve's), from its `metrics.json`: the
    trainer's log history, as `ReportProgress` reported it while training. Anything unreadable is left out."""
    metrics = _read_json(path) or {}
    steps = metrics.get("steps")
    history = metrics.get("log_history")
    history = [h for h in history[:METRICS_MAX_POINTS] if isinstance(h, dict)] if isinstance(history, list) else []
    points = []
    for entry in history:
        step = entry.get("step")
        if not isinstance(step, int) or isinstance(step, bool):
            continue
        point: dict[str, Any] = {"step": step, "epoch": _number(entry.get("epoch"))}
        if (loss := _number(entry.get("loss"))) is not None:
            point.update(loss=loss, learning_rate=_number(entry.get("learning_rate")), logged=True)
        if (eval_loss := _number(entry.get("eval_loss"))) is not None:
            point["eval_loss"] = eval_loss
        if len(point) > 2:
            points.append(point)
    if not isinstance(steps, int) or isinstance(steps, bool) or steps < 0:
        return {}, points
    tokens, seconds = _number(metrics.get("tokens_seen")), _number(metrics.get("train_runtime_seconds"))
    rates = [p["learning_rate"] for p in points if p.get("learning_rate") is not None]
    progress = {"step": steps, "total_steps": steps, "epoch": _number(metrics.get("epochs")),
                "loss": _number(metrics.get("final_loss")), "eval_loss": _number(metrics.get("eval_loss")),
                "learning_rate": rates[-1] if rates else None,
                "tokens_per_second": tokens / seconds if tokens and seconds and math.isfinite(tokens / seconds)
                else None,
                **{name: _number(metrics.get(name)) for name in PREFERENCE_FIGURES}}
    return {k: v for k, v in progress.items() if v is not None}, points


def reindex_jobs(store: JobStore) -> int:
    """Insert a row for every job folder the database does not know, from its spec.json and result.json, and for a
    training job its progress and loss history from metrics.json.

    A job with an outcome gets it back (state, error, artifacts); one without is `interrupted` (what happened to
    it is unknown, and resume_job can run it again), as is one whose result.json is unreadable (set aside, named
    in the job's error: `read_result`)."""
    added = 0
    with store._locked() as db:
        known = {row["id"] for row in db.execute("SELECT id FROM jobs")}
    for folder in sorted(store.settings.jobs_dir.iterdir()):
        if folder.name in known or not JOB_ID_RE.fullmatch(folder.name):
            continue  # a job on record keeps its files as they are: its own processes (and the monitor) read them
        spec = _read_json(folder / SPEC_NAME)
        if spec is None or not isinstance(spec.get("kind"), str) or spec["kind"] not in ALL_KINDS:
            continue
        kind = spec.pop("kind")
        result = read_result(folder / RESULT_NAME) or JobResult(state="interrupted")
        if result.state == "interrupted" and result.error is None:
            result.error = JobError(code="recovered", message="rebuilt from its folder after the job database was "
                                                              "lost; how it ended is unknown (resume_job runs it "
                                                              "again)")
        state = JobState(result.state)
        created = (folder / SPEC_NAME).stat().st_mtime
        finished = (folder / RESULT_NAME).stat().st_mtime if (folder / RESULT_NAME).exists() else created
        progress, points = progress_from_metrics(folder / METRICS_NAME) if kind == "train" else ({}, [])
        with store._write() as db:
            cursor = db.execute(
                "INSERT OR IGNORE INTO jobs (id, kind, state, spec, created_at, updated_at, finished_at, error, "
                "artifacts, progress, attempts) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, 1)",
                (folder.name, kind, state.value, json.dumps(spec), created, finished, finished,
                 result.error.model_dump_json() if result.error else None,
                 (result.artifacts or Artifacts()).model_dump_json(), json.dumps(progress)))
            if cursor.rowcount:
                db.executemany("INSERT INTO events (job_id, ts, kind, data) VALUES (?, ?, 'progress', ?)",
                               [(folder.name, finished, json.dumps(point)) for point in points])
            added += cursor.rowcount
    return added


def rebuild(settings: Settings) -> tuple[Path | None, int]:
    """`fts-mcp jobs reindex`: move an unreadable database aside (kept, renamed) and rebuild it from the job
    folders. Returns (where the old one went, jobs on record now)."""
    moved = None
    try:
        JobStore(settings).close()
    except StoreUnavailable:
        moved = settings.db_path.with_name(f"{settings.db_path.name}.unreadable-{int(time.time())}")
        settings.db_path.rename(moved)
        for suffix in ("-wal", "-shm"):
            settings.db_path.with_name(settings.db_path.name + suffix).unlink(missing_ok=True)
    store = JobStore(settings)  # a fresh database reindexes itself as it opens
    try:
        reindex_jobs(store)  # folders an existing, readable database did not know
        return moved, store.list(limit=1).total
    finally:
        store.close()
