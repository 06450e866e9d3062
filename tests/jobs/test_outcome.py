"""How a recipe's run ends (`run_recipe`): the one rule the work horse, every rank and the Ray entrypoint follow.

Recipes with a stated character stand in for real ones: one succeeds, one stops, one raises."""

from pathlib import Path

import pytest

from fts_mcp.edge.spec import GenerateJobSpec
from fts_mcp.errors import InvalidArgument
from fts_mcp.jobs.context import Stop, recording_context
from fts_mcp.jobs.outcome import RankLost, run_recipe
from fts_mcp.jobs.records import Artifacts

SPEC = {"base_model": "org/model", "model": "base", "prompt": "hi"}  # a valid generate spec


def raising(exc: BaseException):
    def launch(spec, ctx):
        raise exc

    return launch


def run(launch, *, peers: bool = False, spec: dict = SPEC):
    ctx, _ = recording_context(Path("unused"))
    return run_recipe("generate", spec, ctx, peers=peers, launch=launch)


@pytest.mark.parametrize("launch, peers, state, code", [
    (lambda spec, ctx: Artifacts(text="ok"), False, "succeeded", None),
    (lambda spec, ctx: None, False, "stopped", None),  # no artifacts: it stopped after a checkpoint
    (raising(Stop("cancel")), False, "stopped", None),
    (raising(InvalidArgument("no such file", param="dataset")), False, "failed", "invalid_argument"),
    (raising(ValueError("boom")), False, "failed", "internal_error"),
    (raising(ConnectionError("Connection reset by peer")), True, "lost", "internal_error"),  # another rank died
    (raising(ConnectionError("Connection reset by peer")), False, "failed", "internal_error"),  # no peers to lose
    (raising(RankLost("rank 1 of 2 was killed by SIGKILL")), False, "lost", "worker_killed"),
])
def test_how_a_run_ends(launch, peers, state, code):
    outcome = run(launch, peers=peers)
    assert outcome.state == state and (outcome.error.code if outcome.error else None) == code
    assert (outcome.exception is not None) == (state in ("failed", "lost"))


def test_the_recipe_gets_the_validated_spec_and_an_invalid_one_never_runs():
    seen = []
    outcome = run(lambda spec, ctx: seen.append(spec) or Artifacts(text="ok"))
    assert outcome.artifacts.text == "ok" and isinstance(seen[0], GenerateJobSpec)
    refused = run(lambda spec, ctx: seen.append(spec), spec={**SPEC, "max_tokens": 0})
    assert refused.state == "failed" and refused.error.code == "internal_error" and len(seen) == 1
