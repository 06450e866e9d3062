"""Experiment trackers (`training.report_to`): transformers' own integrations (TrainingArguments.report_to) send the
run's parameters, logged losses and final metrics; this module keeps a tracker's trouble out of the training.

Before the trainer is built, `usable` drops a tracker whose package is missing or whose server does not answer.
After, `Trackers.attach` wraps each integration callback: the first exception one raises is logged as a warning,
recorded in the job's progress (`tracking`) and switches that tracker off; the run goes on. Where each tracker
keeps the run (MLflow experiment and run id, TensorBoard log dir, Trackio project and run) is reported the same way,
and written into metrics.json. A tracker's end of run is deferred to `finish`, after the recipe's final evaluation,
so that evaluation lands in the same run.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from transformers import TrainerCallback
from transformers.integrations import INTEGRATION_TO_CALLBACK

log = logging.getLogger(__name__)

PROJECT = "fts-mcp"  # the Trackio project runs go to
PACKAGES = {"mlflow": ("mlflow",), "tensorboard": ("tensorboard", "tensorboardX"), "trackio": ("trackio",)}
PROBE_SECONDS = 3.0
# A tracking server that goes away mid-run must not stall training for MLflow's default minutes of retries.
MLFLOW_ENV = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1", "MLFLOW_HTTP_REQUEST_TIMEOUT": "10"}


def installed(name: str) -> bool:
    return any(importlib.util.find_spec(module) is not None for module in PACKAGES[name])


def mlflow_unreachable(uri: str | None, timeout: float = PROBE_SECONDS) -> str | None:
    """Why an HTTP tracking server does not answer, or None (it answers, or the URI is not HTTP: a local store)."""
    if not uri or not uri.startswith(("http://", "https://")):
        return None
    try:
        with urllib.request.urlopen(f"{uri.rstrip('/')}/health", timeout=timeout):
            return None
    except urllib.error.HTTPError:
        return None  # it answered (an auth proxy, an older server): the calls themselves will tell
    except (urllib.error.URLError, OSError) as exc:
        return f"the tracking server {uri} did not answer ({getattr(exc, 'reason', exc)})"


def usable(report_to: Sequence[str]) -> tuple[list[str], dict[str, str]]:
    """The trackers to hand transformers, and why each other one was left out."""
    kept, dropped = [], {}
    for name in report_to:
        if not installed(name):
            dropped[name] = f"{name} is not installed here: pip install 'fts-mcp[{name}]' on the host that trains"
        elif name == "mlflow" and (why := mlflow_unreachable(os.environ.get("MLFLOW_TRACKING_URI"))):
            dropped[name] = why
        else:
            kept.append(name)
    return kept, dropped


def identity(name: str, callback: Any, args: Any) -> dict[str, Any]:
    """Where a tracker keeps this run."""
    if name == "mlflow":
        mlflow = callback._ml_flow
        run = mlflow.active_run()
        if run is None:
            return {}
        experiment = mlflow.get_experiment(run.info.experiment_id)
        return {"tracking_uri": mlflow.get_tracking_uri(), "experiment": experiment.name if experiment else None,
                "experiment_id": run.info.experiment_id, "run_id": run.info.run_id, "run_name": run.info.run_name}
    if name == "tensorboard":
        return {"log_dir": str(callback.logging_dir)}
    if name == "trackio":
        return {"project": args.project, "run": args.run_name, "space": getattr(callback, "_space_id", None)}
    return {}


class Guarded(TrainerCallback):
    """One tracker's integration callback. Its first exception is reported and switches it off for the rest of the
    run; its end of run waits for `finish`."""

    def __init__(self, name: str, inner: TrainerCallback, trackers: Trackers) -> None:
        self.name, self.inner, self.trackers = name, inner, trackers
        self.off = False
        self.ended = False
        self.seen: tuple[Any, Any, Any] | None = None  # the last (args, state, control), for finish

    def call(self, event: str, args: Any, state: Any, control: Any, **kwargs: Any) -> Any:
        self.seen = (args, state, control)
        if self.off or self.ended:
            return None
        try:
            result = getattr(self.inner, event)(args, state, control, **kwargs)
        except Exception as exc:  # a tracker's own trouble (network, auth, disk) is never the training's
            self.off = True
            self.trackers.failed(self.name, exc)
            return None
        if event == "on_train_begin" and state.is_world_process_zero:
            try:
                where = identity(self.name, self.inner, args)
            except Exception as exc:  # the run is being recorded; only where could not be read back
                where = {"identity": f"unknown ({type(exc).__name__})"}
            self.trackers.found(self.name, where)
        return result

    def on_train_end(self, args, state, control, **kwargs):
        self.seen = (args, state, control)  # deferred to finish(): the final evaluation still reports

    def finish(self) -> None:
        if self.seen is not None and not self.off and not self.ended:
            self.call("on_train_end", *self.seen)
        self.ended = True


def _forward(event: str) -> Callable[..., Any]:
    def method(self: Guarded, args, state, control, **kwargs):
        return self.call(event, args, state, control, **kwargs)

    method.__name__ = event
    return method


for _event in [e for e in vars(TrainerCallback) if e.startswith("on_") and e != "on_train_end"]:
    setattr(Guarded, _event, _forward(_event))


class Trackers:
    """The trackers of one run and what the job hears of them: `report(figures, event=False)` is the job context's."""

    def __init__(self, dropped: dict[str, str], report: Callable[..., None]) -> None:
        self.report = report
        self.state: dict[str, dict[str, Any]] = {}
        self.guarded: list[Guarded] = []
        for name, why in dropped.items():
            log.warning("report_to %s: %s; training goes on without it", name, why)
            self.state[name] = {"error": why}
        if self.state:
            self._send()

    def _send(self) -> None:
        self.report({"tracking": {name: dict(info) for name, info in self.state.items()}}, event=False)

    def attach(self, trainer: Any, log_dir: Path) -> None:
        """Wrap the trainer's integration callbacks (TensorBoard writes into `log_dir`)."""
        classes = {cls: name for name, cls in INTEGRATION_TO_CALLBACK.items() if name in PACKAGES}
        callbacks = trainer.callback_handler.callbacks
        for i, callback in enumerate(callbacks):
            name = classes.get(type(callback))
            if name is None:
                continue
            if name == "tensorboard":
                callback.logging_dir = str(log_dir)
            callbacks[i] = Guarded(name, callback, self)
            self.guarded.append(callbacks[i])

    def found(self, name: str, where: dict[str, Any]) -> None:
        self.state[name] = {k: v for k, v in where.items() if v is not None}
        log.info("report_to %s: %s", name, ", ".join(f"{k} {v}" for k, v in self.state[name].items()))
        self._send()

    def failed(self, name: str, exc: Exception) -> None:
        why = f"{type(exc).__name__}: {str(exc).splitlines()[0][:300] if str(exc) else ''}".rstrip(": ")
        log.warning("report_to %s failed and is switched off for this run (%s); training goes on", name, why)
        self.state[name] = {**self.state.get(name, {}), "error": why}
        self._send()

    def finish(self) -> None:
        for callback in self.guarded:
            callback.finish()


def prepare(report_to: Sequence[str], report: Callable[..., None]) -> tuple[list[str], Trackers]:
    """The trackers transformers gets (`SFTConfig.report_to`) and the run's `Trackers`."""
    if "mlflow" in report_to:
        for key, value in MLFLOW_ENV.items():
            os.environ.setdefault(key, value)  # this process trains this one job
    kept, dropped = usable(report_to)
    return kept, Trackers(dropped, report)
