"""The job record as callers see it."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, Field

from fts_mcp.files import ArtifactFile
from fts_mcp.jobs.states import JobState

JobKind = Literal["train", "merge", "generate", "eval", "runtime"]


class Progress(BaseModel):
    step: int = 0
    total_steps: int | None = None
    epoch: float | None = None
    loss: float | None = Field(None, description="training loss at the last logged step")
    eval_loss: float | None = Field(None, description="loss on the held-out split at the last evaluation")
    reward_margin: float | None = Field(None, description="dpo: chosen minus rejected reward (training)")
    preference_accuracy: float | None = Field(None, description="dpo: share of pairs rewarding chosen above rejected")
    eval_reward_margin: float | None = None
    eval_preference_accuracy: float | None = None
    learning_rate: float | None = None
    tokens_per_second: float | None = Field(None, description="trained tokens per second over recent steps")
    eta_seconds: float | None = Field(None, description="estimated seconds until the last step")
    phase: str | None = Field(None, description="what the worker is doing: loading_model, tokenizing, training, "
                                                "merging, saving, hashing")
    url: str | None = Field(None, description="where a runtime job listens")
    plan: str | None = Field(None, description="the run's speed choices (micro-batch, checkpointing, padding-free) and "
                                               "the memory estimate behind them")
    tracking: dict[str, Any] | None = Field(None, description="where training.report_to sent the run (mlflow: "
                                                              "tracking_uri, experiment, run_id; tensorboard: log_dir; "
                                                              "trackio: project, run) or why a tracker was left out")


class JobError(BaseModel):
    code: str = Field(description="machine-readable cause, e.g. invalid_dataset, model_unavailable, worker_killed")
    message: str
    param: str | None = Field(None, description="the argument at fault, when there is one")


class Verification(BaseModel):
    """How a merged model compares with base + adapter (unmerged) on fixed inputs."""

    max_abs_logit_diff: float
    tolerance: float = Field(description="the most this dtype is allowed to differ")
    dtype: str
    inputs: int = Field(description="number of fixed probe inputs compared")
    passed: bool
    trained_base_max_abs_logit_diff: float | None = Field(
        None, description="merged model vs the 4-bit base + adapter it was trained on (QLoRA adapters)")
    merged_into: str | None = Field(None, description="the weights the adapter was merged into")


class Artifacts(BaseModel):
    adapter_dir: str | None = Field(None, description="PEFT adapter folder (adapter_config.json + safetensors)")
    checkpoint_dir: str | None = Field(None, description="latest resumable checkpoint")
    loss_curve: str | None = Field(None, description="loss curve PNG")
    metrics: str | None = Field(None, description="metrics.json with the final training and eval figures")
    output_dir: str | None = Field(None, description="merged model or combined adapter folder (merge jobs)")
    verification: Verification | None = None
    text: str | None = Field(None, description="generated text (generate jobs)")
    finish_reason: str | None = Field(None, description="stop (end of text) or length (max_tokens reached)")
    evaluation: dict[str, Any] | None = Field(None, description="eval jobs: base vs adapter summary (eval.json has "
                                                                 "everything)")
    files: list[ArtifactFile] = Field(default_factory=list)


class Job(BaseModel):
    job_id: str
    kind: JobKind
    state: JobState
    created_at: str
    started_at: str | None = None
    finished_at: str | None = None
    updated_at: str
    spec: dict[str, Any]
    progress: Progress = Field(default_factory=Progress)
    error: JobError | None = None
    artifacts: Artifacts = Field(default_factory=Artifacts)
    slot: str | None = Field(None, description="device slot the job runs on: cuda:N or cpu")
    pid: int | None = Field(None, description="process id of the worker doing the work")
    exit_code: int | None = Field(None, description="worker exit status; negative means killed by that signal")
    ray_job_id: str | None = Field(None, description="the Ray job running it (FTS_RUNNER=ray)")
    attempts: int = Field(0, description="how many times a worker has started on this job (resume adds one)")
    cancel_requested: bool = False
    resumable: bool = Field(False, description="true when resume_job can continue it from a checkpoint")
    log_tail: list[str] = Field(default_factory=list, description="last lines of the worker log")
    waiting: str | None = Field(None, description="queued jobs only: what it waits behind (the jobs holding the "
                                                  "slots it needs, earlier queued jobs), or 'starting' when a slot "
                                                  "is free for it")


class JobResult(BaseModel):
    """How a job ended, as its folder's `result.json` keeps it: left by the work horse for its supervisor to
    record, and rewritten by the store once the job is terminal (the database is rebuilt from it)."""

    state: Literal["succeeded", "failed", "cancelled", "interrupted"]
    error: JobError | None = None
    artifacts: Artifacts | None = None


class JobList(BaseModel):
    jobs: list[Job]
    total: int = Field(description="jobs matching the filter, before the limit")
