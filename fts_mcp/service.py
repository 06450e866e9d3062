"""The typed core the MCP tools and the CLI both call. Never imports `mcp` (nor torch).

Each public method is one operation an agent or a person can ask for; arguments are checked here and bad
ones raise `FtsError` subclasses naming the argument and what would be accepted.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from fts_mcp.config import Settings
from fts_mcp.datasets import DatasetReport, TokenStats, require_valid, validate_dataset
from fts_mcp.errors import FtsError, InvalidArgument, ModelUnavailable
from fts_mcp.hub import check_available, hub_offline, resolve_model_argument
from fts_mcp.jobs.models import Job, JobError, JobList
from fts_mcp.jobs.runner import Runner
from fts_mcp.jobs.states import JobState, check_job_id
from fts_mcp.jobs.store import JobStore
from fts_mcp.paths import resolve_inside
from fts_mcp.planning.advice import Advice, Criteria, recommend
from fts_mcp.planning.architecture import Architecture, from_config, read_config
from fts_mcp.planning.estimate import METHODS, MethodChoice, ResourceEstimate, estimate, shape_for_params
from fts_mcp.planning.estimate import Settings as EstimateSettings
from fts_mcp.planning.gpus import find_gpu
from fts_mcp.training.checkpoints import latest_checkpoint
from fts_mcp.training.spec import OUTPUT_NAME_RE, LoraSpec, TrainingSpec, TrainJobSpec

DEFAULT_TOKENS_PER_EXAMPLE = 512
RESUMABLE_FROM = (JobState.CANCELLED, JobState.INTERRUPTED, JobState.SUCCEEDED, JobState.FAILED)


class FineTuneService:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.store = JobStore(settings)
        self.runner = Runner(settings, self.store)

    def close(self) -> None:
        self.store.close()

    # ---- data ----------------------------------------------------------------------------------------------

    def validate_dataset(self, path: str, base_model: str | None = None, max_seq_len: int = 2048) -> DatasetReport:
        file = resolve_inside(path, self.settings.roots, param="path")
        report = validate_dataset(file)
        if base_model is not None and report.ok:
            model = resolve_model_argument(base_model, self.settings)
            check_available(model, self.settings)
            report.token_stats = self._token_stats(model, file, max_seq_len)
            if report.token_stats.over_max_seq_len:
                report.warnings.append(f"{report.token_stats.over_max_seq_len} examples are longer than "
                                       f"max_seq_len={max_seq_len} and will be truncated")
        return report

    def _token_stats(self, model: str, file: Path, max_seq_len: int) -> TokenStats:
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
        answer = json.loads(lines[-1]) if lines else {"ok": False, "message": done.stderr.strip()[-500:]}
        if not answer["ok"]:
            raise ModelUnavailable(f"cannot load the tokenizer of {model!r}: {answer['message']}", param="base_model")
        return TokenStats(**answer["stats"])

    # ---- jobs ----------------------------------------------------------------------------------------------

    def start_training(self, base_model: str, dataset: str, *, output_name: str | None = None,
                       lora: LoraSpec | None = None, quantization: str = "nf4",
                       training: TrainingSpec | None = None, resume_from: str | None = None) -> Job:
        """Validate everything, then create a `train` job. A bad dataset raises with its line errors; no job."""
        if quantization not in ("nf4", "none"):
            raise InvalidArgument(f"{quantization!r} is not a quantization; use 'nf4' (QLoRA) or 'none' (16-bit LoRA)",
                                  param="quantization")
        file = resolve_inside(dataset, self.settings.roots, param="dataset")
        report = require_valid(file)
        model = resolve_model_argument(base_model, self.settings)
        lora = lora or LoraSpec()
        training = training or TrainingSpec()
        if output_name is not None and not OUTPUT_NAME_RE.match(output_name):
            raise InvalidArgument(f"{output_name!r}: use 1-64 letters, digits, '.', '_' or '-', starting with a letter "
                                  "or digit", param="output_name")
        name = output_name or f"{Path(model).name}-{file.stem}-lora"[:64]
        resume_checkpoint = None
        if resume_from is not None:
            resume_checkpoint = str(self._resume_point(check_job_id(resume_from, "resume_from"), model, lora))
        spec = TrainJobSpec(base_model=model, dataset=str(file), dataset_format=report.format,
                            dataset_examples=report.examples, output_name=name, lora=lora, quantization=quantization,
                            training=training, resume_checkpoint=resume_checkpoint, resumed_from_job=resume_from,
                            trust_remote_code=self.settings.trust_remote_code)
        job = self.store.create("train", spec.model_dump())
        try:
            check_available(model, self.settings)
        except FtsError as exc:  # the job stays on record, failed, with the reason
            return self.store.transition(job.job_id, JobState.FAILED,
                                         error=JobError(code=exc.code, message=exc.message, param=exc.param))
        self.store.transition(job.job_id, JobState.QUEUED)
        self.runner.tick()
        return self.store.get(job.job_id)

    def _resume_point(self, job_id: str, model: str, lora: LoraSpec) -> Path:
        old = self.store.get(job_id)
        if old.kind != "train" or old.state not in RESUMABLE_FROM:
            raise InvalidArgument(f"job {job_id} is a {old.state} {old.kind} job; resume_from takes a training job "
                                  "that is cancelled, interrupted, failed or succeeded", param="resume_from")
        if old.spec["base_model"] != model or LoraSpec(**old.spec["lora"]) != lora:
            raise InvalidArgument(f"job {job_id} trained {old.spec['base_model']} with lora={old.spec['lora']}; "
                                  "a resumed job must use the same base_model and lora settings", param="resume_from")
        checkpoint = latest_checkpoint(self.store.job_dir(job_id) / "checkpoints")
        if checkpoint is None:
            raise InvalidArgument(f"job {job_id} left no checkpoint to resume from (it stopped before its first save; "
                                  "lower training.checkpoint_every_steps next time)", param="resume_from")
        return checkpoint

    def job_status(self, job_id: str, log_lines: int = 20) -> Job:
        return self.store.get(job_id, log_lines=log_lines)

    def list_jobs(self, state: str | None = None, limit: int = 20) -> JobList:
        if state is not None and state not in JobState.__members__.values():
            raise InvalidArgument(f"{state!r} is not a job state; use one of {', '.join(JobState)}", param="state")
        if not 1 <= limit <= 1000:
            raise InvalidArgument(f"limit must be between 1 and 1000, got {limit}", param="limit")
        return self.store.list(JobState(state) if state else None, limit)

    def cancel_job(self, job_id: str) -> Job:
        return self.runner.cancel(check_job_id(job_id))

    def resume_job(self, job_id: str) -> Job:
        return self.runner.resume(check_job_id(job_id))

    def job_log(self, job_id: str, max_bytes: int = 256 * 1024) -> str:
        check_job_id(job_id)
        self.store.get(job_id, log_lines=0)
        path = self.store.log_path(job_id)
        if not path.exists():
            return ""
        with path.open("rb") as fh:
            size = fh.seek(0, 2)
            fh.seek(max(0, size - max_bytes))
            return fh.read().decode("utf-8", "replace")

    def loss_curve(self, job_id: str) -> bytes:
        from fts_mcp.plots import loss_curve_png  # lazy: matplotlib is only loaded when a plot is asked for

        job = self.store.get(job_id, log_lines=0)
        return loss_curve_png(self.store.events(job_id, kind="progress"),
                              title=f"{job.spec.get('output_name', job.kind)} ({job_id})")


class PlanningService:
    """Planning answers: pure arithmetic and advice, plus reading a model's config.json (never its weights)."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings

    def recommend_ft_vs_rag(self, criteria: Criteria) -> Advice:
        return recommend(criteria)

    def estimate_resources(self, *, base_model: str | None = None, params: int | None = None,
                           shape: dict[str, int | None] | None = None, method: MethodChoice = "all",
                           settings: EstimateSettings, dataset_examples: int | None = None,
                           tokens_per_example: int | None = None, dataset_tokens: int | None = None,
                           epochs: float = 3.0, gpu: str | None = None, gpu_memory_gb: float | None = None,
                           price_per_gpu_hour: float | None = None, utilization: float | None = None
                           ) -> ResourceEstimate:
        shape = {k: v for k, v in (shape or {}).items() if v is not None}
        given = [name for name, present in (("base_model", base_model), ("params", params), ("layers...", shape))
                 if present]
        if len(given) != 1:
            raise InvalidArgument("give exactly one of base_model (folder or hub id), params (a parameter count) or "
                                  "the architecture numbers (layers, hidden, intermediate, heads, kv_heads, vocab); "
                                  f"got {', '.join(given) or 'none'}", param="base_model")
        if base_model is not None:
            config, source = read_config(base_model, self.settings.roots, hub_offline(self.settings.env))
            arch, model = from_config(config, source=source), base_model
        elif params is not None:
            arch, name = shape_for_params(params)
            model, source = f"{params / 1e9:.1f}B parameters", f"assumed: {name} shape (nearest parameter count)"
        else:
            needed = ("layers", "hidden", "intermediate", "heads", "vocab")
            missing = [k for k in needed if k not in shape]
            if missing:
                raise InvalidArgument(f"explicit architecture needs {', '.join(needed)} (kv_heads defaults to heads); "
                                      f"missing {', '.join(missing)}", param=missing[0])
            shape.setdefault("kv_heads", shape["heads"])
            arch, model, source = Architecture(**shape), "explicit architecture", "explicit"
        if gpu is not None and gpu_memory_gb is not None:
            raise InvalidArgument("give gpu (a known card) or gpu_memory_gb (any card), not both", param="gpu")
        card = find_gpu(gpu) if gpu is not None else None
        if dataset_tokens is not None and dataset_examples is not None:
            raise InvalidArgument("give dataset_examples (with tokens_per_example) or dataset_tokens, not both",
                                  param="dataset_tokens")
        tokens = dataset_tokens
        if dataset_examples is not None:
            tokens = dataset_examples * (tokens_per_example or min(settings.seq_len, DEFAULT_TOKENS_PER_EXAMPLE))
        training_tokens = int(tokens * epochs) if tokens is not None else None
        methods = METHODS if method == "all" else (method,)
        return estimate(arch, model=model, shape_source=source, methods=methods, settings=settings, gpu=card,
                        gpu_memory_gb=gpu_memory_gb, price_per_gpu_hour=price_per_gpu_hour,
                        training_tokens=training_tokens, utilization=utilization)
