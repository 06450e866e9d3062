"""Data-parallel training on one host: the work horse of a `workers: N` job launches N ranks, as torchrun does.

Each rank is `python -m fts_mcp.jobs.ranks JOB_ID RANK WORLD PORT`, with torch.distributed's environment
(`RANK`, `LOCAL_RANK`, `WORLD_SIZE`, `MASTER_ADDR`, `MASTER_PORT`) and its own GPU (`CUDA_VISIBLE_DEVICES`, NCCL),
or the CPU (gloo). Every rank runs the same recipe, `fts_mcp.training.recipe.run`; the Trainer sees the
environment and trains with DDP. Rank 0 reports progress and checkpoints to the job store and writes the adapter;
the others report nothing.

The work horse watches them: a cancel is forwarded to every rank (they agree on the step to stop at, checkpoint
and exit), and when any rank dies the others are killed at once and the job ends `interrupted` — a rank alone
would wait for its peers in the next collective until a timeout.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

from fts_mcp.config import Settings
from fts_mcp.errors import FtsError
from fts_mcp.files import write_json_atomic
from fts_mcp.jobs.context import JobContext, StopSignal, silent_context
from fts_mcp.jobs.host import store_context, watch_parent
from fts_mcp.jobs.outcome import RankLost, run_recipe, signal_name
from fts_mcp.jobs.records import Artifacts
from fts_mcp.jobs.states import check_job_id
from fts_mcp.jobs.store import JobStore
from fts_mcp.network import free_port

RANK_RESULT = "rank0-result.json"
RANK_ERROR = "rank{rank}-error.json"
POLL_SECONDS = 0.2


def run_ranks(ctx: JobContext, workers: int) -> Artifacts | None:
    """Launch `workers` ranks of the job in `ctx` and wait for them; rank 0's artifacts, or None when stopped with a
    checkpoint. A rank's own error is raised as it was; a rank that died raises `RankLost`."""
    folder, stop = ctx.workdir, ctx.stop
    (folder / RANK_RESULT).unlink(missing_ok=True)
    port = free_port()
    gpus = [g for g in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if g.strip()]
    ranks = []
    stop.in_loop = True  # a cancel is forwarded to the ranks below, not raised here
    for rank in range(workers):
        env = {**os.environ, "RANK": str(rank), "LOCAL_RANK": "0" if gpus else str(rank),
               "WORLD_SIZE": str(workers), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
               "CUDA_VISIBLE_DEVICES": gpus[rank] if gpus else "", "OMP_NUM_THREADS": os.environ.get(
                   "OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // workers)))}
        ranks.append(subprocess.Popen([sys.executable, "-m", "fts_mcp.jobs.ranks", ctx.job_id, str(rank),
                                       str(workers), str(port)], env=env, stdin=subprocess.DEVNULL))
    forwarded = False
    try:
        while True:
            codes = [r.poll() for r in ranks]
            if stop and not forwarded:
                for r in ranks:
                    if r.poll() is None:
                        r.send_signal(signal.SIGTERM)
                forwarded = True
            failed = [(i, c) for i, c in enumerate(codes) if c not in (None, 0)]
            if failed:
                for r in ranks:
                    if r.poll() is None:
                        r.kill()
                for r in ranks:
                    r.wait()
                # a rank that died (a signal, or no error of its own) outweighs the errors it caused its peers
                lost = [(i, c) for i, c in failed if c < 0 or not (folder / RANK_ERROR.format(rank=i)).exists()]
                if not lost:  # the recipe's own error (a bad dataset, an unknown module...): as is
                    error = json.loads((folder / RANK_ERROR.format(rank=failed[0][0])).read_text())
                    failure = FtsError(error["message"], param=error.get("param"))
                    failure.code = error["code"]
                    raise failure
                rank, code = min(lost, key=lambda item: (item[1] >= 0, item[0]))  # the one killed, if any
                how = f"was killed by {signal_name(code)}" if code < 0 else f"exited with status {code}"
                raise RankLost(f"rank {rank} of {workers} {how}; the other ranks were stopped. resume_job continues "
                               "from the last checkpoint")
            if all(c == 0 for c in codes):
                break
            time.sleep(POLL_SECONDS)
    finally:
        stop.in_loop = False
    result = json.loads((folder / RANK_RESULT).read_text())
    return Artifacts(**result["artifacts"]) if result.get("artifacts") else None


def rank_main(job_id: str, rank: int, world: int) -> int:
    """One rank: the job's recipe with a context over the store (rank 0) or a silent one (the others). Its exit
    status tells the work horse how it ended: 0 done or stopped, 3 failed (its error in the job's folder), 4 lost
    (another rank died under a collective)."""
    settings = Settings.from_env()
    store = JobStore(settings)
    stop = StopSignal()
    signal.signal(signal.SIGTERM, lambda *_: stop.set("cancel"))
    # a rank whose work horse is gone (killed) has no one to answer to: it ends at once
    watch_parent(lambda: os.kill(os.getpid(), signal.SIGKILL), every=0.5)
    job = store.get(job_id, log_lines=0)
    folder = store.job_dir(job_id)
    ctx = store_context(store, job_id, stop) if rank == 0 else silent_context(job_id, folder, stop)
    (folder / RANK_ERROR.format(rank=rank)).unlink(missing_ok=True)
    outcome = run_recipe(job.kind, job.spec, ctx, peers=True)
    if outcome.state == "lost":  # another rank died under a collective: that rank's loss is the job's story
        return 4
    if outcome.state == "failed":  # the recipe's own error, or one it did not expect: the job fails with it
        write_json_atomic(folder / RANK_ERROR.format(rank=rank), outcome.error.model_dump())
        return 3
    if rank == 0:
        artifacts = outcome.artifacts
        write_json_atomic(folder / RANK_RESULT, {"artifacts": artifacts.model_dump() if artifacts else None})
    store.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(rank_main(check_job_id(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])))
