"""Settings chosen for the caller: the quantization rule and the small-data defaults, from tables."""

import math

import pytest

from fts_mcp.planning.defaults import MIN_STEPS, auto_batch, choose_quantization, training_defaults
from fts_mcp.training.spec import TrainingSpec


@pytest.mark.parametrize(("examples", "batch", "epochs"), [
    (40, 4, 3.0),      # 10 steps an epoch: 3 epochs give 30 steps
    (16, 4, 8.0),      # 4 steps an epoch: 8 epochs to reach 30 steps
    (3, 3, 10.0),      # tiny: one step an epoch, capped at 10 epochs
    (100, 4, 2.0),     # 25 steps an epoch
    (300, 8, 1.0),     # 38 steps: one pass is enough
    (10_000, 16, 1.0),  # 625 steps
])
def test_small_datasets_get_smaller_steps_and_enough_of_them(examples, batch, epochs):
    chosen, reasons = training_defaults(TrainingSpec(), examples=examples)
    assert (chosen.batch_size, chosen.epochs) == (batch, epochs)
    steps = math.ceil(examples / batch) * chosen.epochs
    assert steps >= MIN_STEPS or chosen.epochs == 10
    assert chosen.learning_rate == 2e-4 and chosen.warmup_ratio == 0.1
    assert any("batch" in r for r in reasons) and any("epoch" in r for r in reasons)


def test_what_the_caller_sets_is_kept():
    given = TrainingSpec(epochs=1, batch_size=32, learning_rate=1e-3, warmup_ratio=0.0)
    chosen, reasons = training_defaults(given, examples=40)
    assert (chosen.epochs, chosen.batch_size, chosen.learning_rate, chosen.warmup_ratio) == (1, 32, 1e-3, 0.0)
    assert reasons == []
    steps = training_defaults(TrainingSpec(max_steps=5), examples=40)[0]
    assert steps.max_steps == 5  # max_steps wins; epochs stay the default and do not matter
    accumulated = training_defaults(TrainingSpec(micro_batch_size=2, gradient_accumulation_steps=3), examples=40)[0]
    assert accumulated.batch_size == 6


def test_defaults_are_idempotent():
    once, _ = training_defaults(TrainingSpec(), examples=40)
    twice, reasons = training_defaults(once, examples=40)
    assert once == twice and reasons == []


@pytest.mark.parametrize(("cuda", "params", "memory", "expected"), [
    (True, 135_000_000, 24.0, "nf4"),       # a GPU: QLoRA
    (False, 135_000_000, 24.0, "none"),     # a CPU with room: 16-bit LoRA
    (False, 8_000_000_000, 24.0, "nf4"),    # 32 GB unquantized does not fit 24 GB
    (False, None, None, "none"),            # unknown size: 16-bit, and says so
])
def test_auto_quantization(cuda, params, memory, expected):
    chosen, why = choose_quantization("auto", cuda=cuda, params=params, memory_gb=memory)
    assert chosen == expected and why.startswith("auto:")


def test_an_explicit_quantization_is_kept():
    assert choose_quantization("nf4", cuda=False, params=1, memory_gb=1.0) == ("nf4", "nf4 as asked")
    assert choose_quantization("none", cuda=True, params=1, memory_gb=1.0)[0] == "none"


def test_auto_batch_never_exceeds_the_data():
    assert [auto_batch(n) for n in (1, 2, 40, 239, 240, 479, 480)] == [1, 2, 4, 4, 8, 8, 16]
