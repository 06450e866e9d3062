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

from fts_mcp.adapters.inspect import read_adapter_config
from fts_mcp.adapters.llamacpp import (
    GGUF_FILE,
    GgufBase,
    GgufUse,
    OutType,
    base_for,
    check_exportable,
    check_outtype,
    export,
    notes_for,
    usage,
)
from fts_mcp.adapters.resolve import resolve_adapter, store_source, training_base
from fts_mcp.adapters.store import AdapterStore, Manifest, StoreEntry
from fts_mcp.config import Settings
from fts_mcp.edge.client import check_url, post_generate, post_load
from fts_mcp.edge.spec import GenerateJobSpec, RuntimeJobSpec
from fts_mcp.errors import FtsError, InvalidArgument, JobNotFound, about
from fts_mcp.jobs.records import Job
from fts_mcp.jobs.service import Jobs
from fts_mcp.jobs.states import JOB_ID_RE, JobState
from fts_mcp.jobs.watch import watch
from fts_mcp.models.base import Quantization
from fts_mcp.models.dtypes import Dtype
from fts_mcp.models.refs import looks_like_path, resolve_model_argument
from fts_mcp.network import free_port

LOCAL = "local"  # runtime_url for this host's managed runtime
RUNTIME_START_SECONDS = 180.0
QUEUE_PATIENCE_SECONDS = 30.0  # a one-shot job still queued after this is cancelled, naming what it waited behind


def quantization_of(manifest: Manifest) -> Quantization:
    """How to load the base a stored adapter serves on: as it was trained (16-bit when nothing says)."""
    return manifest.training_base.quantization if manifest.training_base is not None else "none"



class GgufDeployment(GgufUse):
    """The version's GGUF LoRA (llama.cpp, llama-server, llama-cpp-python, Ollama) and the lines that use it."""

    path: str
    sha256: str
    bytes: int
    outtype: str
    base_gguf: str | None = Field(description="the base's own GGUF file it was checked against, when it came from one")


class Deployment(BaseModel):
    name: str
    version: str
    created: bool = Field(description="false when these exact bytes were already published (nothing changed)")
    uri: str = Field(description="the version's folder in the store")
    sha256: str = Field(description="sha256 of adapter_model.safetensors")
    bytes: int
    model: str = Field(description="the string to put in a request's `model`: the alias reference when an alias "
                                   "was moved (it follows the alias), else the version")
    chat: bool = Field(description="trained on chats: ask it through /v1/chat/completions with messages")
    loaded: bool = Field(description="loaded into runtime_url")
    swap_ms: float | None = Field(None, description="time the runtime took to load it (ms)")
    runtime: str | None = Field(None, description="the runtime's URL it was loaded into")
    runtime_job: str | None = Field(None, description="the managed runtime's job: cancel_job stops it")
    curl: str
    manifest: Manifest
    gguf: GgufDeployment | None = Field(None, description="the GGUF LoRA published beside it, and how to use it")


def sample_request(runtime: str, model: str, chat: bool) -> str:
    """A curl line that asks `model` the way it was trained: a chat through /v1/chat/completions, else a prompt."""
    body = (f'{{"model": "{model}", "messages": [{{"role": "user", "content": "Hello"}}], "max_tokens": 64}}'
            if chat else f'{{"model": "{model}", "prompt": "Hello", "max_tokens": 32}}')
    path = "/v1/chat/completions" if chat else "/v1/completions"
    return f"curl {runtime}{path} -H 'Content-Type: application/json' -d '{body}'"


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
               runtime_url: str | None = None, dtype: Dtype = "bfloat16", gguf: OutType | None = None) -> Deployment:
        """Publish; with `runtime_url`, load it there — `"local"`: into this host's managed runtime for the
        adapter's base, started as a `runtime` job when none runs. With `gguf`, the version also holds the adapter
        as a GGUF LoRA of that type, checked against the base it was trained on (its own `.gguf` file when it came
        from one); an adapter llama.cpp cannot apply is refused and nothing is published."""
        runtime = check_url(runtime_url, allowed=self.settings.runtime_hosts) \
            if runtime_url and runtime_url != LOCAL else None
        outtype = check_outtype(gguf) if gguf is not None else None
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
        gguf_base, write_gguf = None, None
        if outtype is not None:  # checked before anything is converted or published
            gguf_base = base_for(source.base_model or read_adapter_config(source.folder).base_model, self.settings)
            check_exportable(source.folder, gguf_base)

            def write_gguf(folder: Path) -> str:
                return export(source.folder, gguf_base, folder / GGUF_FILE, outtype=outtype, name=name).outtype
        with about("name", instead_of=("model",)):
            manifest, created = self.store.publish(source.folder, name, version=version, alias=alias, dtype=dtype,
                                                   base_config=base_config, source_job=job.job_id if job else None,
                                                   metrics=metrics, training_base=trained, gguf=write_gguf)
        pinned = f"{manifest.name}@{manifest.version}"
        model = f"{manifest.name}:{alias}" if alias else pinned  # what the caller asked to serve, echoed
        uri = self.store.path(manifest.name, manifest.version)
        loaded, swap_ms, runtime_job = False, None, None
        if runtime_url == LOCAL:
            runtime, runtime_job = self.local_runtime(manifest.base_model, quantization_of(manifest))
        if runtime:
            swap_ms = post_load(runtime, pinned, str(uri))  # a folder: what vLLM takes too
            loaded = True
        chat = self._chat_trained(job, manifest)
        return Deployment(name=manifest.name, version=manifest.version, created=created, uri=str(uri),
                          sha256=manifest.files["adapter_model.safetensors"].sha256, bytes=manifest.bytes,
                          model=model, chat=chat, loaded=loaded, swap_ms=swap_ms, manifest=manifest,
                          curl=sample_request(runtime or "http://127.0.0.1:8001", model, chat), runtime=runtime,
                          runtime_job=runtime_job,
                          gguf=self._gguf(manifest, uri, gguf_base, source.base_model))

    def _gguf(self, manifest: Manifest, uri: Path, base: GgufBase | None, base_model: str | None
              ) -> GgufDeployment | None:
        """The version's GGUF export, when it holds one (asked for now, or published so before), and its lines."""
        if GGUF_FILE not in manifest.files:
            return None
        if base is None:
            try:
                base = base_for(base_model or manifest.base_model, self.settings)
            except FtsError:  # its base is not readable here: the file is there, its lines cannot be written
                return None
        stored = manifest.files[GGUF_FILE]
        use = usage(uri / GGUF_FILE, base, manifest.name)
        return GgufDeployment(path=str(uri / GGUF_FILE), sha256=stored.sha256, bytes=stored.bytes,
                              outtype=manifest.gguf_outtype or "", base_gguf=base.gguf_file,
                              **use.model_dump(exclude={"notes"}), notes=use.notes + notes_for(manifest.training_base))

    def _chat_trained(self, job: Job | None, manifest: Manifest) -> bool:
        """Whether the adapter learned from chats (its training job says; a store version names that job)."""
        if job is None and manifest.source_job:
            try:
                job = self.jobs.get(manifest.source_job, log_lines=0)
            except JobNotFound:
                return False
        return job is not None and job.spec.get("dataset_format") == "chat"

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
            job = self._find_runtime(base, quantization)
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
            if job.state == JobState.QUEUED and job.waiting not in (None, "starting"):  # say so now, not later
                raise FtsError(f"the managed runtime {job.job_id} is queued: {job.waiting}", param="runtime_url")
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
        """Through a runtime: the one at `runtime_url`, `"local"` (this host's managed runtime for the model's base),
        or, with no `runtime_url`, a managed runtime already serving that base. Otherwise a one-shot job, which is
        cancelled if it outlives `timeout` or its caller; it also takes a training job id or an adapter folder."""
        if (prompt is None) == (messages is None):
            raise InvalidArgument("give prompt (text) or messages (a chat), exactly one", param="prompt")
        runtime = await anyio.to_thread.run_sync(lambda: self._runtime_for(model, runtime_url, base_model))
        if runtime is not None:
            answer = await anyio.to_thread.run_sync(
                lambda: post_generate(runtime, model, prompt, messages, max_tokens, temperature, timeout))
            return Generation(model=model, via="runtime", **answer)
        spec = await anyio.to_thread.run_sync(lambda: self._generate_spec(model, prompt, messages, max_tokens,
                                                                          temperature, base_model))
        job = await anyio.to_thread.run_sync(lambda: self.jobs.submit("generate", spec, model=spec.base_model))
        finished = False
        try:
            if job.state == JobState.QUEUED:  # behind other work: wait a little, then say behind what
                job = await watch(lambda: self.jobs.get(job.job_id, log_lines=0),
                                  wait_seconds=min(timeout, QUEUE_PATIENCE_SECONDS))
                if job.state == JobState.QUEUED:
                    raise FtsError(f"generate job {job.job_id} is {job.waiting or 'queued'}; it was cancelled rather "
                                   "than wait. deploy_adapter(runtime_url='local') serves tries from a runtime",
                                   param="model")
            job = await watch(lambda: self.jobs.get(job.job_id, log_lines=0), wait_seconds=timeout,
                              until_terminal=True)
            finished = job.state.terminal
        finally:
            if not finished:  # timed out, or the caller gave up: leave no job behind
                with anyio.CancelScope(shield=True):
                    await anyio.to_thread.run_sync(self.jobs.cancel, job.job_id)
        if not finished:
            where = f" ({job.waiting})" if job.state == JobState.QUEUED and job.waiting else ""
            raise FtsError(f"generate job {job.job_id} was still {job.state}{where} after {timeout:g}s and was "
                           "cancelled; deploy_adapter(runtime_url='local') serves repeated tries from a runtime",
                           param="timeout_seconds")
        if job.state != JobState.SUCCEEDED:
            message = job.error.message if job.error else job.state
            raise FtsError(f"generate job {job.job_id} {job.state}: {message}", param="model")
        return Generation(text=job.artifacts.text or "", model=model, finish_reason=job.artifacts.finish_reason,
                          via="job", job_id=job.job_id)

    def _runtime_for(self, model: str, runtime_url: str | None, base_model: str | None) -> str | None:
        """The runtime URL to ask, or None for a one-shot job."""
        if runtime_url not in (None, LOCAL):
            return check_url(runtime_url, allowed=self.settings.runtime_hosts)
        one_shot_only = JOB_ID_RE.fullmatch(model) is not None or looks_like_path(model)
        if one_shot_only:
            if runtime_url == LOCAL:
                raise InvalidArgument(f"a runtime serves adapters from the store; publish {model} with "
                                      "deploy_adapter(runtime_url='local') first, or leave runtime_url out for a "
                                      "one-shot job", param="runtime_url")
            return None
        if model == "base":
            base, quantization = base_model, "none"
        else:  # a store reference, or a stack of them: the runtime for the base its last term was trained on
            manifest = store_source(self.settings).resolve(model.split("+")[-1].split("*")[-1].strip(), param="model")
            base, quantization = base_model or manifest.base_model, quantization_of(manifest)
        if runtime_url == LOCAL:
            if base is None:
                running = [j for j in self._running_runtimes() if j.progress.url]
                if len(running) != 1:
                    bases = ", ".join(j.spec["base_model"] for j in running) or "none runs"
                    raise InvalidArgument(f"model 'base' needs base_model to choose a managed runtime ({bases})",
                                          param="base_model")
                return running[0].progress.url
            return self.local_runtime(base, quantization)[0]
        if base is None:
            return None
        serving = self._find_runtime(resolve_model_argument(base, self.settings), quantization)
        return serving.progress.url if serving is not None and serving.state == JobState.RUNNING else None

    def _running_runtimes(self) -> list[Job]:
        return [j for j in (self.jobs.get(i, log_lines=0) for i in self.jobs.ids_in(JobState.RUNNING))
                if j.kind == "runtime"]

    def _find_runtime(self, base: str, quantization: Quantization) -> Job | None:
        """The managed runtime job (running, or about to) serving `base` loaded as `quantization`."""
        live = (self.jobs.get(i, log_lines=0) for i in
                self.jobs.ids_in(JobState.RUNNING, JobState.QUEUED, JobState.VALIDATING))
        return next((j for j in live if j.kind == "runtime" and j.spec["base_model"] == base
                     and j.spec.get("quantization", "none") == quantization), None)

    def _generate_spec(self, model: str, prompt: str | None, messages: list[dict] | None, max_tokens: int,
                       temperature: float, base_model: str | None) -> GenerateJobSpec:
        adapter_dir, base, quantization = None, base_model, "none"
        if model != "base":  # a store reference, a training job id or an adapter folder
            source = resolve_adapter(model, self.settings, self.jobs, param="model")
            adapter_dir = str(source.folder)
            base = base or source.base_model or read_adapter_config(source.folder, param="model").base_model
            trained = training_base(source, self.jobs, param="model")
            quantization = trained.quantization if trained is not None else "none"
        if base is None:
            raise InvalidArgument("model 'base' needs base_model" if model == "base" else
                                  f"{model} does not name its base model; pass base_model", param="base_model")
        return GenerateJobSpec(base_model=resolve_model_argument(base, self.settings), adapter_dir=adapter_dir,
                               model=model, prompt=prompt, messages=messages, max_tokens=max_tokens,
                               temperature=temperature, quantization=quantization,
                               trust_remote_code=self.settings.trust_remote_code)
