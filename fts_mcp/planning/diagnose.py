"""Read a job's state, loss curve and log, and name what went wrong with a fix. Pure: values in, findings out."""

from __future__ import annotations

import math
from typing import Any

from pydantic import BaseModel

from fts_mcp.jobs.records import Job


class Finding(BaseModel):
    problem: str
    evidence: str
    fix: str


def _losses(points: list[dict[str, Any]], key: str) -> list[float]:
    by_step = {int(p["step"]): float(p[key]) for p in points if p.get(key) is not None and p.get("step") is not None}
    return [by_step[s] for s in sorted(by_step)]


def diagnose(job: Job, points: list[dict[str, Any]], log_text: str) -> list[Finding]:
    findings: list[Finding] = []
    train, evals = _losses(points, "loss"), _losses(points, "eval_loss")
    error = job.error
    if error and (error.code == "out_of_memory" or "out of memory" in log_text.lower()):
        findings.append(Finding(problem="out of memory", evidence=error.message if error else "log mentions OOM",
                                fix="halve training.micro_batch_size and double gradient_accumulation_steps; keep "
                                    "gradient_checkpointing on; lower max_seq_len; use quantization='nf4' or "
                                    "optimizer='paged_adamw_8bit' (estimate_resources shows what fits)"))
    if any(math.isnan(x) or math.isinf(x) for x in train):
        findings.append(Finding(problem="loss became NaN/inf", evidence="non-finite loss logged",
                                fix="lower learning_rate 3-10x, keep max_grad_norm at 1.0, add warm-up"))
    elif len(train) >= 6:
        head, tail = sum(train[:3]) / 3, sum(train[-3:]) / 3
        if tail > head * 1.5:
            findings.append(Finding(problem="diverging", evidence=f"loss rose from {head:.3f} to {tail:.3f}",
                                    fix="lower learning_rate 3-10x and add warmup_ratio 0.03-0.1"))
        elif tail > head * 0.95:
            findings.append(Finding(problem="loss not falling", evidence=f"loss {head:.3f} -> {tail:.3f}",
                                    fix="raise learning_rate (LoRA usually wants 1e-4-3e-4), check that the "
                                        "completions/assistant turns carry the signal (validate_dataset token "
                                        "stats), or raise lora.r"))
    if len(evals) >= 3 and evals[-1] > min(evals) * 1.1 and len(train) >= 2 and train[-1] < train[0]:
        findings.append(Finding(problem="overfitting", evidence=f"eval loss rose from {min(evals):.3f} to "
                                f"{evals[-1]:.3f} while training loss fell",
                                fix="fewer epochs, more or more varied data, higher lora.dropout, lower rank"))
    if job.state == "interrupted":
        findings.append(Finding(problem="worker stopped before finishing",
                                evidence=error.message if error else "interrupted",
                                fix="resume_job continues from the last checkpoint; if it was OOM-killed "
                                    "(SIGKILL), lower the memory settings first"))
    if error and error.code == "model_unavailable":
        findings.append(Finding(problem="base model unavailable", evidence=error.message,
                                fix="download the model into the Hugging Face cache or pass a local folder"))
    if error and error.param and error.code not in ("out_of_memory", "model_unavailable"):
        findings.append(Finding(problem=f"bad argument {error.param}", evidence=error.message,
                                fix=f"change {error.param} as the message says and start a new job"))
    return findings
