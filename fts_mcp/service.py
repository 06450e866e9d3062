"""The typed core the MCP tools and the CLI both call. Never imports `mcp` (nor torch).

Each public method is one operation an agent or a person can ask for; arguments are checked here and bad
ones raise `FtsError` subclasses naming the argument and what would be accepted.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Literal, NamedTuple

from pydantic import BaseModel, Field

from fts_mcp.adapters.inspect import AdapterInfo, check_fits_base, read_adapter
from fts_mcp.adapters.spec import (
    EQUAL_RANKS,
    NEEDS_DENSITY,
    AdapterSource,
    Combination,
    Dtype,
    MergeJobSpec,
    WeightedAdapter,
)
from fts_mcp.config import Settings
from fts_mcp.datasets import DatasetReport, TokenStats, require_valid, validate_dataset
from fts_mcp.edge.sources import StoreSource
from fts_mcp.edge.store import AdapterStore, Manifest, StoreDtype, StoreEntry, store_root
from fts_mcp.errors import FtsError, InvalidArgument, JobNotFound, ModelUnavailable
from fts_mcp.hub import check_available, hub_offline, looks_like_path, resolve_model_argument
from fts_mcp.io import sha256_file
from fts_mcp.jobs.models import Job, JobError, JobList
from fts_mcp.jobs.runner import Runner
from fts_mcp.jobs.states import JOB_ID_RE, JobState, check_job_id
from fts_mcp.jobs.store import JobStore
from fts_mcp.paths import resolve_inside
from fts_mcp.planning.advice import Advice, Criteria, recommend
from fts_mcp.planning.architecture import Architecture, from_config, read_config
from fts_mcp.planning.estimate import METHODS, MethodChoice, ResourceEstimate, estimate, shape_for_params
from fts_mcp.planning.estimate import Settings as EstimateSettings
from fts_mcp.planning.gpus import find_gpu
from fts_mcp.training.checkpoints import latest_checkpoint
from fts_mcp.training.spec import OUTPUT_NAME_RE, LoraSpec, TrainingSpec, TrainJobSpec

DEFAULT_TOKENS_PER_EXAMPLE = 512


class _Source(NamedTuple):
    path: str
    weight: float
    job_id: str | None
    quantization: str | None
    base: str | None


RESUMABLE_FROM = (JobState.CANCELLED, JobState.INTERRUPTED, JobState.SUCCEEDED, JobState.FAILED)


class FineTuneService:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.store = JobStore(settings)
        self.runner = Runner(settings, self.store)

    def close(self) -> None:
        self.store.close()

    # ---- data ----------------------------------------------------------------------------------------------

    def validate_dataset(self, path: str, base_model: str | None = None, max_seq_len: int = 2048) -> DatasetReport:
        file = resolve_inside(path, self.settings.roots, param="path")
        report = validate_dataset(file)
        if base_model is not None and report.ok:
            model = resolve_model_argument(base_model, self.settings)
            check_available(model, self.settings)
            report.token_stats = self._token_stats(model, file, max_seq_len)
            if report.token_stats.over_max_seq_len:
                report.warnings.append(f"{report.token_stats.over_max_seq_len} examples are longer than "
                                       f"max_seq_len={max_seq_len} and will be truncated")
        return report

    def _token_stats(self, model: str, file: Path, max_seq_len: int) -> TokenStats:
        command = [sys.executable, "-m", "fts_mcp.training.tokstats", model, str(file), str(max_seq_len)]
        if self.settings.trust_remote_code:
            command.append("--trust")
        try:
            done = subprocess.run(command, capture_output=True, text=True, timeout=600, check=False,
                                  env={**self.settings.env, "HF_HUB_DOWNLOAD_TIMEOUT": "30"})
        except subprocess.TimeoutExpired as exc:
            raise ModelUnavailable(f"loading the tokenizer of {model!r} took over 10 minutes", param="base_model") \
                from exc
        lines = done.stdout.strip().splitlines()
        answer = json.loads(lines[-1]) if lines else {"ok": False, "message": done.stderr.strip()[-500:]}
        if not answer["ok"]:
            raise ModelUnavailable(f"cannot load the tokenizer of {model!r}: {answer['message']}", param="base_model")
        return TokenStats(**answer["stats"])

    # ---- jobs ----------------------------------------------------------------------------------------------

    def start_training(self, base_model: str, dataset: str, *, output_name: str | None = None,
                       lora: LoraSpec | None = None, quantization: str = "nf4",
                       training: TrainingSpec | None = None, resume_from: str | None = None) -> Job:
        """Validate everything, then create a `train` job. A bad dataset raises with its line errors; no job."""
        if quantization not in ("nf4", "none"):
            raise InvalidArgument(f"{quantization!r} is not a quantization; use 'nf4' (QLoRA) or 'none' (16-bit LoRA)",
                                  param="quantization")
        file = resolve_inside(dataset, self.settings.roots, param="dataset")
        report = require_valid(file)
        model = resolve_model_argument(base_model, self.settings)
        lora = lora or LoraSpec()
        training = training or TrainingSpec()
        if output_name is not None and not OUTPUT_NAME_RE.match(output_name):
            raise InvalidArgument(f"{output_name!r}: use 1-64 letters, digits, '.', '_' or '-', starting with a letter "
                                  "or digit", param="output_name")
        name = output_name or f"{Path(model).name}-{file.stem}-lora"[:64]
        resume_checkpoint = None
        if resume_from is not None:
            resume_checkpoint = str(self._resume_point(check_job_id(resume_from, "resume_from"), model, lora))
        spec = TrainJobSpec(base_model=model, dataset=str(file), dataset_format=report.format,
                            dataset_examples=report.examples, output_name=name, lora=lora, quantization=quantization,
                            training=training, resume_checkpoint=resume_checkpoint, resumed_from_job=resume_from,
                            trust_remote_code=self.settings.trust_remote_code)
        job = self.store.create("train", spec.model_dump())
        try:
            check_available(model, self.settings)
        except FtsError as exc:  # the job stays on record, failed, with the reason
            return self.store.transition(job.job_id, JobState.FAILED,
                                         error=JobError(code=exc.code, message=exc.message, param=exc.param))
        self.store.transition(job.job_id, JobState.QUEUED)
        self.runner.tick()
        return self.store.get(job.job_id)

    def _resume_point(self, job_id: str, model: str, lora: LoraSpec) -> Path:
        old = self.store.get(job_id)
        if old.kind != "train" or old.state not in RESUMABLE_FROM:
            raise InvalidArgument(f"job {job_id} is a {old.state} {old.kind} job; resume_from takes a training job "
                                  "that is cancelled, interrupted, failed or succeeded", param="resume_from")
        if old.spec["base_model"] != model or LoraSpec(**old.spec["lora"]) != lora:
            raise InvalidArgument(f"job {job_id} trained {old.spec['base_model']} with lora={old.spec['lora']}; "
                                  "a resumed job must use the same base_model and lora settings", param="resume_from")
        checkpoint = latest_checkpoint(self.store.job_dir(job_id) / "checkpoints")
        if checkpoint is None:
            raise InvalidArgument(f"job {job_id} left no checkpoint to resume from (it stopped before its first save; "
                                  "lower training.checkpoint_every_steps next time)", param="resume_from")
        return checkpoint

    # ---- merging -------------------------------------------------------------------------------------------

    def merge_adapter(self, adapter: str | None = None, *, adapters: list[WeightedAdapter | dict] | None = None,
                      base_model: str | None = None, output_name: str | None = None, dtype: Dtype = "bfloat16",
                      verify: bool = True, combination: Combination = "cat", density: float | None = None,
                      output: Literal["model", "adapter"] = "model") -> Job:
        """Check everything cheap (files, shapes, ranks, names), then queue a `merge` job, or return the job that
        already produced the same result."""
        if (adapter is None) == (adapters is None):
            raise InvalidArgument("give adapter (one) or adapters (a weighted list), exactly one of them",
                                  param="adapter")
        entries = [WeightedAdapter(adapter=adapter)] if adapter is not None else \
            [WeightedAdapter.model_validate(entry) for entry in adapters]
        if not entries:
            raise InvalidArgument("adapters is empty; list at least two {adapter, weight} entries", param="adapters")
        several = adapters is not None
        sources, infos = [], []
        for i, entry in enumerate(entries):
            param = f"adapters[{i}].adapter" if several else "adapter"
            source, info = self._adapter_source(entry, param)
            sources.append(source)
            infos.append(info)
        if several:
            self._check_combination(combination, density, infos)
        elif output == "adapter":
            raise InvalidArgument("output='adapter' combines several adapters; one adapter is already an adapter",
                                  param="output")
        declared = next((s.base for s in sources if s.base), None) or infos[0].base_model
        if base_model is None and declared is None:
            raise InvalidArgument("the adapter does not name its base model; pass base_model", param="base_model")
        model = resolve_model_argument(base_model or declared, self.settings)
        config, config_path = read_config(model, self.settings.roots, hub_offline(self.settings.env))
        arch = from_config(config, source=config_path)
        for i, info in enumerate(infos):
            check_fits_base(info, arch, base=model, param=f"adapters[{i}].adapter" if several else "adapter")
        first = Path(sources[0].path)
        name = output_name or f"{first.parent.name if sources[0].job_id else first.name}-merged"
        if not OUTPUT_NAME_RE.match(name):
            raise InvalidArgument(f"{name!r}: use 1-64 letters, digits, '.', '_' or '-', starting with a letter or "
                                  "digit", param="output_name")
        spec_sources = [AdapterSource(path=s.path, weight=s.weight, job_id=s.job_id,
                                      trained_quantization=s.quantization, r=info.r, alpha=info.alpha,
                                      sha256=info.sha256) for s, info in zip(sources, infos, strict=True)]
        combination_used = combination if several else None
        key = hashlib.sha256(json.dumps({
            "adapters": [(s.sha256, s.weight) for s in spec_sources], "base": model,
            "base_config": sha256_file(Path(config_path)), "dtype": dtype, "combination": combination_used,
            "density": density if several else None, "output": output}, sort_keys=True).encode()).hexdigest()
        out = self.settings.home / ("models" if output == "model" else "adapters") / name
        if (existing := self._existing_merge(out, key)) is not None:
            return existing
        spec = MergeJobSpec(adapters=spec_sources, base_model=model, dtype=dtype, verify=verify,
                            combination=combination_used, density=density if several else None, output=output,
                            output_name=name, output_dir=str(out), inputs_key=key)
        out.parent.mkdir(parents=True, exist_ok=True)
        job = self.store.create("merge", spec.model_dump())
        try:
            check_available(model, self.settings)
        except FtsError as exc:
            return self.store.transition(job.job_id, JobState.FAILED,
                                         error=JobError(code=exc.code, message=exc.message, param=exc.param))
        self.store.transition(job.job_id, JobState.QUEUED)
        self.runner.tick()
        return self.store.get(job.job_id)

    def _adapter_source(self, entry: WeightedAdapter, param: str) -> tuple[_Source, AdapterInfo]:
        ref = entry.adapter
        if JOB_ID_RE.match(ref):
            job = self.store.get(ref, log_lines=0)
            if job.kind != "train" or job.state != JobState.SUCCEEDED or not job.artifacts.adapter_dir:
                raise InvalidArgument(f"job {ref} is a {job.state} {job.kind} job; merge takes a succeeded training "
                                      "job (or an adapter folder)", param=param)
            folder = Path(job.artifacts.adapter_dir)
            source = _Source(str(folder), entry.weight, ref, job.spec.get("quantization"), job.spec.get("base_model"))
        elif not looks_like_path(ref):  # a store reference: name, name@v2, name:prod
            manifest = AdapterStore(store_root(self.settings)).resolve(ref, param=param)
            folder = StoreSource(str(store_root(self.settings)), self.settings.home / "edge-cache").folder(manifest)
            source = _Source(str(folder), entry.weight, None, self._trained_quantization(manifest.source_job),
                             manifest.base_model)
        else:
            folder = resolve_inside(ref, self.settings.roots, param=param)
            source = _Source(str(folder), entry.weight, None, None, None)
        return source, read_adapter(folder, param=param)

    def _trained_quantization(self, job_id: str | None) -> str | None:
        """How the base was loaded when the adapter was trained, if its training job is on record here."""
        try:
            return self.store.get(job_id, log_lines=0).spec.get("quantization") if job_id else None
        except JobNotFound:
            return None

    @staticmethod
    def _check_combination(combination: str, density: float | None, infos: list[AdapterInfo]) -> None:
        if len(infos) < 2:
            raise InvalidArgument("a combination needs at least two adapters", param="adapters")
        ranks = sorted({i.r for i in infos})
        if combination in EQUAL_RANKS and len(ranks) > 1:
            raise InvalidArgument(f"combination {combination!r} needs equal ranks, got r = {ranks}; use 'cat' or "
                                  "'svd', which take any ranks", param="combination")
        if combination in NEEDS_DENSITY and density is None:
            raise InvalidArgument(f"combination {combination!r} prunes each delta: give density in (0, 1], "
                                  "e.g. 0.5", param="density")
        if combination not in NEEDS_DENSITY and density is not None:
            raise InvalidArgument(f"density applies to {', '.join(sorted(NEEDS_DENSITY))}, not {combination!r}",
                                  param="density")

    def _existing_merge(self, out: Path, key: str) -> Job | None:
        """The job behind an identical earlier merge (finished or in flight); a different one under the name
        is refused."""
        if (out / "merge.json").is_file():
            manifest = json.loads((out / "merge.json").read_text())
            if manifest.get("inputs_key") == key:
                return self.store.get(manifest["job_id"])
            raise InvalidArgument(f"{out} already holds a merge of different inputs; choose another output_name",
                                  param="output_name")
        for job_id in self.store.ids_in(JobState.VALIDATING, JobState.QUEUED, JobState.RUNNING):
            job = self.store.get(job_id, log_lines=0)
            if job.kind == "merge" and job.spec["output_dir"] == str(out):
                if job.spec["inputs_key"] == key:
                    return job
                raise InvalidArgument(f"merge job {job_id} is already writing {out} from different inputs; choose "
                                      "another output_name", param="output_name")
        if out.exists():
            raise InvalidArgument(f"{out} exists and was not written by a merge; choose another output_name",
                                  param="output_name")
        return None

    def job_status(self, job_id: str, log_lines: int = 20) -> Job:
        return self.store.get(job_id, log_lines=log_lines)

    def list_jobs(self, state: str | None = None, limit: int = 20) -> JobList:
        if state is not None and state not in JobState.__members__.values():
            raise InvalidArgument(f"{state!r} is not a job state; use one of {', '.join(JobState)}", param="state")
        if not 1 <= limit <= 1000:
            raise InvalidArgument(f"limit must be between 1 and 1000, got {limit}", param="limit")
        return self.store.list(JobState(state) if state else None, limit)

    def cancel_job(self, job_id: str) -> Job:
        return self.runner.cancel(check_job_id(job_id))

    def resume_job(self, job_id: str) -> Job:
        return self.runner.resume(check_job_id(job_id))

    def job_log(self, job_id: str, max_bytes: int = 256 * 1024) -> str:
        check_job_id(job_id)
        self.store.get(job_id, log_lines=0)
        path = self.store.log_path(job_id)
        if not path.exists():
            return ""
        with path.open("rb") as fh:
            size = fh.seek(0, 2)
            fh.seek(max(0, size - max_bytes))
            return fh.read().decode("utf-8", "replace")

    def loss_curve(self, job_id: str) -> bytes:
        from fts_mcp.plots import loss_curve_png  # lazy: matplotlib is only loaded when a plot is asked for

        job = self.store.get(job_id, log_lines=0)
        return loss_curve_png(self.store.events(job_id, kind="progress"),
                              title=f"{job.spec.get('output_name', job.kind)} ({job_id})")


class PlanningService:
    """Planning answers: pure arithmetic and advice, plus reading a model's config.json (never its weights)."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings

    def recommend_ft_vs_rag(self, criteria: Criteria) -> Advice:
        return recommend(criteria)

    def estimate_resources(self, *, base_model: str | None = None, params: int | None = None,
                           shape: dict[str, int | None] | None = None, method: MethodChoice = "all",
                           settings: EstimateSettings, dataset_examples: int | None = None,
                           tokens_per_example: int | None = None, dataset_tokens: int | None = None,
                           epochs: float = 3.0, gpu: str | None = None, gpu_memory_gb: float | None = None,
                           price_per_gpu_hour: float | None = None, utilization: float | None = None
                           ) -> ResourceEstimate:
        shape = {k: v for k, v in (shape or {}).items() if v is not None}
        given = [name for name, present in (("base_model", base_model), ("params", params), ("layers...", shape))
                 if present]
        if len(given) != 1:
            raise InvalidArgument("give exactly one of base_model (folder or hub id), params (a parameter count) or "
                                  "the architecture numbers (layers, hidden, intermediate, heads, kv_heads, vocab); "
                                  f"got {', '.join(given) or 'none'}", param="base_model")
        if base_model is not None:
            config, source = read_config(base_model, self.settings.roots, hub_offline(self.settings.env))
            arch, model = from_config(config, source=source), base_model
        elif params is not None:
            arch, name = shape_for_params(params)
            model, source = f"{params / 1e9:.1f}B parameters", f"assumed: {name} shape (nearest parameter count)"
        else:
            needed = ("layers", "hidden", "intermediate", "heads", "vocab")
            missing = [k for k in needed if k not in shape]
            if missing:
                raise InvalidArgument(f"explicit architecture needs {', '.join(needed)} (kv_heads defaults to heads); "
                                      f"missing {', '.join(missing)}", param=missing[0])
            shape.setdefault("kv_heads", shape["heads"])
            arch, model, source = Architecture(**shape), "explicit architecture", "explicit"
        if gpu is not None and gpu_memory_gb is not None:
            raise InvalidArgument("give gpu (a known card) or gpu_memory_gb (any card), not both", param="gpu")
        card = find_gpu(gpu) if gpu is not None else None
        if dataset_tokens is not None and dataset_examples is not None:
            raise InvalidArgument("give dataset_examples (with tokens_per_example) or dataset_tokens, not both",
                                  param="dataset_tokens")
        tokens = dataset_tokens
        if dataset_examples is not None:
            tokens = dataset_examples * (tokens_per_example or min(settings.seq_len, DEFAULT_TOKENS_PER_EXAMPLE))
        training_tokens = int(tokens * epochs) if tokens is not None else None
        methods = METHODS if method == "all" else (method,)
        return estimate(arch, model=model, shape_source=source, methods=methods, settings=settings, gpu=card,
                        gpu_memory_gb=gpu_memory_gb, price_per_gpu_hour=price_per_gpu_hour,
                        training_tokens=training_tokens, utilization=utilization)


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
    usage: dict[str, int] | None = None


class EdgeService:
    """Publishing adapters to the edge store, loading them into runtimes, and trying them."""

    def __init__(self, jobs: FineTuneService) -> None:
        self.jobs = jobs
        self.settings = jobs.settings
        self.store = AdapterStore(store_root(self.settings))

    def _adapter_folder(self, ref: str, param: str = "adapter") -> tuple[Path, Job | None]:
        if JOB_ID_RE.match(ref):
            job = self.jobs.store.get(ref, log_lines=0)
            if job.kind != "train" or job.state != JobState.SUCCEEDED or not job.artifacts.adapter_dir:
                raise InvalidArgument(f"job {ref} is a {job.state} {job.kind} job; deploy a succeeded training job "
                                      "or an adapter folder", param=param)
            return Path(job.artifacts.adapter_dir), job
        return resolve_inside(ref, self.settings.roots, param=param), None

    def deploy(self, adapter: str, name: str, *, version: str | None = None, alias: str | None = None,
               runtime_url: str | None = None, dtype: StoreDtype = "bfloat16") -> Deployment:
        runtime = check_url(runtime_url) if runtime_url else None
        folder, job = self._adapter_folder(adapter)
        metrics = None
        base_config = None
        if job is not None:
            metrics_path = self.jobs.store.job_dir(job.job_id) / "metrics.json"
            if metrics_path.exists():
                metrics = {k: v for k, v in json.loads(metrics_path.read_text()).items() if k != "log_history"}
            if Path(job.spec["base_model"]).is_absolute():
                base_config = Path(job.spec["base_model"]) / "config.json"
        manifest, created = self.store.publish(folder, name, version=version, alias=alias, dtype=dtype,
                                               base_config=base_config, source_job=job.job_id if job else None,
                                               metrics=metrics)
        model = f"{manifest.name}@{manifest.version}"
        uri = self.store.root / manifest.name / manifest.version
        loaded, swap_ms = False, None
        if runtime:
            swap_ms = post_load(runtime, model, str(uri))
            loaded = True
        curl = (f"curl {runtime or 'http://127.0.0.1:8001'}/v1/completions -H 'Content-Type: application/json' "
                f"-d '{{\"model\": \"{model}\", \"prompt\": \"Hello\", \"max_tokens\": 32}}'")
        return Deployment(name=manifest.name, version=manifest.version, created=created, uri=str(uri),
                          sha256=manifest.files["adapter_model.safetensors"].sha256, bytes=manifest.bytes,
                          model=model, loaded=loaded, swap_ms=swap_ms, curl=curl, manifest=manifest)

    def list_adapters(self, name: str | None = None) -> list[StoreEntry]:
        return self.store.entries(name)

    def generate(self, model: str, *, prompt: str | None = None, messages: list[dict] | None = None,
                 max_tokens: int = 64, temperature: float = 0.0, runtime_url: str | None = None,
                 base_model: str | None = None, timeout: float = 600) -> Generation:
        if (prompt is None) == (messages is None):
            raise InvalidArgument("give prompt (text) or messages (a chat), exactly one", param="prompt")
        if runtime_url:
            return post_generate(check_url(runtime_url), model, prompt, messages, max_tokens, temperature)
        adapter_dir, base = None, base_model
        if model != "base":
            manifest = self.store.resolve(model, param="model")
            adapter_dir = str(StoreSource(str(self.store.root), self.settings.home / "edge-cache").folder(manifest))
            base = base or manifest.base_model
        if base is None:
            raise InvalidArgument("model 'base' needs base_model", param="base_model")
        base = resolve_model_argument(base, self.settings)
        job = self.jobs.store.create("generate", {"base_model": base, "adapter_dir": adapter_dir, "model": model,
                                                  "prompt": prompt, "messages": messages, "max_tokens": max_tokens,
                                                  "temperature": temperature})
        self.jobs.store.transition(job.job_id, JobState.QUEUED)
        self.jobs.runner.tick()
        deadline = time.monotonic() + timeout
        while not (job := self.jobs.store.get(job.job_id)).state.terminal:
            if time.monotonic() > deadline:
                raise FtsError(f"generate job {job.job_id} did not finish within {timeout:.0f}s; follow it with "
                               "job_status", param="job_id")
            time.sleep(0.25)
        if job.state != JobState.SUCCEEDED:
            message = job.error.message if job.error else job.state
            raise FtsError(f"generate job {job.job_id} {job.state}: {message}", param="model")
        return Generation(text=job.artifacts.text or "", model=model, finish_reason=job.artifacts.finish_reason,
                          via="job", job_id=job.job_id)


def check_url(url: str) -> str:
    parsed = urllib.parse.urlparse(url)
    if parsed.scheme not in ("http", "https") or not parsed.netloc:
        raise InvalidArgument(f"{url!r} is not an http(s) URL such as http://127.0.0.1:8001", param="runtime_url")
    return url.rstrip("/")


def _post(url: str, body: dict, param: str) -> tuple[bytes, dict[str, str]]:
    request = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST",
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=600) as response:
            return response.read(), dict(response.headers)
    except urllib.error.HTTPError as exc:
        detail = exc.read().decode("utf-8", "replace")[:1000]
        try:
            detail = json.loads(detail)["error"]["message"]
        except (ValueError, KeyError, TypeError):
            pass
        raise InvalidArgument(f"{url} answered {exc.code}: {detail}", param=param) from exc
    except (urllib.error.URLError, TimeoutError, OSError) as exc:
        raise FtsError(f"cannot reach {url}: {exc}", param="runtime_url") from exc


def post_load(runtime: str, name: str, path: str) -> float:
    started = time.perf_counter()
    _, headers = _post(f"{runtime}/v1/load_lora_adapter", {"lora_name": name, "lora_path": path}, "runtime_url")
    reported = {k.lower(): v for k, v in headers.items()}.get("x-fts-load-ms")
    return float(reported) if reported else (time.perf_counter() - started) * 1000


def post_generate(runtime: str, model: str, prompt: str | None, messages: list[dict] | None, max_tokens: int,
                  temperature: float) -> Generation:
    chat = messages is not None
    body = {"model": model, "max_tokens": max_tokens, "temperature": temperature,
            **({"messages": messages} if chat else {"prompt": prompt})}
    raw, _ = _post(f"{runtime}/v1/{'chat/completions' if chat else 'completions'}", body, "model")
    answer = json.loads(raw)
    choice = answer["choices"][0]
    return Generation(text=choice["message"]["content"] if chat else choice["text"], model=model,
                      finish_reason=choice.get("finish_reason"), via="runtime", usage=answer.get("usage"))
