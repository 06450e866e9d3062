"""Job kinds: each is a spec model (pure pydantic, validated by the server) and a recipe `run(spec, ctx)`
(torch side, imported by the work horse only). A new kind is one line here plus those two pieces."""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import NamedTuple, get_args

from pydantic import BaseModel

from fts_mcp.adapters.spec import EvalJobSpec, MergeJobSpec
from fts_mcp.edge.spec import GenerateJobSpec, RuntimeJobSpec
from fts_mcp.jobs.records import Artifacts, JobKind
from fts_mcp.training.spec import TrainJobSpec


class Kind(NamedTuple):
    spec: type[BaseModel]
    recipe: str  # module holding `run(spec, ctx) -> Artifacts | None`


KINDS: dict[str, Kind] = {
    "train": Kind(TrainJobSpec, "fts_mcp.training.recipe"),
    "merge": Kind(MergeJobSpec, "fts_mcp.adapters.merge"),
    "generate": Kind(GenerateJobSpec, "fts_mcp.edge.generate"),
    "eval": Kind(EvalJobSpec, "fts_mcp.adapters.evaluate"),
    "runtime": Kind(RuntimeJobSpec, "fts_mcp.edge.runtime"),
}
assert set(KINDS) == set(get_args(JobKind)), "every job kind needs a spec and a recipe"


def recipe(kind: str) -> Callable[..., Artifacts | None]:
    """The kind's `run` function. Imported here, lazily: only the work horse loads torch."""
    return importlib.import_module(KINDS[kind].recipe).run
