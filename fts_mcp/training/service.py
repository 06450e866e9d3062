"""Training from the caller's side: validate a dataset (with token statistics under the model's tokenizer) and
submit a `train` job. Pure Python: the tokenizer runs in a short-lived subprocess, torch never loads here."""

from __future__ import annotations

import json
import math
import signal
import subprocess
import sys
from pathlib import Path

import psutil

from fts_mcp.config import Settings
from fts_mcp.datafiles import MAX_REPORTED_ERRORS, DatasetReport, LineError, TokenStats, require_valid, validate_dataset
from fts_mcp.errors import FtsError, InvalidArgument, ModelUnavailable, about
from fts_mcp.jobs.records import Job
from fts_mcp.jobs.service import Jobs
from fts_mcp.jobs.states import JobState, check_job_id
from fts_mcp.models.architecture import from_config, read_config
from fts_mcp.models.refs import check_available, resolve_model_argument
from fts_mcp.names import check_output_name
from fts_mcp.paths import resolve_inside
from fts_mcp.planning.defaults import choose_quantization, training_defaults
from fts_mcp.training.checkpoints import latest_checkpoint
from fts_mcp.training.spec import FORMATS, LoraSpec, TrainingSpec, TrainJobSpec

# A new job may start from the checkpoint of one that stopped or ended.
RESUMABLE_FROM = (JobState.CANCELLED, JobState.INTERRUPTED, JobState.SUCCEEDED, JobState.FAILED)


def _how_it_ended(returncode: int) -> str:
    """A child process's end in words: its exit status, or the signal that stopped it (SIGABRT, SIGKILL...)."""
    if returncode >= 0:
        return f"exited with status {returncode}"
    try:
        return f"was stopped by {signal.Signals(-returncode).name}"
    except ValueError:
        return f"was stopped by signal {-returncode}"


class Training:
    def __init__(self, settings: Settings, jobs: Jobs) -> None:
        self.settings = settings
        self.jobs = jobs

    def validate_dataset(self, path: str, base_model: str | None = None, max_seq_len: int = 2048) -> DatasetReport:
        file = resolve_inside(path, self.settings.roots, param="path")
        report = validate_dataset(file)
        if base_model is not None and report.ok:
            model = resolve_model_argument(base_model, self.settings)
            check_available(model, self.settings)
            report.token_stats, line_errors = self._token_stats(model, file, max_seq_len)
            if line_errors:  # lines this model's chat template cannot render: training would fail on them
                report.ok = False
                report.error_count += len(line_errors)
                report.errors += [LineError(line=line, message=message)
                                  for line, message in line_errors[:MAX_REPORTED_ERRORS - len(report.errors)]]
            if report.token_stats.over_max_seq_len:
                report.warnings.append(f"{report.token_stats.over_max_seq_len} examples are longer than "
                                       f"max_seq_len={max_seq_len} and will be truncated")
        return report

    def _token_stats(self, model: str, file: Path, max_seq_len: int) -> tuple[TokenStats, list[tuple[int, str]]]:
        command = [sys.executable, "-m", "fts_mcp.training.tokstats", model, str(file), str(max_seq_len)]
        if self.settings.trust_remote_code:
            command.append("--trust")
        try:
            done = subprocess.run(command, capture_output=True, text=True, timeout=600, check=False,
                                  env={**self.settings.env, "HF_HUB_DOWNLOAD_TIMEOUT": "30"})
        except subprocess.TimeoutExpired as exc:
            raise ModelUnavailable(f"loading the tokenizer of {model!r} took over 10 minutes", param="base_model") \
                from exc
        lines = done.stdout.strip().splitlines()
        try:
            answer = json.loads(lines[-1]) if lines else None
        except ValueError:  # something else wrote last on its stdout
            answer = None
        if not isinstance(answer, dict):  # it died: a tokenizer out of the capped memory aborts (SIGABRT), or crashed
            raise ModelUnavailable(f"counting tokens with the tokenizer of {model!r} failed: the process "
                                   f"{_how_it_ended(done.returncode)} (its memory is capped); "
                                   f"{done.stderr.strip()[-300:]}", param="base_model")
        if not answer["ok"]:
            raise ModelUnavailable(f"cannot load the tokenizer of {model!r}: {answer['message']}", param="base_model")
        return TokenStats(**answer["stats"]), [tuple(e) for e in answer.get("line_errors", [])]

    def start(self, base_model: str, dataset: str, *, output_name: str | None = None, lora: LoraSpec | None = None,
              quantization: str = "auto", training: TrainingSpec | None = None, resume_from: str | None = None,
              method: str = "sft") -> Job:
        """Validate everything, then submit a `train` job. A bad dataset raises with its line errors; no job.
        Unset choices (quantization 'auto', batch, epochs, learning rate) are made here and recorded in the
        spec's `choices`, with their reasons. `method` 'dpo' trains on preference pairs; with `resume_from` a
        succeeded 'sft' job it starts from that job's adapter (see `_resume_point`)."""
        if quantization not in ("auto", "nf4", "none"):
            raise InvalidArgument(f"{quantization!r} is not a quantization; use 'auto', 'nf4' (QLoRA) or 'none' "
                                  "(16-bit LoRA)", param="quantization")
        if method not in FORMATS:
            raise InvalidArgument(f"{method!r} is not a training method; use 'sft' (learn the answers) or 'dpo' "
                                  "(prefer chosen over rejected answers)", param="method")
        file = resolve_inside(dataset, self.settings.roots, param="dataset")
        report = require_valid(file)
        if (report.format == "preference") != (method == "dpo"):
            raise InvalidArgument(f"{file.name} holds {report.format} lines; method {method!r} trains on "
                                  f"{FORMATS[method]} lines: give a {FORMATS[method]} dataset, or method="
                                  f"{'dpo' if report.format == 'preference' else 'sft'!r}",
                                  param="dataset" if method == "dpo" else "method")
        model = resolve_model_argument(base_model, self.settings)
        lora = lora or LoraSpec()
        training = training or TrainingSpec()
        if self.settings.runner == "local" and training.workers > len(self.settings.slots):
            raise InvalidArgument(f"training.workers is {training.workers}, but this host has "
                                  f"{len(self.settings.slots)} slot(s) ({', '.join(self.settings.slots)}); ask for at "
                                  "most that many (FTS_GPUS picks the GPUs, FTS_CPU_SLOTS sets the CPU's)",
                                  param="training.workers")
        name = check_output_name(output_name) if output_name is not None else \
            f"{Path(model).name}-{file.stem}-lora"[:64]
        resume_checkpoint = init_adapter = None
        if resume_from is not None:
            resume_checkpoint, init_adapter = self._resume_point(check_job_id(resume_from, "resume_from"), model,
                                                                 lora, method)
            if quantization == "auto":  # a resumed run trains on the base its checkpoint was trained on
                quantization = self.jobs.get(resume_from, log_lines=0).spec.get("quantization", "nf4")
        held_out = math.floor(report.examples * training.eval_fraction)
        training, choices = training_defaults(training, examples=report.examples - held_out)
        placed = self.jobs.placement(training.workers)  # a Ray cluster that could never hold the job refuses it
        quantization, why = choose_quantization(quantization, cuda=self._on_gpu(placed), params=self._params(model),
                                                memory_gb=psutil.virtual_memory().total / 1e9)
        spec = TrainJobSpec(base_model=model, dataset=str(file), dataset_format=report.format, method=method,
                            dataset_examples=report.examples, output_name=name, lora=lora, quantization=quantization,
                            training=training, resume_checkpoint=resume_checkpoint, init_adapter=init_adapter,
                            resumed_from_job=resume_from,
                            trust_remote_code=self.settings.trust_remote_code,
                            choices=[why, *choices, *([placed[1]] if placed else [])])
        return self.jobs.submit("train", spec, model=model, placed=True)

    def _on_gpu(self, placed: tuple[float, str] | None) -> bool:
        """Whether the job runs on CUDA GPUs: GPUs per Ray worker (as set, or chosen from the cluster), else this
        host's slots."""
        if placed is not None:
            return placed[0] > 0
        return any(slot.startswith("cuda") for slot in self.settings.slots)

    def _params(self, model: str) -> int | None:
        """The base's parameter count from its config.json, when it can be read without the network."""
        try:
            config, source = read_config(model, self.settings.roots, offline=True)
            return from_config(config, source=source).params
        except FtsError:
            return None

    def _resume_point(self, job_id: str, model: str, lora: LoraSpec, method: str = "sft"
                      ) -> tuple[str | None, str | None]:
        """Where a job resuming `job_id` starts, as (checkpoint, initial adapter): with the same method its latest
        checkpoint (the step count, optimizer and schedule continue; a dpo job that began from an sft adapter keeps
        that adapter as its reference); for 'dpo' after a succeeded 'sft' job that job's adapter folder (the usual
        SFT -> DPO sequence: its weights, a fresh optimizer and step count)."""
        with about("resume_from", instead_of=("job_id",)):
            old = self.jobs.get(job_id, log_lines=0)
        if old.kind != "train" or old.state not in RESUMABLE_FROM:
            raise InvalidArgument(f"job {job_id} is a {old.state} {old.kind} job; resume_from takes a training job "
                                  "that is cancelled, interrupted, failed or succeeded", param="resume_from")
        if old.spec["base_model"] != model or LoraSpec(**old.spec["lora"]) != lora:
            raise InvalidArgument(f"job {job_id} trained {old.spec['base_model']} with lora={old.spec['lora']}; "
                                  "a resumed job must use the same base_model and lora settings", param="resume_from")
        trained_by = old.spec.get("method", "sft")
        if trained_by != method:
            adapter = self.jobs.folder(job_id) / "adapter"
            if (trained_by, method) != ("sft", "dpo"):
                raise InvalidArgument(f"job {job_id} trained with method {trained_by!r}; a {method!r} job continues a "
                                      f"{method!r} job, or method 'dpo' starts from a succeeded 'sft' job",
                                      param="resume_from")
            if old.state != JobState.SUCCEEDED or not (adapter / "adapter_config.json").is_file():
                raise InvalidArgument(f"job {job_id} is {old.state} and left no adapter; preference tuning starts "
                                      "from a succeeded sft job's adapter (or resume_job finishes it first)",
                                      param="resume_from")
            return None, str(adapter)
        checkpoint = latest_checkpoint(self.jobs.folder(job_id) / "checkpoints")
        if checkpoint is None:
            raise InvalidArgument(f"job {job_id} left no checkpoint to resume from (it stopped before its first save; "
                                  "lower training.checkpoint_every_steps next time)", param="resume_from")
        return str(checkpoint), old.spec.get("init_adapter")
