"""What a training job is asked to do. Pure pydantic: the server validates with it, the worker reads it.

Each knob's help says what it trades (memory, speed, quality), as torchtune's configs do.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

ModuleName = Annotated[str, Field(pattern=r"^[A-Za-z0-9_.]+$", min_length=1, max_length=200)]
Tracker = Literal["mlflow", "tensorboard", "trackio"]
Method = Literal["sft", "dpo"]  # supervised fine-tuning, or direct preference optimisation on preference pairs
FORMATS: dict[str, str] = {"sft": "chat, completion or text", "dpo": "preference"}  # the data each method takes


class LoraSpec(BaseModel):
    """LoRA adapter shape. Adapter size and optimizer memory grow linearly with r and the number of targets."""

    model_config = ConfigDict(extra="forbid")

    r: int = Field(16, ge=1, le=1024, description="rank: adapter capacity. 8-64 is typical; 16 is a good start")
    alpha: float | None = Field(None, gt=0, le=8192,
                                description="scale numerator, effective scale alpha/r; default 2*r")
    dropout: float = Field(0.05, ge=0.0, lt=1.0, description="dropout on the adapter input; 0-0.1")
    target_modules: Literal["all-linear"] | list[ModuleName] = Field(
        "all-linear", min_length=1,
        description="'all-linear' (every linear layer but the output head; best quality) or module names, "
                    "e.g. ['q_proj', 'v_proj'] (fewer parameters, less memory)")

    @property
    def effective_alpha(self) -> float:
        return self.alpha if self.alpha is not None else 2.0 * self.r


class TrainingSpec(BaseModel):
    """Optimisation settings. Unset (null) ones are chosen from the dataset's size when the job is submitted
    (`fts_mcp.planning.defaults`): small datasets get smaller steps and enough epochs to learn."""

    model_config = ConfigDict(extra="forbid")

    epochs: float | None = Field(None, gt=0, le=100, description="passes over the data (ignored when max_steps is "
                                                                "set). null: 1, more for a small dataset so it "
                                                                "gets at least 30 steps (up to 10)")
    max_steps: int | None = Field(None, ge=1, le=10_000_000, description="optimizer steps; overrides epochs")
    batch_size: int | None = Field(None, ge=1, le=65_536, description="examples per optimizer step, all workers "
                                                                      "together. null: 16, or 8 / 4 for datasets "
                                                                      "under 480 / 240 examples")
    learning_rate: float | None = Field(None, gt=0, le=1.0, description="peak learning rate; null: 2e-4 (LoRA's "
                                                                        "usual; 1e-4-3e-4)")
    lr_scheduler: Literal["cosine", "linear", "constant", "constant_with_warmup"] = "cosine"
    warmup_ratio: float | None = Field(None, ge=0, le=0.5, description="fraction of steps spent warming up; null: "
                                                                       "0.1")
    weight_decay: float = Field(0.0, ge=0, le=1.0)
    max_grad_norm: float = Field(1.0, gt=0, le=1000)
    micro_batch_size: int | None = Field(
        None, ge=1, le=1024, description="sequences per forward pass; activation memory grows with it. "
                                         "null: the largest (up to 16) the estimator says fits the device")
    gradient_accumulation_steps: int | None = Field(
        None, ge=1, le=1024, description="micro-batches per optimizer step (effective batch = micro_batch_size x "
                                         "this) at no extra memory. null: reach batch_size")
    gradient_checkpointing: bool | Literal["auto"] = Field(
        "auto", description="recompute activations: ~30% slower, far less memory. 'auto': off when the run fits "
                            "the device without it (the memory estimate decides), else on")
    max_seq_len: int = Field(2048, ge=16, le=262_144, description="longer examples are truncated")
    padding_free: bool = Field(True, description="lay each micro-batch's examples end to end (positions restart, "
                                                 "no attention across them): no padding computed, same losses")
    packing: bool = Field(False, description="also fill each row up to max_seq_len with whole examples: fewer, "
                                             "fuller steps per epoch")
    liger_kernel: bool | Literal["auto"] = Field(
        "auto", description="Liger's fused RMSNorm/RoPE/SwiGLU kernels; 'auto': on with CUDA and liger-kernel "
                            "installed (pip install 'fts-mcp[liger]')")
    eval_fraction: float = Field(0.0, ge=0.0, le=0.5, description="share of examples held out for eval loss")
    optimizer: Literal["adamw_torch", "adamw_8bit", "paged_adamw_8bit", "paged_adamw_32bit"] = Field(
        "adamw_torch", description="8-bit and paged AdamW save optimizer memory on CUDA")
    workers: int = Field(1, ge=1, le=64, description="processes training this job together, data parallel (DDP): "
                                                    "one per GPU slot (NCCL), or CPU slots (gloo); each holds "
                                                    "micro_batch_size examples, so a step sees workers x "
                                                    "micro_batch_size x gradient_accumulation_steps")
    beta: float = Field(0.1, gt=0, le=10, description="method 'dpo' only: how far the adapter may move from the "
                                                      "reference; lower lets preferences win more (0.05-0.5)")
    seed: int = Field(42, ge=0, le=2**31 - 1)
    logging_steps: int = Field(1, ge=1, le=10_000, description="report progress every N optimizer steps")
    checkpoint_every_steps: int = Field(50, ge=1, le=1_000_000,
                                        description="save a resumable checkpoint every N optimizer steps")
    report_to: list[Tracker] = Field(
        default_factory=list, max_length=3,
        description="experiment trackers that also get the run's parameters, losses and final metrics "
                    "(transformers' integrations): mlflow (the host's MLFLOW_TRACKING_URI, MLFLOW_EXPERIMENT_NAME), "
                    "tensorboard (event files in the job's folder), trackio (local project 'fts-mcp'); each needs "
                    "its extra (pip install 'fts-mcp[mlflow]'). A tracker that fails is reported, never fails the "
                    "training")

    @field_validator("report_to")
    @classmethod
    def _once_each(cls, trackers: list[str]) -> list[str]:
        return list(dict.fromkeys(trackers))


class TrainJobSpec(BaseModel):
    """The stored spec of a `train` job (paths already resolved inside the roots)."""

    model_config = ConfigDict(extra="forbid")

    base_model: str
    dataset: str
    dataset_format: Literal["chat", "completion", "text", "preference"]
    method: Method = Field("sft", description="sft: learn the answers; dpo: prefer chosen over rejected answers")
    dataset_examples: int
    output_name: str
    lora: LoraSpec = Field(default_factory=LoraSpec)
    quantization: Literal["nf4", "none"] = "nf4"
    choices: list[str] = Field(default_factory=list, description="what was chosen for the caller (quantization, "
                                                                 "batch, epochs, learning rate) and why")
    training: TrainingSpec = Field(default_factory=TrainingSpec)
    resume_checkpoint: str | None = None
    init_adapter: str | None = Field(None, description="dpo after sft: the finished job's adapter to start from (a "
                                                       "frozen copy of it is the reference), fresh optimizer")
    resumed_from_job: str | None = None
    trust_remote_code: bool = False
