"""The edge from the caller's side: publish adapters to the store, load them into runtimes, and try them
(through a runtime, or a one-shot `generate` job). Pure Python."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

import anyio
from pydantic import BaseModel, Field

from fts_mcp.adapters.resolve import resolve_adapter, store_source
from fts_mcp.config import Settings
from fts_mcp.edge.client import check_url, post_generate, post_load
from fts_mcp.edge.spec import GenerateJobSpec
from fts_mcp.edge.store import AdapterStore, Manifest, StoreDtype, StoreEntry
from fts_mcp.errors import FtsError, InvalidArgument, about
from fts_mcp.jobs.service import Jobs
from fts_mcp.jobs.states import JobState
from fts_mcp.jobs.watch import watch
from fts_mcp.models.refs import resolve_model_argument


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
               runtime_url: str | None = None, dtype: StoreDtype = "bfloat16") -> Deployment:
        runtime = check_url(runtime_url) if runtime_url else None
        source = resolve_adapter(adapter, self.settings, self.jobs, store=False)
        job = source.job
        metrics, base_config = None, None
        if job is not None:
            if job.artifacts.metrics and Path(job.artifacts.metrics).is_file():
                metrics = {k: v for k, v in json.loads(Path(job.artifacts.metrics).read_text()).items()
                           if k != "log_history"}
            if Path(job.spec["base_model"]).is_absolute():
                base_config = Path(job.spec["base_model"]) / "config.json"
        with about("name", instead_of=("model",)):
            manifest, created = self.store.publish(source.folder, name, version=version, alias=alias, dtype=dtype,
                                                   base_config=base_config, source_job=job.job_id if job else None,
                                                   metrics=metrics)
        model = f"{manifest.name}@{manifest.version}"
        uri = self.store.path(manifest.name, manifest.version)
        loaded, swap_ms = False, None
        if runtime:
            swap_ms = post_load(runtime, model, str(uri))  # a folder: what vLLM takes too
            loaded = True
        curl = (f"curl {runtime or 'http://127.0.0.1:8001'}/v1/completions -H 'Content-Type: application/json' "
                f"-d '{{\"model\": \"{model}\", \"prompt\": \"Hello\", \"max_tokens\": 32}}'")
        return Deployment(name=manifest.name, version=manifest.version, created=created, uri=str(uri),
                          sha256=manifest.files["adapter_model.safetensors"].sha256, bytes=manifest.bytes,
                          model=model, loaded=loaded, swap_ms=swap_ms, curl=curl, manifest=manifest)

    def list_adapters(self, name: str | None = None) -> list[StoreEntry]:
        with about("name"):
            return self.store.entries(name)

    async def generate(self, model: str, *, prompt: str | None = None, messages: list[dict] | None = None,
                       max_tokens: int = 64, temperature: float = 0.0, runtime_url: str | None = None,
                       base_model: str | None = None, timeout: float = 600) -> Generation:
        """Through a runtime, or a one-shot job that is cancelled if it outlives `timeout` or its caller."""
        if (prompt is None) == (messages is None):
            raise InvalidArgument("give prompt (text) or messages (a chat), exactly one", param="prompt")
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
        adapter_dir, base = None, base_model
        if model != "base":
            source = store_source(self.settings)
            manifest = source.resolve(model, param="model")
            adapter_dir = str(source.folder(manifest))
            base = base or manifest.base_model
        if base is None:
            raise InvalidArgument("model 'base' needs base_model", param="base_model")
        return GenerateJobSpec(base_model=resolve_model_argument(base, self.settings), adapter_dir=adapter_dir,
                               model=model, prompt=prompt, messages=messages, max_tokens=max_tokens,
                               temperature=temperature, trust_remote_code=self.settings.trust_remote_code)
