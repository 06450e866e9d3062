"""The one resolver for an adapter argument: a succeeded training job id, a store reference (`name`,
`name@v2`, `name:prod`) or an adapter folder inside the roots, and the base it was trained on. Used by merge,
evaluate, deploy and generate."""

from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

from fts_mcp.adapters.sources import StoreSource
from fts_mcp.adapters.store import Manifest
from fts_mcp.config import Settings
from fts_mcp.errors import InvalidArgument, JobNotFound, about
from fts_mcp.jobs.records import Job
from fts_mcp.jobs.service import Jobs
from fts_mcp.jobs.states import JOB_ID_RE, JobState
from fts_mcp.models.base import TrainingBase, read_training_base
from fts_mcp.models.refs import looks_like_path
from fts_mcp.paths import resolve_inside


class ResolvedAdapter(NamedTuple):
    folder: Path
    job: Job | None = None  # the training job that made it, when the argument was a job id
    manifest: Manifest | None = None  # its store manifest, when the argument was a store reference

    @property
    def base_model(self) -> str | None:
        """The base it was trained on, as the job or the store recorded it."""
        if self.job is not None:
            return self.job.spec.get("base_model")
        return self.manifest.base_model if self.manifest is not None else None


def store_source(settings: Settings) -> StoreSource:
    return StoreSource(settings.store, settings.edge_cache)


def resolve_adapter(ref: str, settings: Settings, jobs: Jobs, *, param: str = "adapter",
                    store: bool = True) -> ResolvedAdapter:
    """The folder an adapter argument names, checked: a job must be a succeeded training job, a store version
    is verified against its manifest, a folder must lie inside the roots."""
    if JOB_ID_RE.fullmatch(ref):
        with about(param, instead_of=("job_id",)):
            job = jobs.get(ref, log_lines=0)
        if job.kind != "train" or job.state != JobState.SUCCEEDED or not job.artifacts.adapter_dir:
            raise InvalidArgument(f"job {ref} is a {job.state} {job.kind} job; expected a succeeded training job, "
                                  "a store reference or an adapter folder", param=param)
        return ResolvedAdapter(Path(job.artifacts.adapter_dir), job=job)
    if store and not looks_like_path(ref):
        source = store_source(settings)
        with about(param):
            manifest = source.resolve(ref, param=param)
            return ResolvedAdapter(source.folder(manifest), manifest=manifest)
    return ResolvedAdapter(resolve_inside(ref, settings.roots, param=param))


def training_base(source: ResolvedAdapter, jobs: Jobs, *, param: str = "adapter") -> TrainingBase | None:
    """The base an adapter was trained on: as its folder records it, else its store manifest, else its training
    job's spec (adapters trained before the record existed); None when nothing says."""
    recorded = read_training_base(source.folder, param=param)
    if recorded is not None:
        return recorded
    if source.manifest is not None and source.manifest.training_base is not None:
        return source.manifest.training_base
    job = source.job
    if job is None and source.manifest is not None and source.manifest.source_job:
        try:
            job = jobs.get(source.manifest.source_job, log_lines=0)
        except JobNotFound:
            job = None
    quantization = job.spec.get("quantization") if job is not None and job.kind == "train" else None
    return TrainingBase(quantization=quantization) if quantization in ("nf4", "none") else None
