"""The base an adapter was trained on: NF4 4-bit with double quantization (QLoRA) or 16-bit, and the compute dtype.

An adapter is only as good as the base it runs on: trained against NF4-rounded weights, it does its job on those
weights and not reliably on the original 16-bit ones. So training writes this record beside every adapter
(`training_base.json`; the store's manifest carries it too), and evaluation, generation, the edge runtime and
merging load the same base by default. Pure pydantic: read by the server and the workers alike.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from fts_mcp.errors import InvalidArgument
from fts_mcp.files import write_json_atomic
from fts_mcp.models.dtypes import Dtype

FILE = "training_base.json"
Quantization = Literal["nf4", "none"]


class TrainingBase(BaseModel):
    """How the base model was loaded while the adapter trained."""

    model_config = ConfigDict(extra="forbid")

    quantization: Quantization = Field(description="nf4: 4-bit NF4 with double quantization (QLoRA); none: 16-bit")
    compute_dtype: Dtype | None = Field(None, description="the dtype the base computed in (float32 on a CPU); "
                                                          "null when not recorded")

    def describe(self) -> str:
        compute = f", {self.compute_dtype} compute" if self.compute_dtype else ""
        if self.quantization == "nf4":
            return f"the 4-bit NF4 base (double quantization{compute})"
        return f"the 16-bit base (not quantized{compute})"


def read_training_base(folder: Path, *, param: str = "adapter") -> TrainingBase | None:
    """The record in an adapter folder, None when there is none (adapters from elsewhere, older versions); one that
    is present but malformed is refused, naming the file."""
    path = folder / FILE
    if not path.is_file():
        return None
    try:
        return TrainingBase.model_validate(json.loads(path.read_text()))
    except (OSError, ValueError, ValidationError) as exc:
        raise InvalidArgument(f"{path} does not describe a training base ({type(exc).__name__}: "
                              f"{str(exc)[:200]})", param=param) from exc


def write_training_base(folder: Path, base: TrainingBase) -> None:
    write_json_atomic(folder / FILE, base.model_dump())
