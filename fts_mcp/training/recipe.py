"""The QLoRA / LoRA training recipe, top to bottom: setup -> data -> train -> save.

Runs in a job's work horse process (see fts_mcp.jobs.worker); the only module besides the tokenizer helpers
that imports torch. The same code runs on CUDA and on the CPU (bitsandbytes 4-bit works on both).
"""

from __future__ import annotations

import logging
import math
import os
import shutil
import time
from pathlib import Path
from typing import Any

import torch
from datasets import Dataset
from peft import LoraConfig
from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig, TrainerCallback, set_seed
from trl import SFTConfig, SFTTrainer

from fts_mcp.datasets import read_dataset
from fts_mcp.errors import DatasetInvalid, InvalidArgument, ModelUnavailable
from fts_mcp.io import sha256_file, write_bytes_atomic, write_json_atomic
from fts_mcp.jobs.models import ArtifactFile, Artifacts, Job
from fts_mcp.jobs.store import JobStore
from fts_mcp.plots import loss_curve_png
from fts_mcp.training.checkpoints import latest_checkpoint
from fts_mcp.training.data import encode_record
from fts_mcp.training.spec import TrainJobSpec

log = logging.getLogger(__name__)


def compute_dtype() -> torch.dtype:
    """bf16 where the GPU has it, fp16 on older GPUs, fp32 on the CPU (fastest there for tiny models)."""
    if torch.cuda.is_available():
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


def load_tokenizer(spec: TrainJobSpec) -> Any:
    try:
        tokenizer = AutoTokenizer.from_pretrained(spec.base_model, trust_remote_code=spec.trust_remote_code)
    except OSError as exc:
        raise ModelUnavailable(f"cannot load the tokenizer of {spec.base_model!r}: {exc}", param="base_model") from exc
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model(spec: TrainJobSpec, dtype: torch.dtype) -> Any:
    quantization = None
    if spec.quantization == "nf4":
        quantization = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                          bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=dtype,
                                          bnb_4bit_quant_storage=dtype)
    device = "cuda:0" if torch.cuda.is_available() else "cpu"
    try:
        return AutoModelForCausalLM.from_pretrained(spec.base_model, quantization_config=quantization, dtype=dtype,
                                                    device_map={"": device},
                                                    trust_remote_code=spec.trust_remote_code)
    except OSError as exc:
        raise ModelUnavailable(f"cannot load {spec.base_model!r}: {exc}", param="base_model") from exc


def build_datasets(spec: TrainJobSpec, tokenizer: Any) -> tuple[Dataset, Dataset | None]:
    fmt, records, errors, count = read_dataset(Path(spec.dataset))
    if errors:
        raise DatasetInvalid(f"{spec.dataset} changed since the job was queued and now has {count} invalid line(s)",
                             [(e.line, e.message) for e in errors])
    rows = [encode_record(tokenizer, fmt, r) for r in records]
    data = Dataset.from_list(rows)
    n_eval = math.floor(len(rows) * spec.training.eval_fraction)
    if n_eval == 0:
        return data, None
    split = data.train_test_split(test_size=n_eval, seed=spec.training.seed)
    return split["train"], split["test"]


class Progress(TrainerCallback):
    """Writes step, loss, learning rate, tokens/s and ETA to the store; turns a stop request into a checkpoint."""

    def __init__(self, store: JobStore, job_id: str, stop: Any, checkpoints: Path) -> None:
        self.store, self.job_id, self.stop, self.checkpoints = store, job_id, stop, checkpoints
        self.t0 = time.monotonic()
        self.step0 = 0
        self.last = (time.monotonic(), 0)

    def on_train_begin(self, args, state, control, **kwargs):
        self.t0, self.step0 = time.monotonic(), state.global_step
        self.last = (self.t0, state.num_input_tokens_seen or 0)
        self.store.update_progress(self.job_id, {"phase": "training", "step": state.global_step,
                                                 "total_steps": state.max_steps}, event=None)

    def on_step_end(self, args, state, control, **kwargs):
        done = state.global_step - self.step0
        eta = (time.monotonic() - self.t0) / done * (state.max_steps - state.global_step) if done else None
        self.store.update_progress(self.job_id, {"step": state.global_step, "total_steps": state.max_steps,
                                                 "epoch": state.epoch, "eta_seconds": eta}, event=None)
        if self.stop:
            control.should_save = True
            control.should_training_stop = True
        return control

    def on_log(self, args, state, control, logs=None, **kwargs):
        logs = logs or {}
        now, seen = time.monotonic(), state.num_input_tokens_seen or 0
        figures: dict[str, Any] = {"step": state.global_step, "epoch": state.epoch}
        if "loss" in logs:
            then, seen_then = self.last
            figures.update(loss=logs["loss"], learning_rate=logs.get("learning_rate"), logged=True)
            if now > then and seen > seen_then:
                figures["tokens_per_second"] = (seen - seen_then) / (now - then)
            self.last = (now, seen)
        if "eval_loss" in logs:
            figures["eval_loss"] = logs["eval_loss"]
        if len(figures) > 2:
            self.store.update_progress(self.job_id, figures)

    def on_save(self, args, state, control, **kwargs):
        checkpoint = self.checkpoints / f"checkpoint-{state.global_step}"
        artifacts = self.store.get(self.job_id, log_lines=0).artifacts
        artifacts.checkpoint_dir = str(checkpoint)
        self.store.set_artifacts(self.job_id, artifacts)


def trainer_config(spec: TrainJobSpec, checkpoints: Path, dtype: torch.dtype, has_eval: bool) -> SFTConfig:
    t = spec.training
    return SFTConfig(
        output_dir=str(checkpoints),
        num_train_epochs=t.epochs,
        max_steps=t.max_steps or -1,
        learning_rate=t.learning_rate,
        lr_scheduler_type=t.lr_scheduler,
        warmup_steps=t.warmup_ratio,  # a float below 1 is a ratio of total steps
        weight_decay=t.weight_decay,
        max_grad_norm=t.max_grad_norm,
        optim=t.optimizer,
        per_device_train_batch_size=t.micro_batch_size,
        per_device_eval_batch_size=t.micro_batch_size,
        gradient_accumulation_steps=t.gradient_accumulation_steps,
        gradient_checkpointing=t.gradient_checkpointing,
        gradient_checkpointing_kwargs={"use_reentrant": False},
        bf16=dtype == torch.bfloat16,
        fp16=dtype == torch.float16,
        use_cpu=not torch.cuda.is_available(),
        seed=t.seed,
        logging_steps=t.logging_steps,
        save_strategy="steps",
        save_steps=t.checkpoint_every_steps,
        save_total_limit=2,
        eval_strategy="steps" if has_eval else "no",
        eval_steps=t.checkpoint_every_steps if has_eval else None,
        max_length=t.max_seq_len,
        packing=t.packing,
        packing_strategy="wrapped",
        completion_only_loss=True,
        include_num_input_tokens_seen="non_padding",
        report_to="none",
        disable_tqdm=True,
        dataloader_num_workers=0,
    )


def make_trainer(spec: TrainJobSpec, model: Any, tokenizer: Any, train_data: Dataset, eval_data: Dataset | None,
                 checkpoints: Path, dtype: torch.dtype, callbacks: list[TrainerCallback]) -> SFTTrainer:
    """TRL's SFTTrainer with the job's LoRA config; a bad target module list names the model's layers."""
    lora = LoraConfig(r=spec.lora.r, lora_alpha=spec.lora.effective_alpha, lora_dropout=spec.lora.dropout,
                      target_modules=spec.lora.target_modules, bias="none", task_type="CAUSAL_LM")
    try:
        return SFTTrainer(model=model, args=trainer_config(spec, checkpoints, dtype, eval_data is not None),
                          train_dataset=train_data, eval_dataset=eval_data, processing_class=tokenizer,
                          peft_config=lora, callbacks=callbacks)
    except ValueError as exc:
        if "target modules" not in str(exc).lower():
            raise
        names = sorted({name.rsplit(".", 1)[-1] for name, module in model.named_modules()
                        if type(module).__name__.startswith("Linear")})
        raise InvalidArgument(f"{exc}. This model's linear layers are: {', '.join(names)}; or use 'all-linear'",
                              param="lora.target_modules") from exc


def train(job: Job, store: JobStore, stop: Any) -> Artifacts | None:
    """Run one training job. Returns its artifacts, or None when stopped (a checkpoint was saved)."""
    spec = TrainJobSpec(**job.spec)
    folder = store.job_dir(job.job_id)
    checkpoints = folder / "checkpoints"
    os.environ.setdefault("HF_HUB_DOWNLOAD_TIMEOUT", "30")

    # 1. setup
    store.update_progress(job.job_id, {"phase": "loading_model"}, event=None)
    set_seed(spec.training.seed)
    dtype = compute_dtype()
    tokenizer = load_tokenizer(spec)
    model = load_model(spec, dtype)

    # 2. data
    store.update_progress(job.job_id, {"phase": "tokenizing"}, event=None)
    train_data, eval_data = build_datasets(spec, tokenizer)
    trainer = make_trainer(spec, model, tokenizer, train_data, eval_data, checkpoints, dtype,
                           callbacks=[Progress(store, job.job_id, stop, checkpoints)])

    # 3. train (continuing from this job's own checkpoint, else from the one it was asked to resume)
    resume = latest_checkpoint(checkpoints) or (Path(spec.resume_checkpoint) if spec.resume_checkpoint else None)
    if resume is not None:
        log.info("resuming from %s", resume)
    stop.in_loop = True
    try:
        result = trainer.train(resume_from_checkpoint=str(resume) if resume else None)
    finally:
        stop.in_loop = False
    if stop:
        log.info("stopped (%s) at step %d; checkpoint saved", stop.reason, trainer.state.global_step)
        return None
    final_eval = trainer.evaluate() if eval_data is not None else {}

    # 4. save: adapter (PEFT format), metrics, loss curve; each written to a temp name, then renamed
    store.update_progress(job.job_id, {"phase": "saving"}, event=None)
    adapter_dir = folder / "adapter"
    staging = folder / ".adapter.tmp"
    shutil.rmtree(staging, ignore_errors=True)
    trainer.model.save_pretrained(staging)
    tokenizer.save_pretrained(staging)
    shutil.rmtree(adapter_dir, ignore_errors=True)
    staging.rename(adapter_dir)

    trainable, total = trainer.model.get_nb_trainable_parameters()
    metrics = {
        "output_name": spec.output_name,
        "base_model": spec.base_model,
        "quantization": spec.quantization,
        "steps": trainer.state.global_step,
        "epochs": trainer.state.epoch,
        "train_loss": result.training_loss,
        "final_loss": next((h["loss"] for h in reversed(trainer.state.log_history) if "loss" in h), None),
        "eval_loss": final_eval.get("eval_loss"),
        "train_runtime_seconds": result.metrics.get("train_runtime"),
        "tokens_seen": trainer.state.num_input_tokens_seen,
        "trainable_parameters": trainable,
        "total_parameters": total,
        "log_history": trainer.state.log_history,
    }
    write_json_atomic(folder / "metrics.json", metrics)
    points = store.events(job.job_id, kind="progress")
    write_bytes_atomic(folder / "loss.png", loss_curve_png(points, title=f"{spec.output_name} ({job.job_id})"))
    if final_eval:
        store.update_progress(job.job_id, {"eval_loss": final_eval.get("eval_loss"), "step": trainer.state.global_step})

    files = [ArtifactFile(path=str(p), bytes=p.stat().st_size, sha256=sha256_file(p))
             for p in sorted(adapter_dir.iterdir()) if p.is_file()]
    return Artifacts(adapter_dir=str(adapter_dir), checkpoint_dir=str(latest_checkpoint(checkpoints) or "") or None,
                     loss_curve=str(folder / "loss.png"), metrics=str(folder / "metrics.json"), files=files)

