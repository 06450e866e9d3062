"""plan_batch: the micro-batch / accumulation / checkpointing policy the training recipe takes from the estimator."""

import pytest

from fts_mcp.errors import InvalidArgument
from fts_mcp.planning.batch import micro_batch_candidates, plan_batch
from fts_mcp.planning.estimate import REFERENCE_SHAPES
from fts_mcp.planning.memory import memory

ONE_B, EIGHT_B = REFERENCE_SHAPES["Llama-3.2-1B"], REFERENCE_SHAPES["Llama-3.1-8B"]
AUTO = {"seq_len": 2048, "micro_batch": None, "gradient_accumulation_steps": None, "gradient_checkpointing": "auto"}


def total(arch, batch, checkpointing, **kwargs):
    m, _ = memory(arch, "qlora", seq_len=2048, micro_batch=batch, gradient_checkpointing=checkpointing, **kwargs)
    return m.total_gb


@pytest.mark.parametrize("given, effective, largest, candidates", [
    (None, 16, 16, [16, 8, 4, 2, 1]),
    (None, 12, 16, [12, 8, 4, 2, 1]),  # the effective batch caps the micro-batch
    (None, 64, 8, [8, 4, 2, 1]),
    (None, 1, 16, [1]),
    (6, 16, 16, [6]),  # a given micro-batch is the only candidate
])
def test_micro_batch_candidates(given, effective, largest, candidates):
    assert micro_batch_candidates(given, effective, largest) == candidates


def test_checkpointing_off_when_the_run_fits_without_it():
    plan = plan_batch(ONE_B, "qlora", budget_gb=80, **AUTO)
    assert not plan.gradient_checkpointing and plan.fits
    assert plan.micro_batch == 16 and plan.gradient_accumulation_steps == 1  # 16 x 1 keeps the effective batch
    assert plan.total_gb == total(ONE_B, 16, False) <= 80
    assert plan.reason.startswith("checkpointing off") and f"{plan.total_gb:.1f} of 80.0 GB" in plan.reason


def test_checkpointing_on_when_even_micro_batch_1_does_not_fit_without_it():
    assert total(EIGHT_B, 1, False) > 24  # 8B QLoRA keeps ~16 GB of activations per 2,048 tokens without it
    plan = plan_batch(EIGHT_B, "qlora", budget_gb=24, **AUTO)
    assert plan.gradient_checkpointing and plan.fits
    assert plan.micro_batch == 8 and plan.gradient_accumulation_steps == 2  # 8 x 2 = the effective batch of 16
    assert total(EIGHT_B, 8, True) <= 24 < total(EIGHT_B, 16, True)  # the largest micro-batch that fits
    assert f"needs {total(EIGHT_B, 1, False):.1f} GB of 24.0 GB" in plan.reason


@pytest.mark.parametrize("budget", [20, 30, 50, 80, 141])
def test_automatic_micro_batch_fills_the_budget(budget):
    plan = plan_batch(EIGHT_B, "qlora", budget_gb=budget, **AUTO)
    assert plan.fits and plan.total_gb <= budget
    if plan.micro_batch < 16:  # one step up would not fit with the same checkpointing
        assert total(EIGHT_B, plan.micro_batch * 2, plan.gradient_checkpointing) > budget
    if plan.gradient_checkpointing:  # off was tried first and fits at no micro-batch
        assert total(EIGHT_B, 1, False) > budget
    assert plan.micro_batch * plan.gradient_accumulation_steps == 16


def test_given_values_are_kept_and_forced_checkpointing_is_obeyed():
    plan = plan_batch(ONE_B, "qlora", budget_gb=80, seq_len=2048, micro_batch=2, gradient_accumulation_steps=3,
                      gradient_checkpointing=True)
    assert (plan.micro_batch, plan.gradient_accumulation_steps, plan.gradient_checkpointing) == (2, 3, True)
    assert "as asked" in plan.reason
    kept = plan_batch(ONE_B, "qlora", budget_gb=80, seq_len=2048, micro_batch=4, gradient_accumulation_steps=None,
                      gradient_checkpointing="auto", effective_batch=32)
    assert kept.gradient_accumulation_steps == 8  # 4 x 8 keeps the effective batch of 32
    forced_off = plan_batch(EIGHT_B, "qlora", budget_gb=24, **{**AUTO, "gradient_checkpointing": False})
    assert not forced_off.gradient_checkpointing and not forced_off.fits and forced_off.micro_batch == 1


def test_nothing_fits_smallest_micro_batch_with_checkpointing_said_not_to_fit():
    plan = plan_batch(REFERENCE_SHAPES["Llama-3.1-405B"], "qlora", budget_gb=24, **AUTO)
    assert (plan.micro_batch, plan.gradient_checkpointing, plan.fits) == (1, True, False)
    assert plan.gradient_accumulation_steps == 16 and plan.total_gb > 24
    assert plan.reason.startswith("not expected to fit") and "24.0 GB" in plan.reason


def test_memory_keywords_reach_the_estimate():
    """Full logits cost a 1B model room: the same budget takes a smaller micro-batch with the plain loss."""
    chunked = plan_batch(ONE_B, "qlora", budget_gb=30, **AUTO)
    full = plan_batch(ONE_B, "qlora", budget_gb=30, cross_entropy="full", **AUTO)
    assert (chunked.micro_batch, full.micro_batch) == (4, 2) and not chunked.gradient_checkpointing
    assert full.total_gb == total(ONE_B, full.micro_batch, full.gradient_checkpointing, cross_entropy="full")


@pytest.mark.parametrize("kwargs, param", [
    ({"budget_gb": 0}, "budget_gb"),
    ({"micro_batch": 0}, "micro_batch"),
    ({"effective_batch": 0}, "effective_batch"),
])
def test_bad_values_name_the_argument(kwargs, param):
    with pytest.raises(InvalidArgument) as info:
        plan_batch(ONE_B, "qlora", **{"budget_gb": 80, **AUTO, **kwargs})
    assert info.value.param == param


def test_an_automatic_micro_batch_without_recompute_must_still_fill_a_pass():
    """At short sequences micro-batch 1 without checkpointing leaves a GPU idle: a larger micro-batch with
    checkpointing wins; at 2,048 tokens micro-batch 1 is a full pass and recompute is not worth it."""
    short = {**AUTO, "seq_len": 256}
    small_off = memory(EIGHT_B, "qlora", seq_len=256, micro_batch=2, gradient_checkpointing=False)[0].total_gb
    big_off = memory(EIGHT_B, "qlora", seq_len=256, micro_batch=8, gradient_checkpointing=False)[0].total_gb
    budget = (small_off + big_off) / 2  # micro-batch 2 fits without recompute (512 tokens a pass), 8 does not
    plan = plan_batch(EIGHT_B, "qlora", budget_gb=budget, **short)
    assert plan.gradient_checkpointing and plan.micro_batch >= 8
    assert "under 2,048 tokens a pass" in plan.reason
    given = plan_batch(EIGHT_B, "qlora", budget_gb=budget, **{**short, "micro_batch": 2})
    assert not given.gradient_checkpointing  # a micro-batch the user chose is theirs: off when it fits
    long = plan_batch(EIGHT_B, "qlora", budget_gb=total(EIGHT_B, 1, False) + 0.1, **AUTO)
    assert (long.micro_batch, long.gradient_checkpointing) == (1, False)
