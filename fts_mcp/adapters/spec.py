"""What a `merge` job is asked to do (pure pydantic, shared by the server and the worker)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from fts_mcp.models.dtypes import Dtype

Combination = Literal["cat", "svd", "linear", "ties", "dare_linear", "dare_ties", "magnitude_prune"]
EQUAL_RANKS = frozenset({"linear", "ties", "dare_linear", "dare_ties", "magnitude_prune"})
NEEDS_DENSITY = frozenset({"ties", "dare_linear", "dare_ties", "magnitude_prune"})
EXACT = frozenset({"cat", "svd"})


class WeightedAdapter(BaseModel):
    """One adapter in a combination."""

    model_config = ConfigDict(extra="forbid")

    adapter: str = Field(description="a succeeded training job id or an adapter folder inside the roots")
    weight: float = Field(1.0, ge=-100, le=100, description="its weight in the combination")


class AdapterSource(BaseModel):
    path: str
    weight: float = 1.0
    job_id: str | None = None
    trained_quantization: Literal["nf4", "none"] | None = Field(None, description="how its base was loaded in "
                                                                                  "training, when known")
    r: int
    alpha: float
    sha256: dict[str, str]


class MergeJobSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    adapters: list[AdapterSource]
    base_model: str
    dtype: Dtype
    verify: bool
    combination: Combination | None = None
    density: float | None = None
    output: Literal["model", "adapter"] = "model"
    base_weights: Literal["trained", "original"] = Field(
        "trained", description="trained: merge a QLoRA adapter into the dequantized NF4 weights it was trained on; "
                               "original: into the original 16-bit weights")
    output_name: str
    output_dir: str
    inputs_key: str = Field(description="sha256 of everything that determines the result")
    trust_remote_code: bool = False
    training_metrics: dict[str, Any] | None = Field(None, description="the training job's figures, for the model "
                                                                      "card (single adapters from a job on record)")


class EvalSplit(BaseModel):
    """The held-out split of a training job: the same rows its trainer evaluated on."""

    model_config = ConfigDict(extra="forbid")

    fraction: float = Field(gt=0, le=0.5)
    seed: int


class EvalPart(BaseModel):
    """One adapter of a combination and data of its own task: its training job's eval split, or (the job kept
    none) that job's training data."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(description="the training job that made it")
    adapter_dir: str
    dataset: str
    split: EvalSplit | None = Field(None, description="None: the whole file, which is the part's training data")


class EvalJobSpec(BaseModel):
    """What an `eval` job compares: the base alone against the base with the adapter (or a merged model)."""

    model_config = ConfigDict(extra="forbid")

    base_model: str
    adapter_dir: str | None = None
    adapter_ref: str | None = Field(None, description="the adapter as the caller named it (job id, store reference, "
                                                      "folder): what a next deploy or merge takes")
    merged_dir: str | None = None
    quantization: Literal["nf4", "none"] = Field("none", description="how the base is loaded: as the adapter was "
                                                                    "trained (nf4 for a QLoRA adapter)")
    parts: list[EvalPart] = Field(default_factory=list, description="a combined adapter's parts, each also scored "
                                                                    "on its own data")
    parts_skipped: list[str] = Field(default_factory=list, description="parts of the combination not scored on "
                                                                       "their own data, and why")
    dataset: str
    split: EvalSplit | None = None
    answer_format: Literal["json"] | None = None
    regex: str | None = None
    max_examples: int = Field(50, ge=1, le=10_000)
    samples: int = Field(3, ge=0, le=20)
    max_new_tokens: int = Field(64, ge=1, le=2048)
    trust_remote_code: bool = False
