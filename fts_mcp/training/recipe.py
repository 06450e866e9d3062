"""The QLoRA / LoRA training recipe, top to bottom: setup -> data -> train -> save.

`run(spec, ctx)`: runs in a job's work horse (see fts_mcp.jobs.worker) and knows nothing of the job store: it
reports through `ctx`. Models load through `fts_mcp.models.loading`. The same code runs on CUDA and on the CPU
(bitsandbytes 4-bit works on both).
"""

from __future__ import annotations

import inspect
import logging
import math
import os
import shutil
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from datasets import Dataset
from peft import LoraConfig
from transformers import TrainerCallback, set_seed
from trl import SFTConfig, SFTTrainer

from fts_mcp.datafiles import read_dataset
from fts_mcp.errors import DatasetInvalid, InvalidArgument
from fts_mcp.files import artifact_files, write_bytes_atomic, write_json_atomic
from fts_mcp.jobs.context import JobContext
from fts_mcp.jobs.records import Artifacts
from fts_mcp.models.base import TrainingBase, write_training_base
from fts_mcp.models.loading import compute_dtype, ddp_backend, device, load_model, load_tokenizer, world_size
from fts_mcp.models.prompts import encode_rows
from fts_mcp.planning.defaults import training_defaults
from fts_mcp.plots import loss_curve_png
from fts_mcp.training.checkpoints import latest_checkpoint
from fts_mcp.training.preference import FIGURES, PreferenceTrainer, make_dpo_trainer
from fts_mcp.training.spec import TrainJobSpec
from fts_mcp.training.speed import SpeedPlan, plan, read_plan, write_plan
from fts_mcp.training.tracking import PROJECT, prepare

log = logging.getLogger(__name__)


def build_datasets(spec: TrainJobSpec, tokenizer: Any) -> tuple[Dataset, Dataset | None]:
    data = read_dataset(Path(spec.dataset))
    if data.errors:
        raise DatasetInvalid(f"{spec.dataset} changed since the job was queued and now has {data.error_count} "
                             "invalid line(s)", [(e.line, e.message) for e in data.errors])
    rows, errors = encode_rows(tokenizer, data.format, data.rows)
    if errors:
        shown = "; ".join(f"line {line}: {message}" for line, message in errors[:5])
        raise DatasetInvalid(f"{len(errors)} example(s) cannot be rendered for this model: {shown}", errors)
    if spec.method == "sft":  # preference pairs are cut per sequence (prompt + one answer) by TRL's collator
        rows = [truncate(row, spec.training.max_seq_len) for row in rows]
    dataset = Dataset.from_list(rows)
    n_eval = math.floor(len(rows) * spec.training.eval_fraction)
    if n_eval == 0:
        return dataset, None
    split = dataset.train_test_split(test_size=n_eval, seed=spec.training.seed)
    return split["train"], split["test"]


def truncate(row: dict[str, list[int]], max_len: int) -> dict[str, list[int]]:
    """Keep an example's first `max_len` tokens (as the padded path's truncation does)."""
    return {key: value[:max_len] for key, value in row.items()}


REPORT_EVERY_SECONDS = 1.0


def all_ranks(local: int | None, args: Any) -> int:
    """A count summed over the data-parallel ranks (each counts only its own tokens, without a sync per step);
    every rank must call it at the same point."""
    if world_size() == 1 or not torch.distributed.is_initialized():
        return local or 0
    total = torch.tensor([float(local or 0)], device=args.device)
    torch.distributed.all_reduce(total)
    return int(total.item())


def stop_agreed(local: bool, args: Any) -> bool:
    """Whether to stop after this step. Under DDP every rank must stop at the same step (a rank that stops alone
    leaves the others waiting in the next all-reduce): any rank's request stops them all."""
    if world_size() == 1 or not torch.distributed.is_initialized():
        return local
    flag = torch.tensor([1.0 if local else 0.0], device=args.device)
    torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
    return bool(flag.item())


class ReportProgress(TrainerCallback):
    """Reports step, loss, learning rate, tokens/s and ETA through the job context; turns a stop request into a
    checkpoint.

    Rates count only this run's work: the trainer calls `on_train_begin` before it restores a checkpoint's
    state (step, tokens seen), so the baseline is taken at the first step instead.
    """

    def __init__(self, ctx: JobContext) -> None:
        self.ctx = ctx
        self.start: tuple[float, int] | None = None  # (time, step) of this run's first step
        self.last: tuple[float, int] | None = None  # (time, tokens seen) at the last logged loss
        self.reported_at = float("-inf")  # when step/ETA last went to the store

    def on_train_begin(self, args, state, control, **kwargs):
        self.ctx.report({"phase": "training", "total_steps": state.max_steps}, event=False)

    def on_step_begin(self, args, state, control, **kwargs):
        if self.start is None:  # the first step of this run: a restored checkpoint's state is in place now
            now = time.monotonic()
            self.start, self.last = (now, state.global_step), (now, all_ranks(state.num_input_tokens_seen, args))
            self.ctx.rewind(state.global_step)

    def on_step_end(self, args, state, control, **kwargs):
        now = time.monotonic()
        if now - self.reported_at >= REPORT_EVERY_SECONDS or state.global_step >= state.max_steps:
            # at most about once a second (and at the last step): a store write per step costs more than a tiny
            # model's step; logged losses are reported by on_log whenever they come
            started, step0 = self.start or (now, state.global_step)
            done = state.global_step - step0
            eta = (now - started) / done * (state.max_steps - state.global_step) if done else None
            self.ctx.report({"step": state.global_step, "total_steps": state.max_steps, "epoch": state.epoch,
                             "eta_seconds": eta}, event=False)
            self.reported_at = now
        if stop_agreed(bool(self.ctx.stop), args):
            control.should_save = True
            control.should_training_stop = True
        return control

    def on_log(self, args, state, control, logs=None, **kwargs):
        logs = logs or {}
        now, seen = time.monotonic(), all_ranks(state.num_input_tokens_seen, args)
        figures: dict[str, Any] = {"step": state.global_step, "epoch": state.epoch}
        if "loss" in logs:
            figures.update(loss=logs["loss"], learning_rate=logs.get("learning_rate"), logged=True)
            if self.last is not None:
                then, seen_then = self.last
                if now > then and seen > seen_then:
                    figures["tokens_per_second"] = (seen - seen_then) / (now - then)
            self.last = (now, seen)
        if "eval_loss" in logs:
            figures["eval_loss"] = logs["eval_loss"]
        figures.update({name: logs[key] for key, name in FIGURES.items() if key in logs})  # preference tuning
        if len(figures) > 2:
            self.ctx.report(figures)

    def on_save(self, args, state, control, **kwargs):
        self.ctx.checkpoint(Path(args.output_dir) / f"checkpoint-{state.global_step}")


class RecordPlan(TrainerCallback):
    """Writes the speed plan into every checkpoint, so a resumed run keeps its micro-batch and accumulation."""

    def __init__(self, speed: SpeedPlan) -> None:
        self.speed = speed

    def on_save(self, args, state, control, **kwargs):
        write_plan(Path(args.output_dir) / f"checkpoint-{state.global_step}", self.speed)


# transformers 5 renamed gradient_checkpointing to activation_checkpointing (the old name warns); take either.
CHECKPOINTING = "activation_checkpointing" if "activation_checkpointing" in inspect.signature(SFTConfig).parameters \
    else "gradient_checkpointing"


def common_args(spec: TrainJobSpec, plan: SpeedPlan, checkpoints: Path, dtype: torch.dtype, has_eval: bool,
                report_to: Sequence[str] = (), run_name: str | None = None) -> dict[str, Any]:
    """The training arguments of every method: schedule, batch shape, precision, devices, checkpoints, logging."""
    t = with_defaults(spec).training
    return dict(
        output_dir=str(checkpoints),
        num_train_epochs=t.epochs,
        max_steps=t.max_steps or -1,
        learning_rate=t.learning_rate,
        lr_scheduler_type=t.lr_scheduler,
        warmup_steps=t.warmup_ratio,  # a float below 1 is a ratio of total steps
        weight_decay=t.weight_decay,
        max_grad_norm=t.max_grad_norm,
        optim=t.optimizer,
        per_device_train_batch_size=plan.micro_batch_size,
        per_device_eval_batch_size=plan.micro_batch_size,
        gradient_accumulation_steps=plan.gradient_accumulation_steps,
        **{CHECKPOINTING: plan.gradient_checkpointing, f"{CHECKPOINTING}_kwargs": {"use_reentrant": False}},
        bf16=dtype == torch.bfloat16,
        fp16=dtype == torch.float16,
        use_cpu=device().type == "cpu",
        ddp_backend=ddp_backend(),
        ddp_find_unused_parameters=False,  # every adapter weight gets a gradient
        seed=t.seed,
        logging_steps=t.logging_steps,
        save_strategy="steps",
        save_steps=t.checkpoint_every_steps,
        save_total_limit=2,
        eval_strategy="steps" if has_eval else "no",
        eval_steps=t.checkpoint_every_steps if has_eval else None,
        include_num_input_tokens_seen="no",  # counted by Trainer.training_step without a device sync
        report_to=list(report_to) or "none",  # experiment trackers (training.report_to), see training.tracking
        run_name=run_name,
        project=PROJECT,
        disable_tqdm=True,
        dataloader_num_workers=0,
    )


def trainer_config(spec: TrainJobSpec, plan: SpeedPlan, checkpoints: Path, dtype: torch.dtype,
                   has_eval: bool, report_to: Sequence[str] = (), run_name: str | None = None) -> SFTConfig:
    return SFTConfig(
        **common_args(spec, plan, checkpoints, dtype, has_eval, report_to, run_name),
        # rows are truncated to max_seq_len already; a padding-free batch without packing has no row length to cap
        max_length=spec.training.max_seq_len if plan.packing or not plan.padding_free else None,
        packing=plan.packing,
        packing_strategy="bfd",
        padding_free=plan.padding_free,
        use_liger_kernel=plan.liger_kernel,
        completion_only_loss=True,
    )


class Trainer(SFTTrainer):
    """SFTTrainer without per-step device syncs: trained (non-padding) tokens are counted from the flattened row's
    length when batches are padding-free (else from the attention mask), and a training step computes only its
    loss — TRL's chunked LM-head cross-entropy — without the entropy and token-accuracy metrics SFTTrainer
    gathers (three `.item()` syncs per micro-batch). Evaluation keeps them."""

    def training_step(self, model, inputs, num_items_in_batch=None):
        mask = inputs.get("attention_mask")
        self.state.num_input_tokens_seen += int(mask.sum()) if mask is not None else inputs["input_ids"].numel()
        return super().training_step(model, inputs, num_items_in_batch)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if return_outputs or not model.training or self.aux_loss_enabled or self.compute_loss_func is not None \
                or self.label_smoother is not None or self.args.loss_type != "nll":
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        outputs = model(**{**inputs, "use_cache": False}, fused_lm_head=True)
        tokens = outputs.label_mask.sum() if num_items_in_batch is None else num_items_in_batch
        loss = -outputs.log_probs.sum() / torch.as_tensor(tokens).clamp(min=1)
        if self.args.average_tokens_across_devices and num_items_in_batch is not None:
            loss = loss * self.accelerator.num_processes  # DDP averages gradients; the count is global
        return loss


def make_trainer(spec: TrainJobSpec, plan: SpeedPlan, model: Any, tokenizer: Any, train_data: Dataset,
                 eval_data: Dataset | None, checkpoints: Path, dtype: torch.dtype,
                 callbacks: list[TrainerCallback], report_to: Sequence[str] = (),
                 run_name: str | None = None) -> SFTTrainer | PreferenceTrainer:
    """TRL's SFTTrainer (method 'sft') or DPOTrainer ('dpo') with the job's LoRA config and speed plan; a bad
    target module list names the model's layers."""
    lora = LoraConfig(r=spec.lora.r, lora_alpha=spec.lora.effective_alpha, lora_dropout=spec.lora.dropout,
                      target_modules=spec.lora.target_modules, bias="none", task_type="CAUSAL_LM")
    try:
        if spec.method == "dpo":
            common = common_args(spec, plan, checkpoints, dtype, eval_data is not None, report_to, run_name)
            return make_dpo_trainer(spec, common, model, tokenizer, train_data, eval_data, callbacks)
        return Trainer(model=model, args=trainer_config(spec, plan, checkpoints, dtype, eval_data is not None,
                                                        report_to, run_name),
                       train_dataset=train_data, eval_dataset=eval_data, processing_class=tokenizer,
                       peft_config=lora, callbacks=callbacks)
    except ValueError as exc:
        if "target modules" not in str(exc).lower():
            raise
        names = sorted({name.rsplit(".", 1)[-1] for name, module in model.named_modules()
                        if type(module).__name__.startswith("Linear")})
        raise InvalidArgument(f"{exc}. This model's linear layers are: {', '.join(names)}; or use 'all-linear'",
                              param="lora.target_modules") from exc


def train_examples(spec: TrainJobSpec) -> int:
    """Examples in the training split (the dataset less its held-out share)."""
    return spec.dataset_examples - math.floor(spec.dataset_examples * spec.training.eval_fraction)


def with_defaults(spec: TrainJobSpec) -> TrainJobSpec:
    """The spec with every unset training choice filled as submitting does (specs written by hand or by tests)."""
    training, _ = training_defaults(spec.training, examples=train_examples(spec))
    return spec.model_copy(update={"training": training})


def preference_figures(history: list[dict[str, Any]], final_eval: dict[str, Any]) -> dict[str, float]:
    """A preference-tuning run's last reward margin and preference accuracy, training and held out (none for
    sft)."""
    last = {key: next((h[key] for h in reversed(history) if key in h), None) for key in FIGURES}
    last |= {key: final_eval[key] for key in FIGURES if key in final_eval}
    return {name: last[key] for key, name in FIGURES.items() if last[key] is not None}


def run(spec: TrainJobSpec, ctx: JobContext) -> Artifacts | None:
    """Run one training job. Returns its artifacts, or None when stopped (a checkpoint was saved)."""
    folder = ctx.workdir
    checkpoints = folder / "checkpoints"
    os.environ.setdefault("HF_HUB_DOWNLOAD_TIMEOUT", "30")

    # 1. setup
    spec = with_defaults(spec)
    ctx.phase("loading_model")
    set_seed(spec.training.seed)
    dtype = compute_dtype()
    tokenizer = load_tokenizer(spec.base_model, trust_remote_code=spec.trust_remote_code)
    model = load_model(spec.base_model, trust_remote_code=spec.trust_remote_code, quantization=spec.quantization,
                       dtype=dtype)

    # 2. data
    ctx.phase("tokenizing")
    train_data, eval_data = build_datasets(spec, tokenizer)
    # continuing from this job's own checkpoint, else from the one it was asked to resume: with its batch shape
    resume = latest_checkpoint(checkpoints) or (Path(spec.resume_checkpoint) if spec.resume_checkpoint else None)
    speed = plan(spec, model, resuming=read_plan(resume) if resume else None)
    log.info("speed plan: %s; %s", speed.summary(), "; ".join(speed.reasons))
    ctx.report({"plan": speed.summary()}, event=False)
    # experiment trackers: one that is missing or unreachable is reported and left out, never fails the run
    report_to, trackers = prepare(spec.training.report_to, ctx.report)
    trainer = make_trainer(spec, speed, model, tokenizer, train_data, eval_data, checkpoints, dtype,
                           callbacks=[ReportProgress(ctx), RecordPlan(speed)], report_to=report_to,
                           run_name=f"{spec.output_name}-{ctx.job_id}")
    trackers.attach(trainer, log_dir=folder / "tensorboard")

    # 3. train
    if resume is not None:
        log.info("resuming from %s", resume)
    ctx.stop.in_loop = True
    try:
        try:
            result = trainer.train(resume_from_checkpoint=str(resume) if resume else None)
        finally:
            ctx.stop.in_loop = False
        if ctx.stop:
            log.info("stopped (%s) at step %d; checkpoint saved", ctx.stop.reason, trainer.state.global_step)
            return None
        final_eval = trainer.evaluate() if eval_data is not None else {}
    finally:
        trackers.finish()  # each tracker's end of run, after the final evaluation

    # 4. save: adapter (PEFT format, with the tokenizer and chat template it was trained with), metrics, loss
    # curve; each written to a temp name, then renamed
    tokens_seen = all_ranks(trainer.state.num_input_tokens_seen, trainer.args)
    if not trainer.is_world_process_zero():
        return None  # under DDP rank 0 saves; the others are done
    ctx.phase("saving")
    adapter_dir = folder / "adapter"
    staging = folder / ".adapter.tmp"
    shutil.rmtree(staging, ignore_errors=True)
    trainer.model.save_pretrained(staging, selected_adapters=["default"])  # not DPO's frozen reference copy
    tokenizer.save_pretrained(staging)
    write_training_base(staging, TrainingBase(quantization=spec.quantization, compute_dtype=str(dtype).split(".")[-1]))
    shutil.rmtree(adapter_dir, ignore_errors=True)
    staging.rename(adapter_dir)

    trainable, total = trainer.model.get_nb_trainable_parameters()
    history = trainer.state.log_history
    metrics = {
        "output_name": spec.output_name,
        "base_model": spec.base_model,
        "dataset": spec.dataset,
        "quantization": spec.quantization,
        "steps": trainer.state.global_step,
        "epochs": trainer.state.epoch,
        "train_loss": result.training_loss,
        "final_loss": next((h["loss"] for h in reversed(history) if "loss" in h), None),
        "eval_loss": final_eval.get("eval_loss"),
        "method": spec.method,
        **preference_figures(history, final_eval),
        "train_runtime_seconds": result.metrics.get("train_runtime"),
        "tokens_seen": tokens_seen,
        "speed": speed.model_dump(),
        "trainable_parameters": trainable,
        "total_parameters": total,
        "log_history": history,
        "tracking": trackers.state or None,  # where report_to sent the run, or why a tracker could not take it
    }
    write_json_atomic(folder / "metrics.json", metrics)
    points = [{**h, "logged": True} for h in history]
    write_bytes_atomic(folder / "loss.png", loss_curve_png(points, title=f"{spec.output_name} ({ctx.job_id})"))
    if final_eval:
        ctx.report({"eval_loss": final_eval.get("eval_loss"), "step": trainer.state.global_step,
                    **{name: final_eval[key] for key, name in FIGURES.items() if key in final_eval}})

    return Artifacts(adapter_dir=str(adapter_dir), checkpoint_dir=str(latest_checkpoint(checkpoints) or "") or None,
                     loss_curve=str(folder / "loss.png"), metrics=str(folder / "metrics.json"),
                     files=artifact_files(adapter_dir))
