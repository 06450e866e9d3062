"""Merging from the caller's side: check everything cheap (files, shapes, ranks, names) and submit a `merge`
job, or return the job that already produced the same result. Pure Python; the merge runs in a worker."""

from __future__ import annotations

import hashlib
import json
import math
import re
from pathlib import Path
from typing import Literal

from fts_mcp.adapters.inspect import AdapterInfo, check_fits_base, read_adapter
from fts_mcp.adapters.resolve import ResolvedAdapter, resolve_adapter, training_base
from fts_mcp.adapters.spec import (
    EQUAL_RANKS,
    NEEDS_DENSITY,
    AdapterSource,
    Combination,
    Dtype,
    EvalJobSpec,
    EvalPart,
    EvalSplit,
    MergeJobSpec,
    WeightedAdapter,
)
from fts_mcp.config import Settings
from fts_mcp.datafiles import require_valid
from fts_mcp.errors import FtsError, InvalidArgument, JobNotFound
from fts_mcp.files import sha256_file
from fts_mcp.jobs.records import Job
from fts_mcp.jobs.service import Jobs
from fts_mcp.jobs.states import JOB_ID_RE, JobState
from fts_mcp.models.architecture import from_config, read_config
from fts_mcp.models.refs import hub_offline, resolve_model_argument
from fts_mcp.names import check_output_name
from fts_mcp.paths import resolve_inside

IN_FLIGHT = (JobState.VALIDATING, JobState.QUEUED, JobState.RUNNING)


class Merging:
    def __init__(self, settings: Settings, jobs: Jobs) -> None:
        self.settings = settings
        self.jobs = jobs

    def merge(self, adapter: str | None = None, *, adapters: list[WeightedAdapter | dict] | None = None,
              base_model: str | None = None, output_name: str | None = None, dtype: Dtype = "bfloat16",
              verify: bool = True, combination: Combination = "cat", density: float | None = None,
              output: Literal["model", "adapter"] = "model",
              base_weights: Literal["trained", "original"] = "trained") -> Job:
        if (adapter is None) == (adapters is None):
            raise InvalidArgument("give adapter (one) or adapters (a weighted list), exactly one of them",
                                  param="adapter")
        entries = [WeightedAdapter(adapter=adapter)] if adapter is not None else \
            [WeightedAdapter.model_validate(entry) for entry in adapters]
        if not entries:
            raise InvalidArgument("adapters is empty; list at least two {adapter, weight} entries", param="adapters")
        several = adapters is not None
        params = [f"adapters[{i}].adapter" if several else "adapter" for i in range(len(entries))]
        sources: list[ResolvedAdapter] = []
        infos: list[AdapterInfo] = []
        for entry, param in zip(entries, params, strict=True):
            source = resolve_adapter(entry.adapter, self.settings, self.jobs, param=param)
            sources.append(source)
            infos.append(read_adapter(source.folder, param=param))
        if several:
            check_combination(combination, density, infos)
        elif output == "adapter":
            raise InvalidArgument("output='adapter' combines several adapters; one adapter is already an adapter",
                                  param="output")
        declared = next((s.base_model for s in sources if s.base_model), None) or infos[0].base_model
        if base_model is None and declared is None:
            raise InvalidArgument("the adapter does not name its base model; pass base_model", param="base_model")
        model = resolve_model_argument(base_model or declared, self.settings)
        config, config_path = read_config(model, self.settings.roots, hub_offline(self.settings.env))
        arch = from_config(config, source=config_path)
        for info, param in zip(infos, params, strict=True):
            check_fits_base(info, arch, base=model, param=param)
        first = sources[0]
        name = check_output_name(output_name or default_name(first))
        spec_sources = [
            AdapterSource(path=str(s.folder), weight=e.weight, job_id=s.job.job_id if s.job else None,
                          trained_quantization=base.quantization if (base := training_base(s, self.jobs, param=p))
                          else None,
                          r=info.r, alpha=info.alpha, sha256=info.sha256)
            for s, e, info, p in zip(sources, entries, infos, params, strict=True)]
        combination_used = combination if several else None
        key = hashlib.sha256(json.dumps({
            "adapters": [(s.sha256, s.weight) for s in spec_sources], "base": model,
            "base_config": sha256_file(Path(config_path)), "dtype": dtype, "combination": combination_used,
            "density": density if several else None, "output": output, "base_weights": base_weights},
            sort_keys=True).encode()).hexdigest()
        out = self.settings.home / ("models" if output == "model" else "adapters") / name
        if (existing := self._existing(out, key)) is not None:
            return existing
        spec = MergeJobSpec(adapters=spec_sources, base_model=model, dtype=dtype, verify=verify,
                            combination=combination_used, density=density if several else None, output=output,
                            output_name=name, output_dir=str(out), inputs_key=key, base_weights=base_weights,
                            trust_remote_code=self.settings.trust_remote_code,
                            training_metrics=None if several else self._training_metrics(first))
        out.parent.mkdir(parents=True, exist_ok=True)
        return self.jobs.submit("merge", spec, model=model)

    def _training_metrics(self, source: ResolvedAdapter) -> dict | None:
        """The training job's final figures, for the merged model's card."""
        if source.job is None or not source.job.artifacts.metrics:
            return None
        path = Path(source.job.artifacts.metrics)
        if not path.is_file():
            return None
        metrics = json.loads(path.read_text())
        metrics.pop("log_history", None)
        metrics.setdefault("dataset", source.job.spec.get("dataset"))
        return metrics

    def _existing(self, out: Path, key: str) -> Job | None:
        """The job behind an identical earlier merge (succeeded or in flight); a different one under the name
        is refused. An identical output whose job did not succeed (killed after publishing it, or no longer on
        record) is not the answer: a fresh job reuses that output (`merge.published`)."""
        published = False
        if (out / "merge.json").is_file():
            try:
                manifest = json.loads((out / "merge.json").read_text())
            except OSError as exc:
                raise FtsError(f"{out / 'merge.json'} cannot be read ({exc}); choose another output_name or fix its "
                               "permissions", param="output_name") from exc
            except ValueError:  # bytes that are not JSON: a file that is no merge's record
                manifest = None
            if not isinstance(manifest, dict):
                raise InvalidArgument(f"{out} already exists and was not written by a merge (its merge.json is not "
                                      "a merge's record); nothing was overwritten: choose another output_name",
                                      param="output_name")
            if manifest.get("inputs_key") != key:
                raise InvalidArgument(f"{out} already holds a merge of different inputs; choose another output_name",
                                      param="output_name")
            try:
                earlier = self.jobs.get(manifest.get("job_id"), log_lines=0)
            except (InvalidArgument, JobNotFound):  # not a job id, or not on record (a rebuilt database...)
                earlier = None
            if earlier is not None and earlier.state in (JobState.SUCCEEDED, *IN_FLIGHT):
                return earlier
            published = True
        for job_id in self.jobs.ids_in(*IN_FLIGHT):
            job = self.jobs.get(job_id, log_lines=0)
            if job.kind == "merge" and job.spec["output_dir"] == str(out):
                if job.spec["inputs_key"] == key:
                    return job
                raise InvalidArgument(f"merge job {job_id} is already writing {out} from different inputs; choose "
                                      "another output_name", param="output_name")
        if out.exists() and not published:
            raise InvalidArgument(f"{out} exists and was not written by a merge; choose another output_name",
                                  param="output_name")
        return None


class Evaluating:
    """Submit `eval` jobs: the base against the base with an adapter (or a merged model) on held-out data."""

    def __init__(self, settings: Settings, jobs: Jobs) -> None:
        self.settings = settings
        self.jobs = jobs

    def evaluate(self, adapter: str | None = None, *, merged_model: str | None = None, dataset: str | None = None,
                 base_model: str | None = None, answer_format: Literal["json"] | None = None,
                 regex: str | None = None, max_examples: int = 50, samples: int = 3,
                 max_new_tokens: int = 64) -> Job:
        if (adapter is None) == (merged_model is None):
            raise InvalidArgument("give adapter (a training job, store reference or adapter folder) or merged_model "
                                  "(a merged model folder), exactly one", param="adapter")
        if regex is not None and answer_format is not None:
            raise InvalidArgument("give answer_format or regex, not both (a regex can require JSON too)",
                                  param="regex")
        if regex is not None:
            try:
                re.compile(regex)
            except re.error as exc:
                raise InvalidArgument(f"{regex[:80]!r} is not a regular expression: {exc}", param="regex") from None
        split, declared, quantization = None, None, "none"
        parts: list[EvalPart] = []
        skipped: list[str] = []
        adapter_dir = merged_dir = None
        if adapter is not None:
            source = resolve_adapter(adapter, self.settings, self.jobs)
            info = read_adapter(source.folder)
            adapter_dir, declared = str(source.folder), source.base_model or info.base_model
            trained = training_base(source, self.jobs)
            quantization = trained.quantization if trained is not None else "none"
            if dataset is None and (split := eval_split(source.job)) is not None:
                dataset = source.job.spec["dataset"]
            combined = merge_record(source.folder)
            if combined.get("output") == "adapter" and isinstance(recorded := combined.get("adapters"), list) \
                    and len(recorded) > 1:
                parts, skipped = self._parts(recorded)
        else:
            folder = resolve_inside(merged_model, self.settings.roots, param="merged_model")
            if not (folder / "config.json").is_file():
                raise InvalidArgument(f"{folder} has no config.json: expected a merged model folder",
                                      param="merged_model")
            merged_from = merge_record(folder)
            merged_dir, declared = str(folder), base if isinstance(base := merged_from.get("base_model"), str) else None
            adapters = merged_from.get("adapters")
            if merged_from.get("base_weights", "original") == "trained" and isinstance(adapters, list) and adapters \
                    and all(isinstance(a, dict) and a.get("trained_quantization") == "nf4" for a in adapters):
                quantization = "nf4"  # merged into the NF4 weights: the base it is compared with is that one
        if dataset is None and (parts or skipped):
            raise InvalidArgument("give dataset: a held-out JSONL file of the combined task (each part is also "
                                  "scored on its own training job's data)", param="dataset")
        if dataset is None:
            raise InvalidArgument("give dataset: a held-out JSONL file (the training job kept no eval split; train "
                                  "with training.eval_fraction to have one)", param="dataset")
        file = resolve_inside(dataset, self.settings.roots, param="dataset")
        require_valid(file)
        if base_model is None and declared is None:
            raise InvalidArgument("the adapter does not name its base model; pass base_model", param="base_model")
        model = resolve_model_argument(base_model or declared, self.settings)
        spec = EvalJobSpec(base_model=model, adapter_dir=adapter_dir, adapter_ref=adapter, merged_dir=merged_dir,
                           dataset=str(file), quantization=quantization, parts=parts, parts_skipped=skipped,
                           split=split, answer_format=answer_format, regex=regex, max_examples=max_examples,
                           samples=samples, max_new_tokens=max_new_tokens,
                           trust_remote_code=self.settings.trust_remote_code)
        return self.jobs.submit("eval", spec, model=model)

    def _parts(self, recorded: list) -> tuple[list[EvalPart], list[str]]:
        """The adapters a combined adapter was merged from, each with data of its own task: its training job's
        eval split, else that job's dataset; those without a training job on record are listed with the reason."""
        parts, skipped = [], []
        for i, entry in enumerate(recorded):
            label = f"adapters[{i}]"
            job_id = entry.get("job_id") if isinstance(entry, dict) else None
            if not isinstance(job_id, str) or not JOB_ID_RE.fullmatch(job_id):
                path = entry.get("path") if isinstance(entry, dict) else None
                skipped.append(f"{label} ({path}) was merged from a folder or store reference: no training job on "
                               "record to take its data from")
                continue
            try:
                source = resolve_adapter(job_id, self.settings, self.jobs, param=label)
                read_adapter(source.folder, param=label)
                file = resolve_inside(source.job.spec["dataset"], self.settings.roots, param=label)
                require_valid(file)
            except FtsError as exc:
                skipped.append(f"{label} ({job_id}): {exc.message}")
                continue
            parts.append(EvalPart(name=job_id, adapter_dir=str(source.folder), dataset=str(file),
                                  split=eval_split(source.job)))
        return parts, skipped


def eval_split(job: Job | None) -> EvalSplit | None:
    """A training job's held-out split (its trainer's fraction and seed: the same rows), when it kept one."""
    if job is None:
        return None
    training = job.spec.get("training", {})
    if not math.floor(job.spec.get("dataset_examples", 0) * training.get("eval_fraction", 0)):
        return None
    return EvalSplit(fraction=training["eval_fraction"], seed=training.get("seed", 42))


def merge_record(folder: Path) -> dict:
    """The spec a merged model folder records in merge.json (empty when absent or unreadable: it is only a hint)."""
    try:
        spec = json.loads((folder / "merge.json").read_text()).get("spec")
    except (OSError, ValueError, AttributeError):
        return {}
    return spec if isinstance(spec, dict) else {}


def default_name(source: ResolvedAdapter) -> str:
    """<job folder>-merged, <name>-<version>-merged, or <folder>-merged."""
    if source.job is not None:
        stem = source.folder.parent.name
    elif source.manifest is not None:
        stem = f"{source.manifest.name}-{source.manifest.version}"
    else:
        stem = source.folder.name
    return f"{stem}-merged"[-64:].lstrip("._-")


def check_combination(combination: str, density: float | None, infos: list[AdapterInfo]) -> None:
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
