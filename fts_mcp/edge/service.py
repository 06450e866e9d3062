"""The edge from the caller's side: publish adapters to the store, load them into runtimes, and try them
(through a runtime, or a one-shot `generate` job). Pure Python."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Literal

import anyio
from filelock import FileLock, Timeout
from pydantic import BaseModel, Field

from fts_mcp.adapters.resolve import resolve_adapter, store_source, training_base
from fts_mcp.adapters.store import AdapterStore, Manifest, StoreEntry
from fts_mcp.config import Settings
from fts_mcp.edge.client import check_url, post_generate, post_load
from fts_mcp.edge.spec import GenerateJobSpec, RuntimeJobSpec
from fts_mcp.errors import FtsError, InvalidArgument, about
from fts_mcp.jobs.service import Jobs
from fts_mcp.jobs.states import JobState
from fts_mcp.jobs.watch import watch
from fts_mcp.models.base import Quantization
from fts_mcp.models.dtypes import Dtype
from fts_mcp.models.refs import resolve_model_argument
from fts_mcp.network import free_port

LOCAL = "local"  # runtime_url for this host's managed runtime
RUNTIME_START_SECONDS = 180.0


def quantization_of(manifest: Manifest) -> Quantization:
    """How to load the base a stored adapter serves on: as it was trained (16-bit when nothing says)."""
    return manifest.training_base.quantization if manifest.training_base is not None else "none"



class Deployment(BaseModel):
    name: str
    version: str
    created: bool = Field(description="false when these exact bytes were already published (nothing changed)")
    uri: str = Field(description="the version's folder in the store")
    sha256: str = Field(description="sha256 of adapter_model.safetensors")
    bytes: int
    model: str = Field(description="the string to put in a request's `model`")
    loaded: bool = Field(description="loaded into runtime_url")
    swap_ms: float | None = Field(None, description="time the runtime took to load it (ms)")
    runtime: str | None = Field(None, description="the runtime it was loaded into (a managed one: its job too)")
    curl: str
    manifest: Manifest


class Generation(BaseModel):
    text: str
    model: str
    finish_reason: str | None
    via: Literal["runtime", "job"]
    job_id: str | None = None
    usage: dict[str, Any] | None = None


class Edge:
    def __init__(self, settings: Settings, jobs: Jobs) -> None:
        self.settings = settings
        self.jobs = jobs
        self.store = AdapterStore(settings.store)

    def deploy(self, adapter: str, name: str, *, version: str | None = None, alias: str | None = None,
               runtime_url: str | None = None, dtype: Dtype = "bfloat16") -> Deployment:
        """Publish; with `runtime_url`, load it there — `"local"`: into this host's managed runtime for the
        adapter's base, started as a `runtime` job when none runs."""
        runtime = check_url(runtime_url) if runtime_url and runtime_url != LOCAL else None
        source = resolve_adapter(adapter, self.settings, self.jobs, store=False)
        job = source.job
        metrics, base_config = None, None
        if job is not None:
            if job.artifacts.metrics and Path(job.artifacts.metrics).is_file():
                metrics = {k: v for k, v in json.loads(Path(job.artifacts.metrics).read_text()).items()
                           if k != "log_history"}
            if Path(job.spec["base_model"]).is_absolute():
                base_config = Path(job.spec["base_model"]) / "config.json"
        trained = training_base(source, self.jobs)
        with about("name", instead_of=("model",)):
            manifest, created = self.store.publish(source.folder, name, version=version, alias=alias, dtype=dtype,
                                                   base_config=base_config, source_job=job.job_id if job else None,
                                                   metrics=metrics, training_base=trained)
        model = f"{manifest.name}@{manifest.version}"
        uri = self.store.path(manifest.name, manifest.version)
        loaded, swap_ms, runtime_job = False, None, None
        if runtime_url == LOCAL:
            runtime, runtime_job = self.local_runtime(manifest.base_model, quantization_of(manifest))
        if runtime:
            swap_ms = post_load(runtime, model, str(uri))  # a folder: what vLLM takes too
            loaded = True
        curl = (f"curl {runtime or 'http://127.0.0.1:8001'}/v1/completions -H 'Content-Type: application/json' "
                f"-d '{{\"model\": \"{model}\", \"prompt\": \"Hello\", \"max_tokens\": 32}}'")
        return Deployment(name=manifest.name, version=manifest.version, created=created, uri=str(uri),
                          sha256=manifest.files["adapter_model.safetensors"].sha256, bytes=manifest.bytes,
                          model=model, loaded=loaded, swap_ms=swap_ms, curl=curl, manifest=manifest,
                          runtime=f"{runtime_job} at {runtime}" if runtime_job else runtime)

    def local_runtime(self, base_model: str | None, quantization: Quantization = "none", *,
                      wait_seconds: float = RUNTIME_START_SECONDS) -> tuple[str, str]:
        """(url, job id) of the managed runtime serving `base_model` loaded as `quantization` (the base its
        adapters were trained on): a running `runtime` job's, or a new one's once it listens."""
        if not base_model:
            raise InvalidArgument("the adapter's manifest names no base model to serve it with", param="runtime_url")
        base = resolve_model_argument(base_model, self.settings)
        # One runtime per base, even when several deploys (from several servers on this FTS_HOME) ask at once:
        # finding and starting it is one step under a lock.
        try:
            lock = FileLock(self.settings.home / "runtimes.lock", timeout=60)
            lock.acquire()
        except Timeout:
            raise FtsError("another deploy has held the managed-runtime lock for a minute; try again",
                           param="runtime_url") from None
        try:
            live = (self.jobs.get(i, log_lines=0) for i in
                    self.jobs.ids_in(JobState.RUNNING, JobState.QUEUED, JobState.VALIDATING))
            job = next((j for j in live if j.kind == "runtime" and j.spec["base_model"] == base
                        and j.spec.get("quantization", "none") == quantization), None)
            if job is None:
                spec = RuntimeJobSpec(base_model=base, store=str(self.settings.store),
                                      cache=str(self.settings.edge_cache), port=(port := free_port()),
                                      url=f"http://127.0.0.1:{port}", quantization=quantization,
                                      trust_remote_code=self.settings.trust_remote_code)
                job = self.jobs.submit("runtime", spec, model=base)
        finally:
            lock.release()
        deadline = time.monotonic() + wait_seconds
        while (job := self.jobs.get(job.job_id, log_lines=0)).progress.url is None:
            if job.state.terminal:
                why = job.error.message if job.error else job.state
                raise FtsError(f"the managed runtime {job.job_id} ended before it listened: {why}",
                               param="runtime_url")
            if time.monotonic() > deadline:
                raise FtsError(f"the managed runtime {job.job_id} is still starting after {wait_seconds:g}s; "
                               f"job_status {job.job_id} shows when it serves", param="runtime_url")
            time.sleep(0.25)
        return job.progress.url, job.job_id

    def list_adapters(self, name: str | None = None) -> list[StoreEntry]:
        with about("name"):
            return self.store.entries(name)

    async def generate(self, model: str, *, prompt: str | None = None, messages: list[dict] | None = None,
                       max_tokens: int = 64, temperature: float = 0.0, runtime_url: str | None = None,
                       base_model: str | None = None, timeout: float = 600) -> Generation:
        """Through a runtime, or a one-shot job that is cancelled if it outlives `timeout` or its caller."""
        if (prompt is None) == (messages is None):
            raise InvalidArgument("give prompt (text) or messages (a chat), exactly one", param="prompt")
        if runtime_url == LOCAL:
            manifest = None if model == "base" else \
                store_source(self.settings).resolve(model.split("+")[-1].split("*")[-1], param="model")
            base = base_model if manifest is None else manifest.base_model
            quantization = quantization_of(manifest) if manifest is not None else "none"
            runtime_url, _ = await anyio.to_thread.run_sync(lambda: self.local_runtime(base, quantization))
        if runtime_url:
            runtime = check_url(runtime_url)
            answer = await anyio.to_thread.run_sync(
                lambda: post_generate(runtime, model, prompt, messages, max_tokens, temperature, timeout))
            return Generation(model=model, via="runtime", **answer)
        spec = await anyio.to_thread.run_sync(lambda: self._generate_spec(model, prompt, messages, max_tokens,
                                                                          temperature, base_model))
        job = await anyio.to_thread.run_sync(lambda: self.jobs.submit("generate", spec, model=spec.base_model))
        finished = False
        try:
            job = await watch(lambda: self.jobs.get(job.job_id, log_lines=0), wait_seconds=timeout,
                              until_terminal=True)
            finished = job.state.terminal
        finally:
            if not finished:  # timed out, or the caller gave up: leave no job behind
                with anyio.CancelScope(shield=True):
                    await anyio.to_thread.run_sync(self.jobs.cancel, job.job_id)
        if not finished:
            raise FtsError(f"generate job {job.job_id} did not finish within {timeout:g}s and was cancelled; start "
                           "an edge runtime (fts-mcp edge serve) for repeated tries", param="timeout_seconds")
        if job.state != JobState.SUCCEEDED:
            message = job.error.message if job.error else job.state
            raise FtsError(f"generate job {job.job_id} {job.state}: {message}", param="model")
        return Generation(text=job.artifacts.text or "", model=model, finish_reason=job.artifacts.finish_reason,
                          via="job", job_id=job.job_id)

    def _generate_spec(self, model: str, prompt: str | None, messages: list[dict] | None, max_tokens: int,
                       temperature: float, base_model: str | None) -> GenerateJobSpec:
        adapter_dir, base, quantization = None, base_model, "none"
        if model != "base":
            source = store_source(self.settings)
            manifest = source.resolve(model, param="model")
            adapter_dir = str(source.folder(manifest))
            base = base or manifest.base_model
            quantization = quantization_of(manifest)
        if base is None:
            raise InvalidArgument("model 'base' needs base_model", param="base_model")
        return GenerateJobSpec(base_model=resolve_model_argument(base, self.settings), adapter_dir=adapter_dir,
                               model=model, prompt=prompt, messages=messages, max_tokens=max_tokens,
                               temperature=temperature, quantization=quantization,
                               trust_remote_code=self.settings.trust_remote_code)
