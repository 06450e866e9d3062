"""The MCP layer: thin tools, resources and prompts over the typed core (`fts_mcp.core.Core`).

Each tool validates its arguments through its signature (the signature is the schema), calls the core and
returns a pydantic model (structured output). Domain errors become tool errors the agent can act on.
This module must stay light to import: no torch, transformers or huggingface-hub here.
"""

import functools
import inspect
import json
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Annotated, Any, Literal

import anyio
from mcp.server.apps import Apps
from mcp.server.mcpserver import Context, MCPServer
from mcp.server.mcpserver.exceptions import ResourceNotFoundError, ToolError
from mcp.server.mcpserver.prompts.base import UserMessage
from mcp_types import CallToolResult, TextContent, ToolAnnotations
from pydantic import BaseModel, Field, ValidationError

from fts_mcp import __version__
from fts_mcp.adapters.spec import Combination, WeightedAdapter
from fts_mcp.answers import (
    AdapterRows,
    AdviceView,
    DeploymentView,
    EstimateView,
    JobRows,
    JobView,
    ModelRows,
    ReportView,
    adapter_rows,
    deployment_view,
    job_row,
    job_view,
    plain_view,
    report_view,
)
from fts_mcp.arguments import closest, describe, parse
from fts_mcp.config import Settings
from fts_mcp.core import Core, Unavailable, open_core
from fts_mcp.docs import DOC_TOPICS, read_doc
from fts_mcp.edge.service import Generation
from fts_mcp.errors import FtsError
from fts_mcp.jobs.records import Job
from fts_mcp.jobs.states import JobState
from fts_mcp.jobs.watch import watch
from fts_mcp.models import catalog
from fts_mcp.models.dtypes import Dtype
from fts_mcp.planning.advice import Criteria
from fts_mcp.planning.diagnose import diagnose
from fts_mcp.planning.estimate import RunSettings
from fts_mcp.planning.service import Planning
from fts_mcp.training.spec import LoraSpec, TrainingSpec
from fts_mcp.ui import VIEW_META, VIEW_URI, page

log = logging.getLogger("fts_mcp.server")

INSTRUCTIONS = """\
fts-mcp fine-tunes LoRA / QLoRA adapters on this host's GPUs (or CPU) as background jobs.
Plan: recommend_ft_vs_rag, then estimate_resources; list_models shows the base models usable here; reference
documents are at fts://docs. Then validate_dataset -> start_qlora_job -> job_status (wait_seconds long-polls)
-> evaluate_adapter (is it better than the base on held-out data?) -> merge_adapter and/or deploy_adapter ->
generate. Every job answer's `next` says what to call next. cancel_job stops a job with a checkpoint;
resume_job continues it. Jobs outlive this server. Paths must lie inside the configured roots."""

TICK_SECONDS = 1.0
SAFE_WAIT_SECONDS = 45.0
HEARTBEAT_SECONDS = 10.0  # TypeScript clients time a request out at 60 s unless progress resets their timer
MAX_WAIT_SECONDS = 300.0
READ_ONLY = ToolAnnotations(read_only_hint=True, destructive_hint=False, idempotent_hint=True, open_world_hint=False)
# Starts work; asked twice, starts it twice.
LAUNCHES = ToolAnnotations(read_only_hint=False, destructive_hint=False, idempotent_hint=False, open_world_hint=False)
# Starts work, but the same request again returns the first result (merge and deploy are keyed by their inputs).
LAUNCHES_ONCE = ToolAnnotations(read_only_hint=False, destructive_hint=False, idempotent_hint=True,
                                open_world_hint=False)
# Publishes (the same bytes again return the first version) and may load it into a runtime at a URL.
PUBLISHES = ToolAnnotations(read_only_hint=False, destructive_hint=False, idempotent_hint=True, open_world_hint=True)
STOPS = ToolAnnotations(read_only_hint=False, destructive_hint=True, idempotent_hint=True, open_world_hint=False)
# May talk to a runtime at a URL the agent gives.
REACHES_OUT = ToolAnnotations(read_only_hint=False, destructive_hint=False, idempotent_hint=False,
                              open_world_hint=True)

JobId = Annotated[str, Field(description="e.g. job-0123456789ab (list_jobs shows them)")]


async def _monitor(core: Core) -> None:
    """Every server watches every job: start queued ones on free slots, notice dead workers."""
    last_problem = None
    while True:
        try:
            await anyio.to_thread.run_sync(core.jobs.runner.tick)
            last_problem = None
        except FtsError as exc:  # e.g. the job database became unreadable: say so once, not every second
            if str(exc) != last_problem:
                log.error("%s", exc)
                last_problem = str(exc)
        except Exception:  # process boundary: the loop must outlive a transient store error
            log.exception("job monitor tick failed")
        await anyio.sleep(TICK_SECONDS)


@asynccontextmanager
async def lifespan(_server: MCPServer) -> AsyncIterator[Core | Unavailable]:
    """One Core per server process. If it cannot start (an unreadable job database), the server still answers:
    every tool call returns the reason and what to do."""
    core = open_core()
    if isinstance(core, Unavailable):
        log.error("%s", core.error)
        yield core
        return
    try:
        catalog.stage_demo_model(core.settings.home)  # so list_models can offer a model that trains anywhere
    except OSError as exc:
        log.warning("could not stage the demo model under %s: %s", core.settings.home, exc)
    async with anyio.create_task_group() as tg:
        tg.start_soon(_monitor, core)
        try:
            yield core
        finally:
            tg.cancel_scope.cancel()
    core.close()


def compact_schema(node: Any, drop: tuple[str, ...] = ("title",), *, answer: bool = False) -> Any:
    """A JSON schema without the `title` pydantic gives every property and model (the name already says it) and,
    for answers, without descriptions (README's tool section says what each field means) or defaults (an answer
    always carries its fields): every tool's schema is in the agent's context on every turn."""
    if isinstance(node, dict):
        return {k: compact_schema(v, drop, answer=answer) for k, v in node.items()
                if not (k in drop and isinstance(v, str))
                and not (answer and k == "default" and not isinstance(v, dict))}
    if isinstance(node, list):
        return [compact_schema(v, drop, answer=answer) for v in node]
    return node


def optional_not_null(node: Any) -> Any:
    """An optional argument is shown as its type, not `anyOf [type, null]` with `default: null`: leaving it out is
    how to say "none" (explicit nulls are still accepted)."""
    if isinstance(node, dict):
        options = node.get("anyOf")
        if isinstance(options, list) and {"type": "null"} in options and node.get("default", 0) is None:
            rest = [o for o in options if o != {"type": "null"}]
            node = {**{k: v for k, v in node.items() if k not in ("anyOf", "default")},
                    **(rest[0] if len(rest) == 1 else {"anyOf": rest})}
        return {k: optional_not_null(v) for k, v in node.items()}
    if isinstance(node, list):
        return [optional_not_null(v) for v in node]
    return node


# Object arguments whose keys are checked by a model: an unknown top-level argument may be one of their keys.
NESTED = {"start_qlora_job": {"training": TrainingSpec, "lora": LoraSpec}}


class FtsServer(MCPServer):
    """MCPServer with compact tool schemas and argument errors an agent fixes in one try."""

    async def list_tools(self):
        tools = await super().list_tools()
        for tool in tools:
            tool.description = " ".join((tool.description or "").split())  # a docstring's indentation costs tokens
            tool.input_schema = optional_not_null(compact_schema(tool.input_schema))
            if tool.output_schema is not None:
                tool.output_schema = compact_schema(tool.output_schema, ("title", "description"), answer=True)
        return tools

    @staticmethod
    def _hint(given: str, known: list[str], nested: list[str]) -> str:
        close = closest(given, known)
        if close is None and (inner := closest(given, [n.split(".")[1] for n in nested])) is not None:
            close = next(n for n in nested if n.endswith(f".{inner}"))
        return f"did you mean {close}?" if close else f"arguments: {', '.join(known)}"

    async def call_tool(self, name: str, arguments: dict[str, Any], context=None):
        tool = self._tool_manager.get_tool(name)
        if tool is not None and isinstance(arguments, dict):
            known = list(tool.parameters.get("properties", {}))
            nested = [f"{outer}.{field}" for outer, model in NESTED.get(name, {}).items()
                      for field in model.model_fields]
            unknown = [f"{given}: not a known argument; {self._hint(given, known, nested)}"
                       for given in arguments if given not in known]
            if unknown:  # the SDK would drop them silently: name every one, each with the closest argument
                raise ToolError(f"Error executing tool {name}: {'; '.join(unknown)}")
        try:
            return await super().call_tool(name, arguments, context)
        except ToolError as exc:
            if isinstance(exc.__cause__, ValidationError):  # the SDK's own argument check: reword it
                path, message = describe(exc.__cause__)
                raise ToolError(f"Error executing tool {name}: {path}: {message}") from None
            raise


# MCP Apps (`io.modelcontextprotocol/ui`, advertised in the server's capabilities.extensions): hosts that render apps
# show the job view for the tools whose definitions carry VIEW_META; the others read the same answers as before.
apps = Apps()
apps.add_html_resource(VIEW_URI, page(), name="job-view", title="Fine-tuning job",
                       description="A job live: state, loss curve, plan, errors with their fix; evaluations side by "
                                   "side; cancel, resume, evaluate, merge and deploy buttons", prefers_border=True)


async def handshake_extensions(ctx, call_next):
    """The 2025-11-25 schema has no `capabilities.extensions`, so the SDK leaves it out of `initialize` for clients
    on that wire; MCP Apps hosts on it read it there as on 2026-07-28 (SEP-1724, as ext-apps uses it): put it back."""
    result = await call_next(ctx)
    if ctx.method == "initialize" and isinstance(result, dict) and isinstance(result.get("capabilities"), dict):
        result["capabilities"].setdefault("extensions", {apps.identifier: apps.settings()})
    return result


mcp = FtsServer("fts-mcp", version=__version__, instructions=INSTRUCTIONS, lifespan=lifespan, log_level="WARNING",
                extensions=[apps], middleware=[handshake_extensions])


def _core(ctx: Context) -> Core:
    core = ctx.request_context.lifespan_context
    if isinstance(core, Unavailable):
        raise core.error  # why the server could not open its job store (agent_errors makes it a tool error)
    return core


def _settings(ctx: Context) -> Settings:
    """The server's settings: what planning and the model list need, even without a job store."""
    core = ctx.request_context.lifespan_context
    if core.settings is None:
        raise core.error
    return core.settings


def _planning(ctx: Context) -> Planning:
    """Planning needs no job store: it answers even when the store cannot be opened."""
    core = ctx.request_context.lifespan_context
    if core.planning is None:
        raise core.error
    return core.planning


def agent_errors(fn):
    """Turn domain errors (and core models refusing a value) into tool errors whose text names the argument and
    what would be accepted."""
    if inspect.iscoroutinefunction(fn):
        @functools.wraps(fn)
        async def async_wrapper(*args, **kwargs):
            try:
                return await fn(*args, **kwargs)
            except FtsError as exc:
                raise ToolError(str(exc)) from exc
            except ValidationError as exc:
                raise ToolError(": ".join(describe(exc))) from exc
        return async_wrapper

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except FtsError as exc:
            raise ToolError(str(exc)) from exc
        except ValidationError as exc:
            raise ToolError(": ".join(describe(exc))) from exc
    return wrapper


def answer(model: BaseModel, note: str | None = None) -> CallToolResult:
    """Structured content plus a compact text copy of it (one line of JSON, no nulls): the schema stays the
    model's, the agent's context pays once for the figures rather than twice for pretty-printed ones."""
    data = model.model_dump(mode="json")
    text = model.model_dump_json(exclude_none=True)
    return CallToolResult(content=[TextContent(type="text", text=f"{note}\n{text}" if note else text)],
                          structured_content=data)


SEE_SETTINGS = "fts://docs/settings"


# ---- tools ---------------------------------------------------------------------------------------------------

@mcp.tool(title="Validate a training dataset", annotations=READ_ONLY)
@agent_errors
def validate_dataset(
    path: Annotated[str, Field(description="JSONL file inside the roots")],
    ctx: Context,
    base_model: Annotated[str | None, Field(description="adds token statistics and checks its chat template")]
    = None,
    max_seq_len: Annotated[int, Field(ge=16, le=262_144)] = 2048,
) -> ReportView:
    """Check a JSONL training file (chat, prompt/completion, text, or prompt/chosen/rejected pairs) before training,
    and after every edit: errors by line, warnings, and with base_model token statistics."""
    return answer(report_view(_core(ctx).training.validate_dataset(path, base_model, max_seq_len), base_model))


@mcp.tool(title="Start a QLoRA / LoRA fine-tuning job", annotations=LAUNCHES, meta=VIEW_META)
@agent_errors
def start_qlora_job(
    base_model: Annotated[str, Field(description="model folder or .gguf file (list_models), or a cached hub id")],
    dataset: Annotated[str, Field(description="JSONL file in the roots")],
    ctx: Context,
    output_name: Annotated[str | None, Field(description="adapter name")] = None,
    lora: Annotated[dict[str, Any] | None, Field(description=f"r, alpha, dropout, target_modules ({SEE_SETTINGS})")]
    = None,
    quantization: Annotated[Literal["auto", "nf4", "none"], Field(
        description="auto: nf4 on a GPU or if 16-bit won't fit, else none; nf4: QLoRA; none: 16-bit LoRA")
    ] = "auto",
    training: Annotated[dict[str, Any] | None, Field(description=f"e.g. max_steps, learning_rate, micro_batch_size"
                                                                 f" ({SEE_SETTINGS})")] = None,
    resume_from: Annotated[str | None, Field(description="a stopped or finished training job to continue from "
                                                         "(dpo: or a finished sft job)")] = None,
    method: Annotated[Literal["sft", "dpo"], Field(description="dpo: preference pairs {prompt, chosen, rejected} "
                                                               "(fts://docs/preference)")] = "sft",
) -> JobView:
    """Launch a LoRA / QLoRA fine-tune as a background job; returns at once: running when a device slot is
    free, else queued. Follow it with job_status; artifacts.adapter_dir then holds the adapter."""
    core = _core(ctx)
    job = core.training.start(base_model, dataset, output_name=output_name,
                              lora=parse(LoraSpec, lora, param="lora", see=SEE_SETTINGS),
                              quantization=quantization,
                              training=parse(TrainingSpec, training, param="training", see=SEE_SETTINGS),
                              resume_from=resume_from, method=method)
    return answer(job_view(job))


def _has_progress_token(ctx: Context) -> bool:
    return bool((ctx.request_context.meta or {}).get("progress_token") is not None)


@mcp.tool(title="Job status (long-poll)", annotations=READ_ONLY, meta=VIEW_META)
@agent_errors
async def job_status(
    job_id: JobId,
    ctx: Context,
    wait_seconds: Annotated[float, Field(ge=0, le=MAX_WAIT_SECONDS, description=f"wait for a state change; capped "
                                                                               f"at {SAFE_WAIT_SECONDS:g} s unless "
                                                                               "you sent a progress token")] = 0,
    log_lines: Annotated[int, Field(ge=0, le=200, description="last lines of the worker log")] = 0,
    detail: Annotated[bool, Field(description="the full job spec instead of its summary")] = False,
) -> JobView:
    """A job's state, progress (step, loss, tokens/s, ETA), error, artifacts and next steps; with wait_seconds
    it returns as soon as the state changes."""
    core = _core(ctx)
    wait, note = wait_seconds, None
    if wait > SAFE_WAIT_SECONDS and not _has_progress_token(ctx):
        wait = SAFE_WAIT_SECONDS
        note = (f"waited at most {SAFE_WAIT_SECONDS:g} s (not {wait_seconds:g}): without a progress token many "
                "clients time out at 60 s; call job_status again to keep waiting")
    last = {"step": None, "at": 0.0, "value": -1.0}

    async def report(job: Job) -> None:
        """A notification on every new step, and at least every HEARTBEAT_SECONDS meanwhile (loading, queued, an
        eval): clients that reset their timeout on progress must hear something. The value always rises."""
        p, now = job.progress, anyio.current_time()
        if p.step == last["step"] and now - last["at"] < HEARTBEAT_SECONDS:
            return
        value = max(float(p.step), last["value"] + 0.001)
        last.update(step=p.step, at=now, value=value)
        loss = f", loss {p.loss:.4f}" if p.loss is not None else ""
        phase = p.phase or job.state
        await ctx.report_progress(value, p.total_steps, f"{phase} step {p.step}/{p.total_steps or '?'}{loss}")

    job = await watch(lambda: core.jobs.get(job_id, log_lines=log_lines), wait_seconds=wait, on_poll=report)
    view = job_view(job, detail=detail)
    view.note = note
    return answer(view)


@mcp.tool(title="List jobs", annotations=READ_ONLY)
@agent_errors
def list_jobs(
    ctx: Context,
    state: Annotated[JobState | None, Field(description="only jobs in this state")] = None,
    limit: Annotated[int, Field(ge=1, le=1000)] = 20,
) -> JobRows:
    """Jobs on this host, newest first; job_status for one job's details."""
    listing = _core(ctx).jobs.list(state, limit)
    return answer(JobRows(jobs=[job_row(j) for j in listing.jobs], total=listing.total))


@mcp.tool(title="Cancel a job", annotations=STOPS)
@agent_errors
def cancel_job(job_id: JobId, ctx: Context) -> JobView:
    """Cancel a job; a running one saves a checkpoint first. An ended job is returned unchanged."""
    return answer(job_view(_core(ctx).jobs.cancel(job_id)))


@mcp.tool(title="Resume a stopped job", annotations=LAUNCHES)
@agent_errors
def resume_job(job_id: JobId, ctx: Context) -> JobView:
    """Continue a job with resumable=true (interrupted, or cancelled with a checkpoint) from its checkpoint."""
    return answer(job_view(_core(ctx).jobs.resume(job_id)))


@mcp.tool(title="Merge adapters into a model", annotations=LAUNCHES_ONCE)
@agent_errors
def merge_adapter(
    ctx: Context,
    adapter: Annotated[str | None, Field(description="training job id, store reference or adapter folder")] = None,
    adapters: Annotated[list[dict[str, Any]] | None, Field(description="to combine: [{adapter, weight}]")] = None,
    base_model: Annotated[str | None, Field(description="default: the adapter's own base")] = None,
    output_name: str | None = None,
    dtype: Dtype = "bfloat16",
    verify: Annotated[bool, Field(description="refuse logits drifting past the dtype's tolerance")] = True,
    combination: Annotated[Combination, Field(description="cat/svd: exact sum of deltas, any ranks; others need "
                                                          "equal ranks")] = "cat",
    density: Annotated[float | None, Field(gt=0, le=1, description="kept share (ties, dare_*, magnitude_prune)")]
    = None,
    output: Annotated[Literal["model", "adapter"], Field(description="merged model, or combined adapter")] = "model",
    base_weights: Annotated[Literal["trained", "original"], Field(
        description="trained: a QLoRA adapter merges into the NF4 weights it trained on; original: 16-bit")
    ] = "trained",
) -> JobView:
    """Merge an adapter into its base (QLoRA: the NF4 weights it trained on) as a background job, verified against
    base + adapter; or combine several adapters. Asked again: the first job."""
    entries = None if adapters is None else [parse(WeightedAdapter, entry, param=f"adapters[{i}]")
                                             for i, entry in enumerate(adapters)]
    job = _core(ctx).merging.merge(adapter, adapters=entries, base_model=base_model, output_name=output_name,
                                   dtype=dtype, verify=verify, combination=combination, density=density,
                                   output=output, base_weights=base_weights)
    return answer(job_view(job))


@mcp.tool(title="List base models", annotations=READ_ONLY)
@agent_errors
def list_models(ctx: Context) -> ModelRows:
    """Base models usable here (pass base_model as given): folders and .gguf files in the roots, packaged models,
    the local Hugging Face cache, the demo model."""
    settings = _settings(ctx)  # no job store needed
    return answer(ModelRows(models=[m.model_dump() for m in catalog.list_models(settings)],
                            roots=[str(r) for r in settings.roots]))


@mcp.tool(title="Evaluate an adapter against its base", annotations=LAUNCHES, meta=VIEW_META)
@agent_errors
def evaluate_adapter(
    ctx: Context,
    adapter: Annotated[str | None, Field(description="training job id, store reference or adapter folder")] = None,
    merged_model: Annotated[str | None, Field(description="a merged model folder instead")] = None,
    dataset: Annotated[str | None, Field(description="held-out JSONL; default the job's eval split")] = None,
    base_model: str | None = None,
    answer_format: Literal["json"] | None = None,
    regex: Annotated[str | None, Field(description="answers must fully match it")] = None,
    max_examples: Annotated[int, Field(ge=1, le=10_000)] = 50,
) -> JobView:
    """Before shipping: base vs adapter on held-out data (background job): loss, exact match, format check,
    forgetting probe, sample answers; on preference pairs, how often each prefers the chosen answer."""
    job = _core(ctx).evaluating.evaluate(adapter, merged_model=merged_model, dataset=dataset, base_model=base_model,
                                         answer_format=answer_format, regex=regex, max_examples=max_examples)
    return answer(job_view(job))


RuntimeUrl = Annotated[str | None, Field(description="runtime URL, or 'local' (managed)")]


@mcp.tool(title="Deploy an adapter to the edge store", annotations=PUBLISHES)
@agent_errors
def deploy_adapter(
    adapter: Annotated[str, Field(description="training job id or adapter folder")],
    name: Annotated[str, Field(description="store name: lowercase letters, digits, '.', '_', '-'")],
    ctx: Context,
    version: Annotated[str | None, Field(description="v1, v2...; default the next (same bytes: theirs)")] = None,
    alias: Annotated[str | None, Field(description="alias to move here, e.g. prod")] = None,
    runtime_url: RuntimeUrl = None,
    dtype: Dtype = "bfloat16",
    gguf: Annotated[Literal["f16", "q8_0", "bf16", "f32"] | None, Field(
        description="also publish it as a GGUF LoRA of this type, for llama.cpp and Ollama")] = None,
) -> DeploymentView:
    """Publish an adapter as an immutable version in the adapter store (optionally moving an alias and loading it
    into a runtime); returns the `model` string for requests. With gguf: the Ollama Modelfile and llama-server
    line too."""
    return answer(deployment_view(_core(ctx).edge.deploy(adapter, name, version=version, alias=alias,
                                                          runtime_url=runtime_url, dtype=dtype, gguf=gguf)))


@mcp.tool(title="List adapters in the edge store", annotations=READ_ONLY)
@agent_errors
def list_adapters(ctx: Context, name: Annotated[str | None, Field(description="only this adapter")] = None
                  ) -> AdapterRows:
    """The adapter store: versions, aliases, base model and rank of each adapter."""
    return answer(adapter_rows(_core(ctx).edge.list_adapters(name)))


@mcp.tool(title="Generate with an adapter", annotations=REACHES_OUT)
@agent_errors
async def generate(
    model: Annotated[str, Field(description="store reference (name, name@v2, name:prod), training job id, adapter "
                                            "folder, or 'base'")],
    ctx: Context,
    prompt: str | None = None,
    messages: Annotated[list[dict[str, str]] | None, Field(description="a chat: [{role, content}]")] = None,
    max_tokens: Annotated[int, Field(ge=1, le=8192)] = 64,
    temperature: Annotated[float, Field(ge=0, le=2)] = 0.0,
    runtime_url: RuntimeUrl = None,
    base_model: Annotated[str | None, Field(description="without a runtime: the base (default: the adapter's)")]
    = None,
    timeout_seconds: Annotated[float, Field(gt=0, le=3600)] = 300,
) -> Generation:
    """Try an adapter: through runtime_url, or a managed runtime already serving its base; else a one-shot job
    (slow: loads the model)."""
    return answer(await _core(ctx).edge.generate(model, prompt=prompt, messages=messages, max_tokens=max_tokens,
                                                 temperature=temperature, runtime_url=runtime_url,
                                                 base_model=base_model, timeout=timeout_seconds))


# ---- resources -----------------------------------------------------------------------------------------------

def _resource(read):
    try:
        return read()
    except FtsError as exc:
        raise ResourceNotFoundError(str(exc)) from exc


@mcp.resource("fts://jobs/{job_id}", mime_type="application/json", description="A job record as JSON")
def job_resource(job_id: str, ctx: Context) -> str:
    return _resource(lambda: _core(ctx).jobs.get(job_id)).model_dump_json(indent=2)


@mcp.resource("fts://jobs/{job_id}/log", mime_type="text/plain", description="The job's worker log (last 256 KiB)")
def job_log_resource(job_id: str, ctx: Context) -> str:
    return _resource(lambda: _core(ctx).jobs.log(job_id))


@mcp.resource("fts://jobs/{job_id}/metrics", mime_type="application/json",
              description="Training figures logged so far (step, loss, eval loss, learning rate, tokens/s), per step")
def job_metrics_resource(job_id: str, ctx: Context) -> str:
    def read() -> str:
        keys = ("step", "epoch", "loss", "eval_loss", "learning_rate", "tokens_per_second")
        points = [{k: e[k] for k in keys if e.get(k) is not None}
                  for e in _core(ctx).jobs.events(job_id, kind="progress") if e.get("logged") or "eval_loss" in e]
        return json.dumps({"job_id": job_id, "points": points}, separators=(",", ":"))

    return _resource(read)


@mcp.resource("fts://jobs/{job_id}/eval", mime_type="application/json",
              description="An eval job's full report: both sides' figures and sample answers")
def job_eval_resource(job_id: str, ctx: Context) -> str:
    def read() -> str:
        path = _core(ctx).jobs.folder(job_id) / "eval.json"
        if not path.is_file():
            raise FtsError(f"job {job_id} has no evaluation (evaluate_adapter makes one)", param="job_id")
        return path.read_text()

    return _resource(read)


@mcp.resource("fts://jobs/{job_id}/loss.png", mime_type="image/png", description="Loss curve so far")
def job_loss_resource(job_id: str, ctx: Context) -> bytes:
    return _resource(lambda: _core(ctx).jobs.loss_curve(job_id))


# ---- planning ------------------------------------------------------------------------------------------------

def _criterion(name: str):
    """The Criteria field's own type and description, so the tool schema and the core model cannot drift."""
    info = Criteria.model_fields[name]
    return Annotated[info.annotation, *info.metadata, Field(None, description=info.description)]


@mcp.tool(title="Fine-tune or RAG?", annotations=READ_ONLY)
@agent_errors
def recommend_ft_vs_rag(
    ctx: Context,
    knowledge_changes: _criterion("knowledge_changes") = None,
    output_format: _criterion("output_format") = None,
    reasoning_style: _criterion("reasoning_style") = None,
    domain_jargon: _criterion("domain_jargon") = None,
    factual_accuracy_with_sources: _criterion("factual_accuracy_with_sources") = None,
    budget: _criterion("budget") = None,
    maximum_quality: _criterion("maximum_quality") = None,
    labelled_examples: _criterion("labelled_examples") = None,
    example_quality: _criterion("example_quality") = None,
    latency_sensitive: _criterion("latency_sensitive") = None,
    deployment: _criterion("deployment") = None,
) -> AdviceView:
    """First: whether fine-tuning, RAG, both or neither yet fits a use case, with a reason per criterion and next
    steps. Give what you know; omit the rest."""
    criteria = Criteria(knowledge_changes=knowledge_changes, output_format=output_format,
                        reasoning_style=reasoning_style, domain_jargon=domain_jargon,
                        factual_accuracy_with_sources=factual_accuracy_with_sources, budget=budget,
                        maximum_quality=maximum_quality, labelled_examples=labelled_examples,
                        example_quality=example_quality, latency_sensitive=latency_sensitive, deployment=deployment)
    return answer(plain_view(AdviceView, _planning(ctx).recommend_ft_vs_rag(criteria)))


Count = int | None  # bounds are the Architecture model's, checked (and named) by the core


@mcp.tool(title="Estimate memory, time and cost", annotations=READ_ONLY)
@agent_errors
def estimate_resources(
    ctx: Context,
    base_model: Annotated[str | None, Field(description="folder or hub id (reads config.json)")] = None,
    params: Annotated[int | None, Field(ge=1_000_000, le=10**13, description="or a parameter count")] = None,
    layers: Count = None,
    hidden: Count = None,
    intermediate: Count = None,
    heads: Count = None,
    kv_heads: Count = None,
    vocab: Count = None,
    tied_embeddings: bool | None = None,
    method: Literal["full", "lora", "qlora", "all"] = "all",
    seq_len: Annotated[int, Field(ge=16, le=1_048_576)] = 2048,
    micro_batch: Annotated[int, Field(ge=1, le=4096)] = 4,
    lora_r: Annotated[int, Field(ge=1, le=1024)] = 16,
    target_modules: Literal["all-linear"] | list[str] = "all-linear",
    gradient_checkpointing: bool | Literal["auto"] = "auto",
    optimizer: Literal["adamw_32bit", "adamw_8bit", "paged_adamw_8bit", "paged_adamw_32bit"] = "adamw_32bit",
    cross_entropy: Literal["chunked", "liger", "full"] = "chunked",
    padding_free: bool = True,
    precision: Literal["mixed", "bf16"] | None = None,
    dataset_examples: Annotated[int | None, Field(ge=1, le=10**10)] = None,
    tokens_per_example: Annotated[int | None, Field(ge=1, le=1_048_576)] = None,
    dataset_tokens: Annotated[int | None, Field(ge=1, le=10**14)] = None,
    epochs: Annotated[float, Field(gt=0, le=100)] = 3.0,
    gpu: str | None = None,  # a card's name; an unknown one is refused with the list of known ones
    gpu_memory_gb: Annotated[float | None, Field(gt=0, le=10_000)] = None,
    price_per_gpu_hour: Annotated[float | None, Field(ge=0, le=10_000)] = None,
    utilization: Annotated[float | None, Field(gt=0, le=1)] = None,
    workers: Annotated[int, Field(ge=1, le=64)] = 1,  # data-parallel GPUs, as training.workers
    objective: Literal["sft", "dpo"] = "sft",  # start_qlora_job's method (dpo: two sequences + a reference pass)
) -> EstimateView:
    """Before training: memory by term for full, LoRA, QLoRA; fit; a setup that fits; time, cost. Give base_model,
    params or the shape (workers: DDP GPUs). Defaults are the recipe's; notes say what was assumed."""
    settings = RunSettings(seq_len=seq_len, micro_batch=micro_batch, lora_r=lora_r,
                                target_modules=target_modules, gradient_checkpointing=gradient_checkpointing,
                                optimizer=optimizer, cross_entropy=cross_entropy, padding_free=padding_free,
                                precision=precision or "mixed", workers=workers, objective=objective,
                                adapter_dtype={None: None, "mixed": "fp32", "bf16": "bf16"}[precision])
    shape = {"layers": layers, "hidden": hidden, "intermediate": intermediate, "heads": heads, "kv_heads": kv_heads,
             "vocab": vocab}
    return answer(plain_view(EstimateView, _planning(ctx).estimate_resources(
        base_model=base_model, params=params, shape=shape, tied_embeddings=tied_embeddings, method=method,
        settings=settings, dataset_examples=dataset_examples, tokens_per_example=tokens_per_example,
        dataset_tokens=dataset_tokens, epochs=epochs, gpu=gpu, gpu_memory_gb=gpu_memory_gb,
        price_per_gpu_hour=price_per_gpu_hour, utilization=utilization)))


# ---- reference documents and prompts -------------------------------------------------------------------------

@mcp.resource("fts://docs", mime_type="text/markdown", description="Index of the reference documents")
def docs_index() -> str:
    return read_doc("index")


@mcp.resource("fts://docs/{topic}", mime_type="text/markdown",
              description=f"Reference document; topics: {', '.join(DOC_TOPICS)}")
def doc(topic: str) -> str:
    if topic not in DOC_TOPICS:
        raise ResourceNotFoundError(f"no document {topic!r}; topics: {', '.join(DOC_TOPICS)}")
    return read_doc(topic)


@mcp.prompt(title="Plan a fine-tune")
def plan_finetune(use_case: str, data_available: str, hardware: str) -> list:
    """Walk through recommend -> estimate -> validate -> start for a use case."""
    return [UserMessage(
        f"I want to adapt a language model for this use case:\n{use_case}\n\n"
        f"Data I have: {data_available}\nHardware: {hardware}\n\n"
        "Plan it with the fts-mcp tools, step by step:\n"
        "1. Call recommend_ft_vs_rag with what you can infer (leave unknowns null). If it says rag or "
        "neither_yet, explain why and stop there with the next steps.\n"
        "2. Pick a base model (7-13B instruct for most tasks; smaller for edge) and call estimate_resources with "
        "it, the GPU and the dataset size. Choose the method and configuration it says fits.\n"
        "3. Call validate_dataset on the data with that base_model and fix every listed line.\n"
        "4. Call start_qlora_job with the chosen lora and training settings, then follow job_status with "
        "wait_seconds until it finishes. Read fts://docs/lora and fts://docs/memory if a choice is unclear.")]


@mcp.prompt(title="Diagnose a job")
def diagnose_job(job_id: str, ctx: Context) -> list:
    """Read a job's status, loss curve and log, and suggest fixes (loss not falling, out of memory, diverging)."""
    try:
        jobs = _core(ctx).jobs
        job = jobs.get(job_id, log_lines=8)
    except FtsError as exc:
        raise ToolError(str(exc)) from exc
    findings = diagnose(job, jobs.events(job_id, kind="progress"), jobs.log(job_id))
    found = "\n".join(f"- {f.problem}: {f.evidence}. Fix: {f.fix}" for f in findings) or "- no known problem pattern"
    status = job_view(job, detail=True).model_dump_json(exclude_none=True, exclude={"log_tail", "next"})
    tail = "\n".join(line[:200] for line in job.log_tail)
    text = (f"Diagnose fine-tuning job {job_id}.\n\nStatus: {status[:1500]}\n\nAutomatic checks:\n{found[:800]}\n\n"
            f"Last log lines:\n{tail[-800:]}\n\nThe loss curve is fts://jobs/{job_id}/loss.png, its figures "
            f"fts://jobs/{job_id}/metrics and the whole log fts://jobs/{job_id}/log: read them if the checks above do "
            "not explain it. Explain what happened and what to change; if a new run is needed, give the "
            "start_qlora_job arguments.")
    return [UserMessage(text)]
