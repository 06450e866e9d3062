"""The merge recipe: load the base in 16 bits (never merge into 4), attach the adapter(s), verify, merge, save
atomically.

Which 16-bit weights: an adapter trained on the NF4 base (QLoRA) merges by default into those NF4 weights,
dequantized (`base_weights='trained'`), so the merged model is the model that was trained and evaluated; with
`base_weights='original'` it merges into the original 16-bit weights, and its difference from the NF4 base +
adapter it was trained on is reported, not hidden. `run(spec, ctx)` runs in a job's work horse and knows nothing
of the job store. Memory: one 16-bit copy of the base; PEFT merges in place. The merged folder carries the
tokenizer and chat template the adapter was trained with (saved beside it), so `apply_chat_template` works on it.

Safe to run again (resume_job, or a fresh job for the same inputs): everything is written and hashed in a staging
folder, `merge.json` (with each file's size and sha256) last, then one rename publishes it. A run that finds the
output of the same inputs already published reuses it (`published`) instead of merging again; one of the same
inputs with a file missing or cut short is replaced.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import Any

import torch
from peft import PeftModel

from fts_mcp.adapters.spec import MergeJobSpec
from fts_mcp.errors import FtsError
from fts_mcp.files import ArtifactFile, artifact_file, artifact_files, write_bytes_atomic, write_json_atomic
from fts_mcp.jobs.context import JobContext
from fts_mcp.jobs.records import Artifacts, Verification
from fts_mcp.models import loading
from fts_mcp.models.refs import companion_files

log = logging.getLogger(__name__)
# Allowed |merged - unmerged| logit difference: absolute + relative to the largest logit, per dtype.
TOLERANCE = {"float32": (1e-4, 1e-4), "float16": (2e-2, 1e-2), "bfloat16": (1e-1, 5e-2)}
PROBES = ["The quick brown fox jumps over the lazy dog.", "def fibonacci(n):\n    return",
          "Question: what does a LoRA adapter change?\nAnswer:", "Code word for apple:"]
MAX_SHARD = "5GB"
MANIFEST = "merge.json"


class VerificationFailed(FtsError):
    code = "verification_failed"


def probe_ids(tokenizer: Any) -> list[torch.Tensor]:
    return [torch.tensor([tokenizer(text)["input_ids"]], device=loading.device()) for text in PROBES]


@torch.no_grad()
def logits(model: Any, probes: list[torch.Tensor]) -> list[torch.Tensor]:
    return [model(input_ids=ids).logits.float().cpu() for ids in probes]


def max_diff(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    return max((x - y).abs().max().item() for x, y in zip(a, b, strict=True))


def attach(base: Any, spec: MergeJobSpec) -> Any:
    """Base + adapter, or base + the weighted combination of several (PEFT's add_weighted_adapter)."""
    first = spec.adapters[0]
    if spec.combination is None:
        return PeftModel.from_pretrained(base, first.path)
    model = PeftModel.from_pretrained(base, first.path, adapter_name="a0")
    for i, source in enumerate(spec.adapters[1:], start=1):
        model.load_adapter(source.path, adapter_name=f"a{i}")
    names = [f"a{i}" for i in range(len(spec.adapters))]
    kwargs = {"density": spec.density} if spec.density is not None else {}
    model.add_weighted_adapter(names, [s.weight for s in spec.adapters], "combined",
                               combination_type=spec.combination, **kwargs)
    model.set_adapter("combined")
    for name in names:
        model.delete_adapter(name)
    return model


def into_trained_nf4(spec: MergeJobSpec) -> bool:
    """Merge into the dequantized NF4 weights: asked for (the default), and every adapter was trained on NF4."""
    return spec.base_weights == "trained" and all(s.trained_quantization == "nf4" for s in spec.adapters)


def load_base(spec: MergeJobSpec) -> Any:
    if into_trained_nf4(spec):
        return loading.load_dequantized_nf4(spec.base_model, trust_remote_code=spec.trust_remote_code,
                                            dtype=loading.DTYPES[spec.dtype])
    return loading.load_model(spec.base_model, trust_remote_code=spec.trust_remote_code,
                              dtype=loading.DTYPES[spec.dtype])


def merged_into(spec: MergeJobSpec) -> str:
    if into_trained_nf4(spec):
        return f"the NF4 base the adapter was trained on, dequantized to {spec.dtype}"
    return f"the original weights of the base in {spec.dtype}"


def trained_base_logits(spec: MergeJobSpec, probes: list[torch.Tensor]) -> list[torch.Tensor] | None:
    """Logits of the 4-bit base + adapter the adapter was trained with (single adapters trained with nf4)."""
    source = spec.adapters[0]
    if spec.combination is not None or source.trained_quantization != "nf4":
        return None
    base = loading.load_model(spec.base_model, trust_remote_code=spec.trust_remote_code, quantization="nf4")
    result = logits(PeftModel.from_pretrained(base, source.path).eval(), probes)
    del base
    return result


def model_card(spec: MergeJobSpec, verification: Verification | None, metrics: dict | None) -> str:
    lines = [f"# {spec.output_name}", "", f"Merged by fts-mcp into `{spec.base_model}`: {merged_into(spec)}.", "",
             "| adapter | weight | r | alpha | trained on |", "|---|---|---|---|---|"]
    trained_on = {"nf4": "4-bit NF4 base", "none": "16-bit base", None: "unknown"}
    for s in spec.adapters:
        lines.append(f"| `{s.job_id or s.path}` | {s.weight:g} | {s.r} | {s.alpha:g} | "
                     f"{trained_on[s.trained_quantization]} |")
    if spec.combination:
        density = f", density {spec.density}" if spec.density else ""
        lines += ["", f"Combination: `{spec.combination}`{density}"]
    if verification:
        lines += ["", "## Verification", "",
                  f"Max |logit difference| merged vs unmerged on {verification.inputs} fixed inputs: "
                  f"{verification.max_abs_logit_diff:.3g} (tolerance {verification.tolerance:.3g})."]
        if verification.trained_base_max_abs_logit_diff is not None:
            lines.append(f"Against the 4-bit base + adapter it was trained on: "
                         f"{verification.trained_base_max_abs_logit_diff:.3g}.")
    if metrics:
        lines += ["", "## Training", "", f"Dataset: `{metrics.get('dataset', '?')}`; steps {metrics.get('steps')}; "
                  f"final loss {metrics.get('final_loss')}; eval loss {metrics.get('eval_loss')}."]
    return "\n".join(lines) + "\n"


def tokenizer_source(spec: MergeJobSpec) -> str:
    """Where the tokenizer comes from: the (first) adapter's folder when training saved it there (with the chat
    template it was trained with), else the base model."""
    first = Path(spec.adapters[0].path)
    return str(first) if any(f.name.startswith("tokenizer") for f in companion_files(first)) else spec.base_model


def published(spec: MergeJobSpec) -> Artifacts | None:
    """The output of these inputs, when a run (this job's last attempt, or an identical earlier merge) published it
    complete: its merge.json has this spec's inputs_key, verification did not fail, and every file it lists is there
    with its recorded size. None when there is no output yet, or when one of these inputs is incomplete (it is
    removed: this run merges again). An output of other inputs, or without a readable merge.json, is not ours to
    replace: that is an error naming the folder."""
    out = Path(spec.output_dir)
    if not out.exists():
        return None
    try:
        manifest = json.loads((out / MANIFEST).read_text())
    except (OSError, ValueError):
        manifest = None
    if not isinstance(manifest, dict) or manifest.get("inputs_key") != spec.inputs_key:
        what = "holds a merge of different inputs" if isinstance(manifest, dict) else \
            f"was not written by a merge (no readable {MANIFEST})"
        raise FtsError(f"{out} already exists and {what}; nothing was overwritten. Merge again with another "
                       "output_name", param="output_name")
    try:
        verification = Verification.model_validate(manifest["verification"]) if manifest.get("verification") \
            else None
        if spec.verify and verification is not None and not verification.passed:
            raise ValueError("its verification failed")
        files = recorded_files(out, manifest)
    except (OSError, ValueError) as exc:  # a pydantic ValidationError is a ValueError
        log.warning("%s holds an incomplete merge of these inputs (%s); merging again", out, exc)
        shutil.rmtree(out)
        return None
    log.info("%s already holds this merge (by %s); reusing it", out, manifest.get("job_id"))
    return Artifacts(output_dir=str(out), verification=verification, files=files)


def recorded_files(out: Path, manifest: dict) -> list[ArtifactFile]:
    """The published folder's files as merge.json recorded them (hashed before the folder was published), each
    checked to be there with its recorded size, and merge.json itself. A merge.json from before the record was kept
    lists none: then every file is hashed now."""
    recorded = manifest.get("files")
    if recorded is None:
        return artifact_files(out)
    if not isinstance(recorded, list):
        raise ValueError(f"{MANIFEST}'s files is not a list")
    files = []
    for entry in recorded:
        file = ArtifactFile.model_validate(entry)
        path = out / file.path
        if Path(file.path).name != file.path or file.path in ("", ".", "..", MANIFEST):
            raise ValueError(f"{MANIFEST} lists {file.path!r}, which is not a file name in the folder")
        if not path.is_file() or path.stat().st_size != file.bytes:
            raise ValueError(f"{path.name} is missing or not {file.bytes} bytes")
        files.append(file.model_copy(update={"path": str(path)}))
    return sorted([*files, artifact_file(out / MANIFEST)], key=lambda f: f.path)


def run(spec: MergeJobSpec, ctx: JobContext) -> Artifacts:
    out = Path(spec.output_dir)
    staging = out.parent / f".{out.name}.{ctx.job_id}.tmp"
    shutil.rmtree(staging, ignore_errors=True)  # what an earlier attempt of this job left unpublished
    if (reused := published(spec)) is not None:
        return reused
    ctx.phase("loading_model")
    tokenizer = loading.load_tokenizer(tokenizer_source(spec), trust_remote_code=spec.trust_remote_code)
    base = load_base(spec)
    model = attach(base, spec).eval()
    probes = probe_ids(tokenizer)
    try:
        ctx.phase("merging")
        verification = None
        if spec.output == "adapter":
            model.save_pretrained(staging, selected_adapters=["combined"])
            nested = staging / "combined"
            if nested.is_dir():  # PEFT writes a named adapter into a subfolder
                for item in nested.iterdir():
                    item.rename(staging / item.name)
                nested.rmdir()
            tokenizer.save_pretrained(staging)
        else:
            before = logits(model, probes)
            trained = trained_base_logits(spec, probes) if spec.verify else None
            merged = model.merge_and_unload()
            leftovers = [n for n, _ in merged.named_modules() if "lora_" in n]
            if leftovers:
                raise VerificationFailed(f"LoRA layers remain after merging: {leftovers[:3]}")
            after = logits(merged, probes)
            diff = max_diff(before, after)
            atol, rtol = TOLERANCE[spec.dtype]
            tolerance = atol + rtol * max(x.abs().max().item() for x in before)
            verification = Verification(max_abs_logit_diff=diff, tolerance=tolerance, dtype=spec.dtype,
                                        inputs=len(probes), passed=diff <= tolerance, merged_into=merged_into(spec),
                                        trained_base_max_abs_logit_diff=max_diff(trained, after) if trained else None)
            log.info("verification: %s", verification.model_dump())
            if spec.verify and not verification.passed:
                raise VerificationFailed(
                    f"merged logits differ from base + adapter by {diff:.4g}, above the {spec.dtype} tolerance "
                    f"{tolerance:.4g}; nothing was written. Merge in float32 to check, or with verify=false to "
                    "keep it anyway", param="dtype")
            ctx.phase("saving")
            merged.save_pretrained(staging, max_shard_size=MAX_SHARD, safe_serialization=True)
            tokenizer.save_pretrained(staging)
        write_bytes_atomic(staging / "README.md", model_card(spec, verification, spec.training_metrics).encode())
        ctx.phase("hashing")  # before publishing: a run killed here leaves only the staging folder
        files = [file.model_copy(update={"path": Path(file.path).name}) for file in artifact_files(staging)]
        write_json_atomic(staging / MANIFEST, {"job_id": ctx.job_id, "inputs_key": spec.inputs_key,
                                               "spec": spec.model_dump(),
                                               "verification": verification.model_dump() if verification else None,
                                               "files": [file.model_dump() for file in files]})
        if ctx.stop:
            raise FtsError("cancelled before the result was published", param="job_id")
        staging.rename(out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return Artifacts(output_dir=str(out), verification=verification, files=recorded_files(out, json.loads(
        (out / MANIFEST).read_text())))
