"""One job on a Ray cluster: what the entrypoint (`fts_mcp.jobs.ray.entry`) runs once it has checked its Python.

It starts in the Ray job's working_dir, the package the server built (`fts_mcp.jobs.ray.runner.package`):
`job.json` (the job's kind and spec, with its input paths made relative to the package), `inputs/` (the files
and folders the spec names: dataset, local base model, adapters) and `work/` (a resumed job's checkpoint). The
package is shared by every job on the node that has the same content, so the job works in a fresh folder of its
own, never in the package, and never in the server's FTS_HOME: the cluster shares no filesystem with the server.

Everything the server records comes back as frames in this job's log (`fts_mcp.jobs.ray.frames`): progress as it
happens, each checkpoint as it is saved, then the job's folder, a merge's output folder and the outcome. How the
recipe's run ended is decided as for a local worker (`fts_mcp.jobs.outcome.run_recipe`).

* One worker (every merge, generate and eval job, and `workers: 1` training): the recipe runs in this process,
  which the server asked the cluster to give the job's CPU and GPU. A stop request (SIGTERM, sent by `ray job
  stop`) asks it to checkpoint and stop, exactly as it asks a local worker.
* Several workers: Ray Train's `TorchTrainer` runs the same recipe on each, data parallel (the Trainer sees the
  process group Ray set up: NCCL on GPUs, gloo on CPUs). Rank 0 sends its frames to a small actor that this
  process prints them from; a stop request is passed to every rank through the same actor, and the ranks agree on
  the step to stop at, as local ranks do.
"""

from __future__ import annotations

import copy
import logging
import os
import shutil
import signal
import sys
import tempfile
import threading
import time
import traceback
from pathlib import Path, PurePosixPath
from typing import Any

from fts_mcp.files import artifact_file
from fts_mcp.jobs.context import JobContext, Stop, StopSignal, silent_context
from fts_mcp.jobs.outcome import Outcome, run_recipe
from fts_mcp.jobs.ray.frames import Emit, Storage, encode, relative_artifacts, send_tree
from fts_mcp.jobs.ray.placement import CPUS_PER_WORKER

log = logging.getLogger(__name__)
STOP_POLL_SECONDS = 0.5
TEXT_LIMIT = 16 * 2**20  # JSON and Markdown files up to this size get their paths put back in the server's terms


def print_frame(frame: dict[str, Any]) -> None:
    sys.stdout.write(encode(frame))
    sys.stdout.flush()


def get_path(spec: dict[str, Any], where: list[Any]) -> Any:
    node: Any = spec
    for key in where:
        node = node[key]
    return node


def set_path(spec: dict[str, Any], where: list[Any], value: str) -> None:
    node = spec
    for key in where[:-1]:
        node = node[key]
    node[where[-1]] = value


class Layout:
    """Where this job's inputs, work and output are on this node."""

    def __init__(self, package: Path, root: Path, job: dict[str, Any]) -> None:
        self.package, self.root, self.job = package, root, job
        self.work = root / "work"
        self.output = root / "output" / job["output"][1] if job.get("output") else None
        storage = job.get("storage")
        self.storage = Storage(storage["uri"], storage["prefix"]) if storage else None  # else folders go in the log
        # What files written here say about paths (PEFT's base_model_name_or_path, a model card) is put back in
        # the server's terms before they are sent: its model, its job folder, its output folder.
        pairs = [(str(package / PurePosixPath(rel)), get_path(job["spec"], where)) for where, rel in job["inputs"]]
        pairs.append((str(self.work), job["server_dir"]))
        if self.output is not None:
            pairs.append((str(self.output), get_path(job["spec"], job["output"][0])))
        self.translations = sorted(pairs, key=lambda pair: -len(pair[0]))

    def restore_paths(self, folder: Path, *, skip: str | None = None) -> None:
        for path in folder.rglob("*"):
            if skip is not None and path.relative_to(folder).parts[0] == skip:
                continue
            if path.suffix in (".json", ".md") and path.is_file() and path.stat().st_size < TEXT_LIMIT:
                text = original = path.read_text(encoding="utf-8", errors="surrogateescape")
                for here, there in self.translations:
                    text = text.replace(here, there)
                if text != original:
                    path.write_text(text, encoding="utf-8", errors="surrogateescape")

    def prepare(self) -> dict[str, Any]:
        """Make the job's folders; return its spec with every path pointing at this node's copies."""
        if (self.package / "work").is_dir():
            shutil.copytree(self.package / "work", self.work)
        self.work.mkdir(parents=True, exist_ok=True)
        spec = copy.deepcopy(self.job["spec"])
        for where, relative in self.job["inputs"]:
            set_path(spec, where, str(self.package / PurePosixPath(relative)))
        if self.output is not None:
            self.output.parent.mkdir(parents=True, exist_ok=True)
            set_path(spec, self.job["output"][0], str(self.output))
        return spec

    def context(self, emit: Emit | None, stop: StopSignal) -> JobContext:
        """Rank 0's context sends everything; a silent one (other ranks) sends nothing."""
        if emit is None:
            return silent_context(self.job["job_id"], self.work, stop)

        def checkpoint(folder: Path) -> None:
            dest = str(PurePosixPath("work", *Path(folder).relative_to(self.work).parts))
            self.restore_paths(Path(folder))
            send_tree(emit, Path(folder), dest, storage=self.storage)
            emit({"t": "checkpoint", "path": dest})

        return JobContext(job_id=self.job["job_id"], workdir=self.work, stop=stop, checkpoint=checkpoint,
                          report=lambda figures, event=True: emit({"t": "report", "figures": figures,
                                                                   "event": event}),
                          rewind=lambda step: emit({"t": "rewind", "step": step}))

    def finish(self, emit: Emit, outcome: Outcome) -> None:
        """Send the job's folder (its checkpoints went as they were saved), its output folder, then the outcome."""
        self.restore_paths(self.work, skip="checkpoints")  # those were put right as they were sent
        if self.output is not None and self.output.is_dir():
            self.restore_paths(self.output)
        artifacts = outcome.artifacts
        if artifacts is not None and artifacts.files:  # sizes and hashes of the files as they are sent
            artifacts = artifacts.model_copy(update={"files": [artifact_file(Path(f.path)) for f in artifacts.files]})
        send_tree(emit, self.work, "work", skip=lambda p: p == Path("checkpoints"), storage=self.storage)
        if self.output is not None and self.output.is_dir():
            send_tree(emit, self.output, "output", storage=self.storage)
        if outcome.state == "succeeded":
            emit({"t": "result", "state": "succeeded",
                  "artifacts": relative_artifacts(artifacts, self.work, self.output)})
        elif outcome.state == "failed":
            emit({"t": "result", "state": "failed", "error": outcome.error.model_dump()})
        else:
            emit({"t": "result", "state": "stopped"})


def run_here(layout: Layout, spec: dict[str, Any]) -> None:
    """One worker: the recipe in this process; SIGTERM (a stop request) checkpoints and stops it."""
    stop = StopSignal()
    signal.signal(signal.SIGTERM, lambda *_: stop.set("cancel"))
    outcome = run_recipe(layout.job["kind"], spec, layout.context(print_frame, stop))
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # what is left is sending the results: let it finish
    layout.finish(print_frame, outcome)


# ---- several workers: Ray Train ---------------------------------------------------------------------------


def _channel_class():
    import ray

    @ray.remote(num_cpus=0)
    class Channel:
        """Rank 0's frames on their way to the driver's log, and the driver's stop request on its way to the ranks."""

        def __init__(self) -> None:
            self.frames: list[dict[str, Any]] = []
            self.stopping = False

        def put(self, frame: dict[str, Any]) -> None:
            self.frames.append(frame)

        def take(self) -> list[dict[str, Any]]:
            frames, self.frames = self.frames, []
            return frames

        def stop(self) -> None:
            self.stopping = True

        def stopped(self) -> bool:
            return self.stopping

    return Channel


def rank_loop(config: dict[str, Any]) -> None:
    """What each Ray Train worker runs: the job's recipe, over the process group Ray set up."""
    import ray
    import ray.train

    rank = ray.train.get_context().get_world_rank()
    channel = config["channel"]
    layout = Layout(Path(config["package"]), Path(tempfile.mkdtemp(prefix=f"fts-{config['job']['job_id']}-r{rank}-")),
                    config["job"])
    os.environ["FTS_HOME"] = str(layout.root / "home")
    spec = layout.prepare()
    stop = StopSignal()
    done = threading.Event()

    def watch() -> None:  # the train function runs off the main thread: no signal handlers; poll the channel
        while not done.wait(STOP_POLL_SECONDS):
            if ray.get(channel.stopped.remote()):
                stop.reason = stop.reason or "cancel"
                return

    threading.Thread(target=watch, daemon=True, name="stop-watch").start()
    emit = (lambda frame: ray.get(channel.put.remote(frame))) if rank == 0 else None
    try:
        outcome = run_recipe(layout.job["kind"], spec, layout.context(emit, stop), peers=True)
        if outcome.state == "lost":  # another worker died under a collective: the driver reports the loss
            raise outcome.exception
        if emit is not None:
            layout.finish(emit, outcome)
        elif outcome.state == "failed":  # the recipe's own error (a bad dataset, out of memory): any rank's counts
            ray.get(channel.put.remote({"t": "result", "state": "failed", "error": outcome.error.model_dump()}))
        if outcome.state == "failed":  # the trainer fails too, and stops the other workers
            raise outcome.exception
    finally:
        done.set()
        shutil.rmtree(layout.root, ignore_errors=True)


def run_trainer(package: Path, job: dict[str, Any]) -> None:
    """Several workers: TorchTrainer runs `rank_loop` on each; this process prints rank 0's frames."""
    import ray
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    ray.init(log_to_driver=True)
    channel = _channel_class().remote()
    gpus = float(job["gpus_per_worker"])
    storage = Path(tempfile.mkdtemp(prefix=f"fts-{job['job_id']}-train-"))
    trainer = TorchTrainer(
        rank_loop,
        train_loop_config={"channel": channel, "package": str(package), "job": job},
        scaling_config=ScalingConfig(num_workers=job["workers"], use_gpu=gpus > 0,
                                     resources_per_worker={"CPU": CPUS_PER_WORKER, **({"GPU": gpus} if gpus else {})}),
        run_config=RunConfig(name=job["job_id"], storage_path=str(storage),
                             failure_config=FailureConfig(max_failures=0)))
    signal.signal(signal.SIGTERM, lambda *_: channel.stop.remote())
    failure: list[BaseException] = []

    def fit() -> None:
        try:
            trainer.fit()
        except BaseException as exc:  # noqa: BLE001 - reported below, after rank 0's last frames
            failure.append(exc)

    thread = threading.Thread(target=fit, name="fit")
    thread.start()
    while True:
        running = thread.is_alive()
        for frame in ray.get(channel.take.remote()):  # rank 0 puts synchronously: all are in once fit returns
            print_frame(frame)
        if not running:
            break
        time.sleep(0.2)
    shutil.rmtree(storage, ignore_errors=True)
    if failure:  # after a result frame this changes nothing (the first result counts); without one, a worker was lost
        traceback.print_exception(failure[0])
        print_frame({"t": "result", "state": "lost", "error": {
            "code": "worker_lost", "message": f"a Ray Train worker failed: {failure[0]}"[:2000]}})


def run(package: Path, job: dict[str, Any]) -> int:
    """Run the job described by `job` (its package's job.json) from `package`, the Ray job's working_dir."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        stream=sys.stderr)
    if job["workers"] > 1:
        run_trainer(package, job)
        return 0
    layout = Layout(package, Path(tempfile.mkdtemp(prefix=f"fts-{job['job_id']}-")), job)
    os.environ["FTS_HOME"] = str(layout.root / "home")  # anything reading settings stays in this job's folder
    try:
        try:
            spec = layout.prepare()
        except Stop:
            return 0
        run_here(layout, spec)
    finally:
        shutil.rmtree(layout.root, ignore_errors=True)
    return 0
