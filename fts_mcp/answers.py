"""What the MCP tools answer: compact views of the core's records, each with the next calls an agent would make.

Every tool schema and every answer is in the agent's context, so these views keep what an agent acts on and
leave the rest to resources (`fts://jobs/{id}` has the whole record, `fts://jobs/{id}/log` the log). Schemas
stay honest: open-ended parts (progress figures, artifact paths, a spec) are typed as objects, and their keys
are listed in README's tool section.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

from pydantic import BaseModel, WithJsonSchema

from fts_mcp.adapters.store import StoreEntry
from fts_mcp.edge.service import Deployment
from fts_mcp.jobs.records import Job
from fts_mcp.jobs.states import JobState

# A JSON object with any keys; `additionalProperties: true` is JSON Schema's default, so the schema leaves it out
# (every tool's schema is in the agent's context on every turn).
AnyObject = Annotated[dict[str, Any], WithJsonSchema({"type": "object"})]
# `{"type": [t, "null"]}` says what pydantic's `{"anyOf": [{"type": t}, {"type": "null"}]}` says, in fewer characters.
NullableStr = Annotated[str | None, WithJsonSchema({"type": ["string", "null"]})]
NullableFloat = Annotated[float | None, WithJsonSchema({"type": ["number", "null"]})]
NullableObject = Annotated[dict[str, Any] | None, WithJsonSchema({"type": ["object", "null"]})]
Steps = list[AnyObject]  # NextStep: {tool, arguments, why}


class NextStep(BaseModel):
    tool: str
    arguments: dict[str, Any]
    why: str


class JobView(BaseModel):
    job_id: str
    kind: str
    state: str  # validating, queued, running, succeeded, failed, cancelled or interrupted (jobs.states)
    progress: AnyObject  # step, total_steps, loss, ...; `waiting` while queued: what it waits behind
    error: NullableObject = None  # {code, message, param}
    artifacts: AnyObject
    resumable: bool
    spec: AnyObject
    process: AnyObject  # pid, slot, attempts, exit_code, cancel_requested
    times: AnyObject  # created, started, updated, finished (ISO 8601, UTC)
    log_tail: list[str] = []
    next: Steps = []
    note: NullableStr = None  # e.g. that a long-poll was capped


class JobRow(BaseModel):
    job_id: str
    kind: str
    state: str
    name: str | None = None
    step: int | None = None
    loss: float | None = None
    error: str | None = None
    created_at: str


class JobRows(BaseModel):
    jobs: list[JobRow]
    total: int


# ---- what to do next -------------------------------------------------------------------------------------------

def _step(tool: str, why: str, **arguments: Any) -> dict[str, Any]:
    return NextStep(tool=tool, arguments=arguments, why=why).model_dump()


def next_steps(job: Job) -> list[dict[str, Any]]:
    """The one or two calls an agent would make next, given where the job is."""
    jid = job.job_id
    if not job.state.terminal:
        return [_step("job_status", "wait for it: returns as soon as the state changes", job_id=jid, wait_seconds=30)]
    if job.state == JobState.SUCCEEDED and job.kind == "train":
        held_out = job.spec.get("training", {}).get("eval_fraction")
        return [_step("evaluate_adapter", "check it beats the base on held-out data before shipping", adapter=jid,
                      **({} if held_out else {"dataset": "<held-out JSONL>"})),
                _step("deploy_adapter", "publish it to the adapter store for the edge runtime", adapter=jid,
                      name=str(job.spec.get("output_name", "adapter")).lower()[:64])]
    if job.state == JobState.SUCCEEDED and job.kind == "eval":
        return eval_next(job)
    if job.state == JobState.SUCCEEDED and job.kind == "merge" and job.artifacts.output_dir:
        out = job.artifacts.output_dir
        if job.spec.get("output") == "adapter":
            return [_step("evaluate_adapter", "check the combined adapter on held-out data", adapter=out,
                          dataset="<held-out JSONL>"),
                    _step("deploy_adapter", "publish the combined adapter", adapter=out, name="<name>")]
        return [_step("evaluate_adapter", "compare the merged model with its base", merged_model=out,
                      dataset="<held-out JSONL>"),
                _step("generate", "try the merged model", model="base", base_model=out, prompt="...")]
    if job.resumable:
        return [_step("resume_job", "continue from its last checkpoint", job_id=jid)]
    if job.state == JobState.FAILED and job.error is not None and job.error.code == "out_of_memory":
        return [_step("estimate_resources", "find a configuration that fits this device",
                      base_model=job.spec.get("base_model"))]
    if job.state == JobState.FAILED:
        return [_step("job_status", "read the log tail for the cause", job_id=jid, log_lines=40)]
    if job.state == JobState.CANCELLED and job.kind == "train":
        return [_step("start_qlora_job", "it stopped before its first checkpoint: start it again",
                      base_model=job.spec.get("base_model"), dataset=job.spec.get("dataset"))]
    return []


def eval_next(job: Job) -> list[dict[str, Any]]:
    """After an evaluation: what `better` says, and nothing else decides it; forgetting is a note beside it."""
    evaluation = job.artifacts.evaluation or {}
    better, forgot = bool(evaluation.get("better")), bool(evaluation.get("forgetting"))
    if job.spec.get("merged_dir"):
        return [_step("generate", "try the merged model" if better else "see how it answers", model="base",
                      base_model=job.spec["merged_dir"], prompt="...")]
    ref = job.spec.get("adapter_ref") or job.spec.get("adapter_dir")
    if better:
        note = "; note: it forgot some general text, see advice" if forgot else \
            "; note: see advice" if evaluation.get("advice") else ""
        return [_step("deploy_adapter", f"it beats the base: ship it{note}", adapter=ref,
                      name=Path(str(ref)).name.lower().split("@")[0].split(":")[0][:64] or "adapter"),
                _step("merge_adapter", "or fold it into the base for serving without adapters", adapter=ref)]
    lost = [p["name"] for p in evaluation.get("parts", []) if not p.get("kept")]
    steps = [_step("start_qlora_job", "not better yet: more or cleaner data or more steps" +
                   ("; it also forgot general text: a lower learning rate or fewer epochs" if forgot else ""),
                   base_model=job.spec.get("base_model"), dataset="<training data>")]
    if lost:
        steps.insert(0, _step("merge_adapter", f"the combination lost {', '.join(lost)} on its own data: try other "
                              "weights or another combination", adapters="<the same adapters, reweighted>",
                              output="adapter"))
    return steps


def deploy_next(deployment: Deployment) -> list[dict[str, Any]]:
    ask = {"messages": [{"role": "user", "content": "..."}]} if deployment.chat else {"prompt": "..."}
    if deployment.loaded:
        steps = [_step("generate", "ask the runtime with this adapter", model=deployment.model, **ask,
                       runtime_url="local" if deployment.runtime_job else deployment.runtime)]
        if deployment.runtime_job:
            steps.append(_step("cancel_job", "when done: stop the managed runtime (it keeps serving after this "
                               "server exits)", job_id=deployment.runtime_job))
        return steps
    return [_step("generate", "try it with a one-shot job, or load it into a runtime: deploy_adapter(runtime_url="
                  "'local')", model=deployment.model, **ask)]


# ---- views -----------------------------------------------------------------------------------------------------

SPEC_KEYS = {
    "train": ("base_model", "dataset", "method", "output_name", "quantization", "resumed_from_job"),
    "merge": ("base_model", "output_name", "dtype", "combination", "output"),
    "generate": ("model", "base_model", "max_tokens"),
    "eval": ("base_model", "adapter_dir", "merged_dir", "dataset", "answer_format", "regex"),
    "runtime": ("base_model", "url"),
}


def spec_summary(job: Job) -> dict[str, Any]:
    summary = {k: job.spec[k] for k in SPEC_KEYS.get(job.kind, ()) if job.spec.get(k) is not None}
    if job.kind == "train":
        training, lora = job.spec.get("training", {}), job.spec.get("lora", {})
        summary["lora_r"] = lora.get("r")
        summary["max_steps" if training.get("max_steps") else "epochs"] = training.get("max_steps") or \
            training.get("epochs")
        summary["batch_size"] = training.get("batch_size")
        if training.get("workers", 1) > 1:
            summary["workers"] = training["workers"]
        if job.spec.get("choices"):
            summary["choices"] = job.spec["choices"]  # what 'auto' and the unset settings became, and why
    if job.kind == "merge":
        summary["adapters"] = len(job.spec.get("adapters", []))
    return summary


def _artifacts(job: Job) -> dict[str, Any]:
    """Paths and results, without the per-file list (sizes and sha256 are in fts://jobs/{id})."""
    out = job.artifacts.model_dump(mode="json", exclude={"files"}, exclude_none=True)
    if job.artifacts.files:
        out["files"] = len(job.artifacts.files)
    return out


# shown once a preference-tuning (dpo) job has them; other jobs never do, and an agent's context is a budget
PREFERENCE_FIGURES = {"reward_margin", "preference_accuracy", "eval_reward_margin", "eval_preference_accuracy"}


def job_view(job: Job, *, detail: bool = False) -> JobView:
    progress = {k: (round(v, 4) if isinstance(v, float) else v) for k, v in job.progress.model_dump().items()
                if v is not None or k not in PREFERENCE_FIGURES}
    if job.waiting:
        progress["waiting"] = job.waiting  # what a queued job waits behind, and how to free the slot
    return JobView(job_id=job.job_id, kind=job.kind, state=job.state, progress=progress,
                   error=job.error.model_dump() if job.error else None,
                   artifacts=_artifacts(job), resumable=job.resumable, spec=job.spec if detail else spec_summary(job),
                   process={"pid": job.pid, "slot": job.slot, "attempts": job.attempts, "exit_code": job.exit_code,
                            "cancel_requested": job.cancel_requested,
                            **({"ray_job_id": job.ray_job_id} if job.ray_job_id else {})},
                   times={"created": job.created_at, "started": job.started_at, "updated": job.updated_at,
                          "finished": job.finished_at},
                   log_tail=job.log_tail, next=next_steps(job))


def job_row(job: Job) -> JobRow:
    return JobRow(job_id=job.job_id, kind=job.kind, state=job.state, name=job.spec.get("output_name"),
                  step=job.progress.step or None,
                  loss=round(job.progress.loss, 4) if job.progress.loss is not None else None,
                  error=f"{job.error.code}: {job.error.message[:120]}" if job.error else None,
                  created_at=job.created_at)


class DeploymentView(BaseModel):
    model: str
    name: str
    version: str
    created: bool
    uri: str
    sha256: str
    bytes: int
    base_model: NullableStr
    trained_on: NullableStr = None  # the base it was trained on, which runtimes should serve it on
    chat: bool  # trained on chats: ask with messages (/v1/chat/completions)
    loaded: bool
    swap_ms: NullableFloat = None
    runtime: NullableStr = None
    runtime_job: NullableStr = None  # the managed runtime's job: cancel_job stops it
    curl: str
    gguf: NullableObject = None  # the GGUF LoRA beside it: path, sha256, Modelfile, llama-server line
    next: Steps = []


def deployment_view(d: Deployment) -> DeploymentView:
    return DeploymentView(model=d.model, name=d.name, version=d.version, created=d.created, uri=d.uri,
                          sha256=d.sha256, bytes=d.bytes, base_model=d.manifest.base_model, loaded=d.loaded,
                          trained_on=d.manifest.training_base.describe() if d.manifest.training_base else None,
                          chat=d.chat, swap_ms=d.swap_ms, runtime=d.runtime, runtime_job=d.runtime_job,
                          curl=d.curl, gguf=d.gguf.model_dump() if d.gguf else None, next=deploy_next(d))


class AdapterRow(BaseModel):
    name: str
    versions: list[str]
    aliases: dict[str, str]
    base_model: str | None
    r: int | None
    bytes: int | None


class AdapterRows(BaseModel):
    adapters: list[AdapterRow]


def adapter_rows(entries: list[StoreEntry]) -> AdapterRows:
    return AdapterRows(adapters=[AdapterRow(name=e.name, versions=e.versions, aliases=e.aliases,
                                            base_model=e.latest.base_model if e.latest else None,
                                            r=e.latest.r if e.latest else None,
                                            bytes=e.latest.bytes if e.latest else None) for e in entries])




class EstimateView(BaseModel):
    """`estimate_resources`' answer: the planning core's ResourceEstimate, with its nested parts typed as
    objects (their keys: README's tool table)."""

    model: str
    parameters: int
    architecture: AnyObject
    shape_source: str
    gpu: NullableStr
    gpu_memory_gb: NullableFloat
    settings: AnyObject
    estimates: list[AnyObject]
    suggestions: list[AnyObject]
    recommended_method: NullableStr
    notes: list[str]


class AdviceView(BaseModel):
    """`recommend_ft_vs_rag`'s answer (planning.advice.Advice, nested parts typed as objects)."""

    recommendation: str
    confidence: float
    summary: str
    criteria: list[dict[str, Any]]
    conflicts: list[str]
    data: dict[str, Any]
    next_steps: list[str]


class ReportView(BaseModel):
    """`validate_dataset`'s answer (datasets.DatasetReport, token statistics typed as an object)."""

    ok: bool
    path: str
    format: str | None
    examples: int
    errors: list[dict[str, Any]]
    error_count: int
    warnings: list[str]
    token_stats: NullableObject = None
    next: Steps = []


def report_view(report: BaseModel, base_model: str | None) -> ReportView:
    view = ReportView.model_validate(report.model_dump(mode="json"))
    if view.ok and base_model:
        view.next = [_step("start_qlora_job", "train on it", base_model=base_model, dataset=view.path,
                           **({"method": "dpo"} if view.format == "preference" else {}))]
    elif view.ok:
        view.next = [_step("validate_dataset", "count tokens and check the chat template of the model you will "
                           "train", path=view.path, base_model="<model>")]
    return view


def plain_view(view: type[BaseModel], model: BaseModel) -> BaseModel:
    return view.model_validate(model.model_dump(mode="json"))


class ModelRows(BaseModel):
    models: list[dict[str, Any]]  # ModelInfo: {base_model, source, architecture, parameters, chat_template, bytes}
    roots: list[str]
