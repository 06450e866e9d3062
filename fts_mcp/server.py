"""The MCP layer: thin tools, resources and prompts over the typed core (`fts_mcp.core.Core`).

Each tool validates its arguments through its signature (the signature is the schema), calls the core and
returns a pydantic model (structured output). Domain errors become tool errors the agent can act on.
This module must stay light to import: no torch, transformers or huggingface-hub here.
"""

import functools
import inspect
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Annotated, Literal

import anyio
from mcp.server.mcpserver import Context, MCPServer
from mcp.server.mcpserver.exceptions import ResourceNotFoundError, ToolError
from mcp.server.mcpserver.prompts.base import UserMessage
from mcp_types import ToolAnnotations
from pydantic import BaseModel, Field, ValidationError

from fts_mcp import __version__
from fts_mcp.adapters.spec import Combination, Dtype, WeightedAdapter
from fts_mcp.config import Settings
from fts_mcp.core import Core
from fts_mcp.datasets import DatasetReport
from fts_mcp.docs import DOC_TOPICS, read_doc
from fts_mcp.edge.service import Deployment, Generation
from fts_mcp.edge.store import StoreDtype, StoreEntry
from fts_mcp.errors import FtsError
from fts_mcp.jobs.models import Job, JobList
from fts_mcp.jobs.states import JobState
from fts_mcp.jobs.watch import watch
from fts_mcp.planning.advice import Advice, Criteria
from fts_mcp.planning.diagnose import diagnose
from fts_mcp.planning.estimate import ResourceEstimate
from fts_mcp.planning.estimate import Settings as EstimateSettings
from fts_mcp.planning.service import Planning
from fts_mcp.training.spec import LoraSpec, TrainingSpec

log = logging.getLogger("fts_mcp.server")

INSTRUCTIONS = """\
fts-mcp fine-tunes LoRA / QLoRA adapters on this host's GPUs (or CPU) as background jobs.
Plan first: recommend_ft_vs_rag (is fine-tuning the right tool?) and estimate_resources (memory, fit, time,
cost); reference documents are at fts://docs. Then: validate_dataset -> start_qlora_job -> job_status (with
wait_seconds to long-poll) until the job is succeeded -> use artifacts.adapter_dir. cancel_job stops a job
with a checkpoint; resume_job continues an interrupted job, or a cancelled one that saved a checkpoint.
Jobs outlive this server; list_jobs shows them. Paths must lie inside the configured roots."""

TICK_SECONDS = 1.0
READ_ONLY = ToolAnnotations(read_only_hint=True, destructive_hint=False, idempotent_hint=True, open_world_hint=False)
# Starts work; asked twice, starts it twice.
LAUNCHES = ToolAnnotations(read_only_hint=False, destructive_hint=False, idempotent_hint=False, open_world_hint=False)
# Starts work, but the same request again returns the first result (merge and deploy are keyed by their inputs).
LAUNCHES_ONCE = ToolAnnotations(read_only_hint=False, destructive_hint=False, idempotent_hint=True,
                                open_world_hint=False)
STOPS = ToolAnnotations(read_only_hint=False, destructive_hint=True, idempotent_hint=True, open_world_hint=False)
# May talk to a runtime at a URL the agent gives.
REACHES_OUT = ToolAnnotations(read_only_hint=False, destructive_hint=False, idempotent_hint=False,
                              open_world_hint=True)

JobId = Annotated[str, Field(description="job id as returned by start_qlora_job or list_jobs, e.g. job-0123456789ab")]


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
async def lifespan(_server: MCPServer) -> AsyncIterator[Core | FtsError]:
    """One Core per server process. If it cannot start (an unreadable job database), the server still answers:
    every tool call returns the reason and what to do."""
    try:
        core = Core()
    except FtsError as exc:
        log.error("%s", exc)
        yield exc
        return
    async with anyio.create_task_group() as tg:
        tg.start_soon(_monitor, core)
        try:
            yield core
        finally:
            tg.cancel_scope.cancel()
    core.close()


mcp = MCPServer("fts-mcp", version=__version__, instructions=INSTRUCTIONS, lifespan=lifespan, log_level="WARNING")


def _core(ctx: Context) -> Core:
    core = ctx.request_context.lifespan_context
    if isinstance(core, FtsError):
        raise core  # the reason the server could not open its job store (agent_errors makes it a tool error)
    return core


def _planning(ctx: Context) -> Planning:
    """Planning needs no job store: it answers even when the store cannot be opened."""
    core = ctx.request_context.lifespan_context
    return Planning(Settings.from_env()) if isinstance(core, FtsError) else core.planning


def agent_errors(fn):
    """Turn domain errors (and core models refusing a value) into tool errors whose text names the argument and
    what would be accepted."""
    if inspect.iscoroutinefunction(fn):
        @functools.wraps(fn)
        async def async_wrapper(*args, **kwargs):
            try:
                return await fn(*args, **kwargs)
            except (FtsError, ValidationError) as exc:
                raise ToolError(str(exc)) from exc
        return async_wrapper

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except (FtsError, ValidationError) as exc:
            raise ToolError(str(exc)) from exc
    return wrapper


class AdapterList(BaseModel):
    adapters: list[StoreEntry]


# ---- tools ---------------------------------------------------------------------------------------------------

@mcp.tool(title="Validate a training dataset", annotations=READ_ONLY)
@agent_errors
def validate_dataset(
    path: Annotated[str, Field(description="JSONL file inside the allowed roots")],
    ctx: Context,
    base_model: Annotated[str | None, Field(description="model folder or hub id; adds token statistics "
                                                        "under its tokenizer and chat template")] = None,
    max_seq_len: Annotated[int, Field(ge=16, le=262_144, description="sequence length the job will use")] = 2048,
) -> DatasetReport:
    """Check a JSONL training file before training on it. Use this first, and after every edit to the data.

    Accepts chat ({"messages": [{role, content}...]}), completion ({"prompt", "completion"}) or text ({"text"})
    lines. Returns ok, the format, the example count, errors with line numbers, warnings (e.g. too few
    examples: 100-500 is the floor for style, 1K-10K for robust task learning) and, with base_model, token
    statistics (lengths, trained tokens, how many exceed max_seq_len)."""
    return _core(ctx).training.validate_dataset(path, base_model, max_seq_len)


@mcp.tool(title="Start a QLoRA / LoRA fine-tuning job", annotations=LAUNCHES)
@agent_errors
def start_qlora_job(
    base_model: Annotated[str, Field(description="local model folder (inside the roots) or hub id in the local "
                                                 "Hugging Face cache, e.g. 'Qwen/Qwen2.5-0.5B-Instruct'")],
    dataset: Annotated[str, Field(description="JSONL training file inside the roots (see validate_dataset)")],
    ctx: Context,
    output_name: Annotated[str | None, Field(description="name for the adapter; default <model>-<dataset>-lora")]
    = None,
    lora: Annotated[LoraSpec | None, Field(description="adapter shape: r (16), alpha (2r), dropout (0.05), "
                                                       "target_modules ('all-linear')")] = None,
    quantization: Annotated[Literal["nf4", "none"], Field(description="'nf4': QLoRA, 4-bit NF4 base with double "
                                                                      "quantization (least memory); 'none': "
                                                                      "16-bit base (plain LoRA)")] = "nf4",
    training: Annotated[TrainingSpec | None, Field(description="optimisation settings; every field has a default")]
    = None,
    resume_from: Annotated[str | None, Field(description="id of a cancelled/interrupted/finished training job to "
                                                         "continue from its last checkpoint (same model and lora)")]
    = None,
) -> Job:
    """Launch a LoRA / QLoRA fine-tune as a background job and return at once with the job: running when a
    device slot is free, else queued behind the jobs holding them.

    The dataset is validated first; a bad one is refused with its line errors and nothing is queued. The job
    runs in its own worker process and outlives this server. Follow it with job_status(job_id,
    wait_seconds=60); when it is succeeded, artifacts.adapter_dir holds the PEFT adapter."""
    return _core(ctx).training.start(base_model, dataset, output_name=output_name, lora=lora,
                                     quantization=quantization, training=training, resume_from=resume_from)


@mcp.tool(title="Job status (long-poll)", annotations=READ_ONLY)
@agent_errors
async def job_status(
    job_id: JobId,
    ctx: Context,
    wait_seconds: Annotated[float, Field(ge=0, le=300, description="wait up to this long for the state to change "
                                                                   "(progress notifications meanwhile); 0 answers "
                                                                   "at once")] = 0,
) -> Job:
    """Get a job's state, progress (step/total, epoch, loss, eval loss, learning rate, tokens/s, ETA), error,
    artifacts and the tail of its log. With wait_seconds it returns as soon as the state changes, so one call
    can wait through a whole short job."""
    core = _core(ctx)
    last_step = None

    async def report(job: Job) -> None:
        nonlocal last_step
        p = job.progress
        if p.step != last_step:
            last_step = p.step
            loss = f", loss {p.loss:.4f}" if p.loss is not None else ""
            await ctx.report_progress(p.step, p.total_steps, f"{job.state} step {p.step}/{p.total_steps or '?'}{loss}")

    return await watch(lambda: core.jobs.get(job_id), wait_seconds=wait_seconds, on_poll=report)


@mcp.tool(title="List jobs", annotations=READ_ONLY)
@agent_errors
def list_jobs(
    ctx: Context,
    state: Annotated[JobState | None, Field(description="only jobs in this state")] = None,
    limit: Annotated[int, Field(ge=1, le=1000, description="most recent first")] = 20,
) -> JobList:
    """List jobs on this host, newest first, from every server and CLI sharing this FTS_HOME."""
    return _core(ctx).jobs.list(state, limit)


@mcp.tool(title="Cancel a job", annotations=STOPS)
@agent_errors
def cancel_job(job_id: JobId, ctx: Context) -> Job:
    """Cancel a job. Queued jobs are cancelled at once; a running job gets SIGTERM, saves a checkpoint and
    reads cancelled once its worker has exited (its GPU memory is then free). A job that has already ended is
    returned unchanged. A cancelled job with a checkpoint continues with resume_job."""
    return _core(ctx).jobs.cancel(job_id)


@mcp.tool(title="Resume a stopped job", annotations=LAUNCHES)
@agent_errors
def resume_job(job_id: JobId, ctx: Context) -> Job:
    """Queue a job again where it stopped: an interrupted job (its worker was killed, ran out of memory or the
    host restarted), or a cancelled one that saved a checkpoint (`resumable: true` on the job). It continues
    from its last checkpoint: the step count, optimizer and scheduler state carry on."""
    return _core(ctx).jobs.resume(job_id)


@mcp.tool(title="Merge adapters into a model", annotations=LAUNCHES_ONCE)
@agent_errors
def merge_adapter(
    ctx: Context,
    adapter: Annotated[str | None, Field(description="a succeeded training job id or an adapter folder")] = None,
    adapters: Annotated[list[WeightedAdapter] | None, Field(description="several adapters to combine, each "
                                                                        "{adapter, weight}")] = None,
    base_model: Annotated[str | None, Field(description="16-bit base to merge into; default: the adapter's own "
                                                        "base_model_name_or_path")] = None,
    output_name: Annotated[str | None, Field(description="folder name under FTS_HOME/models (or /adapters)")] = None,
    dtype: Annotated[Dtype, Field(description="dtype of the merged weights (or of the combined adapter)")] = "bfloat16",
    verify: Annotated[bool, Field(description="compare merged logits with base + adapter and refuse a merge "
                                              "beyond the dtype's tolerance")] = True,
    combination: Annotated[Combination, Field(description="how several adapters combine (see description)")] = "cat",
    density: Annotated[float | None, Field(gt=0, le=1, description="share of each delta kept by ties, dare_linear, "
                                                                   "dare_ties and magnitude_prune")] = None,
    output: Annotated[Literal["model", "adapter"], Field(description="'model': merge into the base; 'adapter': "
                                                                     "write the combined adapter")] = "model",
) -> Job:
    """Merge a LoRA adapter into its base model (W + alpha/r * B A) as a background job of kind `merge`, or
    combine several adapters into one. The base is loaded in 16 bits — never merged into 4-bit weights — and the
    merged logits are verified against base + adapter (artifacts.verification: max_abs_logit_diff, tolerance,
    and for QLoRA adapters the difference from the 4-bit base they were trained on). The result is written
    atomically; the same merge asked twice returns the first job. Combinations: `cat` (concatenates the factors)
    is exactly the weighted sum of the deltas, any ranks; `svd` is that sum truncated back to a rank, any ranks;
    `linear`, `ties`, `dare_linear`, `dare_ties`, `magnitude_prune` need equal ranks and are not exact (the last
    four prune each delta to `density`). Follow it with job_status; artifacts.output_dir holds the result."""
    return _core(ctx).merging.merge(adapter, adapters=adapters, base_model=base_model, output_name=output_name,
                                    dtype=dtype, verify=verify, combination=combination, density=density,
                                    output=output)


# ---- the edge ------------------------------------------------------------------------------------------------

RuntimeUrl = Annotated[str | None, Field(description="an edge runtime (fts-mcp edge serve) or a vLLM server started "
                                                     "with runtime LoRA updating, e.g. http://127.0.0.1:8001")]


@mcp.tool(title="Deploy an adapter to the edge store", annotations=LAUNCHES_ONCE)
@agent_errors
def deploy_adapter(
    adapter: Annotated[str, Field(description="a succeeded training job id or an adapter folder")],
    name: Annotated[str, Field(description="adapter name in the store: lowercase letters, digits, '.', '_', '-'")],
    ctx: Context,
    version: Annotated[str | None, Field(description="v1, v2, ...; default the next version (the same bytes "
                                                     "again reuse their version)")] = None,
    alias: Annotated[str | None, Field(description="an alias to move to this version, e.g. prod")] = None,
    runtime_url: RuntimeUrl = None,
    dtype: Annotated[StoreDtype, Field(description="weights are stored in 16 bits unless asked otherwise")]
    = "bfloat16",
) -> Deployment:
    """Publish an adapter as an immutable version in the edge adapter store (name/version with PEFT's files, a
    manifest with sha256 of every file), optionally move an alias, and optionally load it into a running edge
    runtime or vLLM server. Returns the `model` string to put in requests, the swap time, and a curl example."""
    return _core(ctx).edge.deploy(adapter, name, version=version, alias=alias, runtime_url=runtime_url, dtype=dtype)


@mcp.tool(title="List adapters in the edge store", annotations=READ_ONLY)
@agent_errors
def list_adapters(
    ctx: Context,
    name: Annotated[str | None, Field(description="only this adapter")] = None,
) -> AdapterList:
    """List the edge store: each adapter's versions, aliases and the manifest of its latest version."""
    return AdapterList(adapters=_core(ctx).edge.list_adapters(name))


@mcp.tool(title="Generate with an adapter", annotations=REACHES_OUT)
@agent_errors
async def generate(
    model: Annotated[str, Field(description="a store adapter (name, name@v2, name:prod) or 'base'")],
    ctx: Context,
    prompt: Annotated[str | None, Field(description="plain prompt (completion form)")] = None,
    messages: Annotated[list[dict[str, str]] | None, Field(description="chat messages [{role, content}]")] = None,
    max_tokens: Annotated[int, Field(ge=1, le=8192)] = 64,
    temperature: Annotated[float, Field(ge=0, le=2, description="0 is greedy")] = 0.0,
    runtime_url: RuntimeUrl = None,
    base_model: Annotated[str | None, Field(description="without a runtime: the base (default: the adapter's "
                                                        "own)")] = None,
    timeout_seconds: Annotated[float, Field(gt=0, le=3600, description="give up (and cancel the one-shot job) "
                                                                       "after this long")] = 300,
) -> Generation:
    """Try an adapter: send a prompt or chat to a running runtime, or without runtime_url run a one-shot worker
    job that loads the base and the adapter, answers, and exits (slower: it loads the model each time). The job
    is cancelled if it outlives timeout_seconds or the call."""
    return await _core(ctx).edge.generate(model, prompt=prompt, messages=messages, max_tokens=max_tokens,
                                          temperature=temperature, runtime_url=runtime_url, base_model=base_model,
                                          timeout=timeout_seconds)


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
) -> Advice:
    """Decide whether fine-tuning, retrieval (RAG), both, or neither yet fits a use case — before spending GPU
    hours. Fill what you know; leave the rest null (unknown). Returns the recommendation with a confidence, one
    verdict and reason per criterion, the conflicts and which side dominates, data-size guidance and next steps."""
    criteria = Criteria(knowledge_changes=knowledge_changes, output_format=output_format,
                        reasoning_style=reasoning_style, domain_jargon=domain_jargon,
                        factual_accuracy_with_sources=factual_accuracy_with_sources, budget=budget,
                        maximum_quality=maximum_quality, labelled_examples=labelled_examples,
                        example_quality=example_quality, latency_sensitive=latency_sensitive, deployment=deployment)
    return _planning(ctx).recommend_ft_vs_rag(criteria)


Count = Annotated[int | None, Field(None, ge=1, le=10_000_000)]


@mcp.tool(title="Estimate memory, time and cost", annotations=READ_ONLY)
@agent_errors
def estimate_resources(
    ctx: Context,
    base_model: Annotated[str | None, Field(description="model folder or hub id; only config.json is read")] = None,
    params: Annotated[int | None, Field(ge=1_000_000, le=10**13, description="parameter count, when the "
                                                                           "shape is unknown")] = None,
    layers: Count = None,
    hidden: Count = None,
    intermediate: Count = None,
    heads: Count = None,
    kv_heads: Count = None,
    vocab: Count = None,
    method: Annotated[Literal["full", "lora", "qlora", "all"], Field(description="one method or all three "
                                                                                "side by side")] = "all",
    seq_len: Annotated[int, Field(ge=16, le=1_048_576)] = 2048,
    micro_batch: Annotated[int, Field(ge=1, le=4096)] = 4,
    lora_r: Annotated[int, Field(ge=1, le=1024)] = 16,
    target_modules: Annotated[Literal["all-linear"] | list[str], Field(description="'all-linear' or module "
                                                                                   "names")] = "all-linear",
    gradient_checkpointing: bool = True,
    optimizer: Literal["adamw_32bit", "adamw_8bit", "paged_adamw_8bit", "paged_adamw_32bit"] = "adamw_32bit",
    dataset_examples: Annotated[int | None, Field(ge=1, le=10**10)] = None,
    tokens_per_example: Annotated[int | None, Field(ge=1, le=1_048_576, description="average; default 512")] = None,
    dataset_tokens: Annotated[int | None, Field(ge=1, le=10**14)] = None,
    epochs: Annotated[float, Field(gt=0, le=100)] = 3.0,
    gpu: Annotated[str | None, Field(description="H200, H100, A100-80GB, A100-40GB, L40S, L4, RTX-4090, ...")] = None,
    gpu_memory_gb: Annotated[float | None, Field(gt=0, le=10_000, description="for a card not in the list")] = None,
    price_per_gpu_hour: Annotated[float | None, Field(ge=0, le=10_000)] = None,
    utilization: Annotated[float | None, Field(gt=0, le=1, description="share of the GPU's bf16 peak; "
                                                                       "default per method")] = None,
) -> ResourceEstimate:
    """Estimate GPU memory (a breakdown: weights, quantization constants with and without double quantization,
    adapters, gradients, optimizer, activations with/without checkpointing, logits, overhead) for full
    fine-tuning, LoRA and QLoRA; whether each fits the GPU and how many GPUs it needs; a configuration that fits;
    and, with a dataset size and a GPU, the time and cost. Use it before start_qlora_job."""
    settings = EstimateSettings(seq_len=seq_len, micro_batch=micro_batch, lora_r=lora_r,
                                target_modules=target_modules, gradient_checkpointing=gradient_checkpointing,
                                optimizer=optimizer)
    shape = {"layers": layers, "hidden": hidden, "intermediate": intermediate, "heads": heads, "kv_heads": kv_heads,
             "vocab": vocab}
    return _planning(ctx).estimate_resources(
        base_model=base_model, params=params, shape=shape, method=method, settings=settings,
        dataset_examples=dataset_examples, tokens_per_example=tokens_per_example, dataset_tokens=dataset_tokens,
        epochs=epochs, gpu=gpu, gpu_memory_gb=gpu_memory_gb, price_per_gpu_hour=price_per_gpu_hour,
        utilization=utilization)


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
        job = jobs.get(job_id, log_lines=40)
    except FtsError as exc:
        raise ToolError(str(exc)) from exc
    findings = diagnose(job, jobs.store.events(job_id, kind="progress"), jobs.log(job_id))
    found = "\n".join(f"- {f.problem}: {f.evidence}. Fix: {f.fix}" for f in findings) or "- no known problem pattern"
    return [UserMessage(
        f"Diagnose fine-tuning job {job_id}.\n\nStatus:\n{job.model_dump_json(indent=2, exclude={'log_tail'})}\n\n"
        f"Automatic checks:\n{found}\n\nLast log lines:\n" + "\n".join(job.log_tail) +
        "\n\nExplain what happened and what to change; if a new run is needed, give the start_qlora_job "
        "arguments.")]
