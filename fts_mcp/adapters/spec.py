"""What a `merge` job is asked to do (pure pydantic, shared by the server and the worker)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

Dtype = Literal["bfloat16", "float16", "float32"]
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


class EvalJobSpec(BaseModel):
    """What an `eval` job compares: the base alone against the base with the adapter (or a merged model)."""

    model_config = ConfigDict(extra="forbid")

    base_model: str
    adapter_dir: str | None = None
    adapter_ref: str | None = Field(None, description="the adapter as the caller named it (job id, store reference, "
                                                      "folder): what a next deploy or merge takes")
    merged_dir: str | None = None
    dataset: str
    split: EvalSplit | None = None
    answer_format: Literal["json"] | None = None
    regex: str | None = None
    max_examples: int = Field(50, ge=1, le=10_000)
    samples: int = Field(3, ge=0, le=20)
    max_new_tokens: int = Field(64, ge=1, le=2048)
    trust_remote_code: bool = False
