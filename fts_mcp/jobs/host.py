"""What a job's processes on this host stand on: the work horse and each local data-parallel rank.

They hand their recipe a context over the job store (`store_context`: figures to the job's progress and events,
checkpoints and rewinds recorded; rank 0 only, the other ranks get `context.silent_context`), and each watches the
process that started it (`watch_parent`): nobody answers for a process whose parent is gone.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable

from fts_mcp.jobs.context import JobContext, StopSignal
from fts_mcp.jobs.store import JobStore


def store_context(store: JobStore, job_id: str, stop: StopSignal) -> JobContext:
    """The recipe's context over the job store, working in the job's folder."""
    return JobContext(job_id=job_id, workdir=store.job_dir(job_id), stop=stop,
                      report=lambda figures, event=True: store.update_progress(
                          job_id, figures, event="progress" if event else None),
                      checkpoint=lambda folder: store.set_checkpoint(job_id, folder),
                      rewind=lambda step: store.rewind_progress(job_id, step))


def watch_parent(on_lost: Callable[[], None], every: float) -> None:
    """Call `on_lost` (once, from a daemon thread) when this process's parent is gone; look every `every` seconds."""

    def watch() -> None:
        parent = os.getppid()
        while os.getppid() == parent:
            time.sleep(every)
        on_lost()

    threading.Thread(target=watch, daemon=True, name="parent-watch").start()
