"""The training path's speed choices keep the losses: padding-free and packed batches give each example the loss the
padded batch gives it, no example sees another, the chunked loss is the full cross-entropy, and checkpointing
"auto" follows the memory estimate."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from fts_mcp.errors import InvalidArgument
from fts_mcp.models.architecture import from_config
from fts_mcp.models.loading import compute_dtype, load_model, load_tokenizer
from fts_mcp.planning.batch import plan_batch
from fts_mcp.training import speed, varlen
from fts_mcp.training.recipe import CHECKPOINTING, build_datasets, make_trainer
from fts_mcp.training.spec import LoraSpec, TrainingSpec, TrainJobSpec
from fts_mcp.training.speed import (
    SpeedPlan,
    padding_free_attention,
    plan,
    read_plan,
    supports_padding_free,
    write_plan,
)

WORDS = "alpha bravo charlie delta echo foxtrot golf hotel india juliet kilo lima mike november oscar papa".split()


def mixed_records() -> list[dict]:
    """Chat (one and two assistant turns) and prompt/completion records of very different lengths, all distinct."""
    records = []
    for i in range(18):
        filler = " ".join(WORDS[: 1 + (i * 5) % len(WORDS)] * 2)[: 10 + 9 * i]  # 10 to 160 bytes
        word = WORDS[i % len(WORDS)]
        if i % 3 == 0:
            records.append({"prompt": f"Q{i}: {filler}?", "completion": f" A{i} {word}"})
        else:
            turns = [{"role": "user", "content": f"#{i} {filler}"}, {"role": "assistant", "content": word}]
            if i % 3 == 2:
                turns += [{"role": "user", "content": "again"}, {"role": "assistant", "content": f"{word} {i}"}]
            records.append({"messages": turns})
    return records


def write_dataset(folder: Path, fmt: str) -> Path:
    path = folder / f"{fmt}.jsonl"
    rows = [r for r in mixed_records() if ("messages" in r) == (fmt == "chat")]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def job_spec(tiny_model: Path, dataset: Path, fmt: str, **training) -> TrainJobSpec:
    return TrainJobSpec(base_model=str(tiny_model), dataset=str(dataset), dataset_format=fmt, dataset_examples=8,
                        output_name="t", lora=LoraSpec(r=8, dropout=0.0),
                        training=TrainingSpec(**{"max_seq_len": 256, "micro_batch_size": 8,
                                                 "gradient_accumulation_steps": 1, **training}))


def speed_plan(**choices) -> SpeedPlan:
    defaults = dict(micro_batch_size=8, gradient_accumulation_steps=1, gradient_checkpointing=False,
                    padding_free=True, packing=False, liger_kernel=False, attention="sdpa", memory_budget_gb=1.0,
                    estimated_gb=1.0, reasons=[])
    return SpeedPlan(**{**defaults, **choices})


def load(tiny_model: Path):
    """A fresh 4-bit base (a trainer wraps the model it is given with the adapter)."""
    tokenizer = load_tokenizer(str(tiny_model), trust_remote_code=False)
    model = load_model(str(tiny_model), trust_remote_code=False, quantization="nf4", dtype=compute_dtype())
    return model, tokenizer


@pytest.fixture
def base(tiny_model):
    return load(tiny_model)


def trainer_for(tiny_model, tmp_path, spec: TrainJobSpec, choices: SpeedPlan):
    model, tokenizer = load(tiny_model)
    if choices.padding_free:  # as plan() does: per-example attention over the row
        assert padding_free_attention(model) == varlen.NAME
    train, _ = build_datasets(spec, tokenizer)
    trainer = make_trainer(spec, choices, model, tokenizer, train, None, tmp_path / "ck", compute_dtype(), [])
    # a non-zero adapter, so the probe sees the adapted model and not the base alone
    torch.manual_seed(0)
    for name, param in trainer.model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(param, std=0.2)
    trainer.model.eval()
    return trainer


def model_inputs(batch: dict) -> dict:
    return {**{k: v for k, v in batch.items() if k != "labels"}, "use_cache": False}


@torch.no_grad()
def per_example_losses(trainer, examples: list[dict]) -> dict[tuple, float]:
    """Mean next-token loss of each example in one collated batch, keyed by the example's tokens. A padding-free
    row is split where positions restart; a padded batch is split by row."""
    batch = trainer.data_collator(examples)
    logits = trainer.model(**model_inputs(batch)).logits.float()
    labels = batch["labels"]
    if "attention_mask" in batch:
        spans = [(row, 0, int(batch["attention_mask"][row].sum())) for row in range(labels.size(0))]
    else:
        starts = (batch["position_ids"][0] == 0).nonzero().flatten().tolist() + [labels.size(1)]
        spans = [(0, a, b) for a, b in zip(starts, starts[1:], strict=False)]
    losses = {}
    for row, start, end in spans:
        target = labels[row, start + 1:end]
        keep = target != -100
        token_loss = F.cross_entropy(logits[row, start:end - 1], target.clamp(min=0), reduction="none")
        losses[tuple(batch["input_ids"][row, start:end].tolist())] = float(token_loss[keep].mean())
    return losses


def examples_of(trainer) -> list[dict]:
    return [trainer.train_dataset[i] for i in range(len(trainer.train_dataset))]


@pytest.mark.parametrize("fmt", ["chat", "completion"])
def test_padding_free_and_packed_batches_give_each_example_its_padded_loss(tiny_model, tmp_path, fmt):
    spec = job_spec(tiny_model, write_dataset(tmp_path, fmt), fmt)
    padded = trainer_for(tiny_model, tmp_path, spec, speed_plan(padding_free=False))
    reference = per_example_losses(padded, examples_of(padded))
    assert len(reference) == len(examples_of(padded)) >= 4
    assert len({len(ids) for ids in reference}) >= 3  # the lengths really differ: padding is computed

    flat = trainer_for(tiny_model, tmp_path, spec, speed_plan(padding_free=True))
    batch = flat.data_collator(examples_of(flat))
    assert "attention_mask" not in batch and batch["input_ids"].size(0) == 1  # one row, no padding
    assert per_example_losses(flat, examples_of(flat)) == pytest.approx(reference, rel=1e-4)

    packed = trainer_for(tiny_model, tmp_path, spec.model_copy(update={"training": spec.training.model_copy(
        update={"packing": True})}), speed_plan(packing=True))
    rows = examples_of(packed)
    assert len(rows) < len(reference)  # examples share rows
    losses = {}
    for row in rows:
        losses.update(per_example_losses(packed, [row]))
    assert losses == pytest.approx(reference, rel=1e-4)


def test_an_example_never_attends_to_another_in_a_padding_free_row(tiny_model, tmp_path):
    spec = job_spec(tiny_model, write_dataset(tmp_path, "chat"), "chat")
    flat = trainer_for(tiny_model, tmp_path, spec, speed_plan(padding_free=True))
    examples = examples_of(flat)
    before = per_example_losses(flat, examples)
    probe = dict(examples[2])
    probe["input_ids"] = [(t * 7 + 3) % 200 + 3 for t in probe["input_ids"]]  # rewrite one example's tokens
    after = per_example_losses(flat, examples[:2] + [probe] + examples[3:])
    changed = [ids for ids in before if ids not in after]
    assert changed == [tuple(examples[2]["input_ids"])]  # only the probe's own loss is gone (and differs)
    assert {ids: after[ids] for ids in before if ids in after} == pytest.approx(
        {ids: before[ids] for ids in before if ids in after}, rel=1e-5)


def test_the_chunked_loss_equals_the_full_cross_entropy_with_the_same_gradients(tiny_model, tmp_path):
    spec = job_spec(tiny_model, write_dataset(tmp_path, "chat"), "chat")
    trainer = trainer_for(tiny_model, tmp_path, spec, speed_plan(padding_free=True))
    batch = trainer.data_collator(examples_of(trainer))
    model = trainer.model.train()  # the training step's own loss (no dropout here: LoRA dropout 0)
    lora = [p for n, p in model.named_parameters() if p.requires_grad]

    chunked = trainer.compute_loss(model, dict(batch))
    chunked_grads = torch.autograd.grad(chunked, lora)
    logits = model(**model_inputs(batch)).logits.float()
    labels = batch["labels"][:, 1:]
    full = F.cross_entropy(logits[:, :-1].reshape(-1, logits.size(-1)), labels.reshape(-1), ignore_index=-100)
    full_grads = torch.autograd.grad(full, lora)

    assert chunked.detach().item() == pytest.approx(full.detach().item(), rel=1e-5)
    # QLoRA adapters train in bf16: compare at bf16's precision
    for a, b in zip(chunked_grads, full_grads, strict=True):
        a, b = a.float(), b.float()
        assert float((a - b).norm() / b.norm()) < 1e-2


def test_padding_free_attention_is_checked_on_the_model_and_falls_back_to_padding(base, tiny_model, tmp_path,
                                                                                    monkeypatch):
    model, _ = base
    assert supports_padding_free(model)  # stock SDPA with a block mask keeps examples apart
    assert padding_free_attention(model) == varlen.NAME and supports_padding_free(model)

    monkeypatch.setattr(speed, "supports_padding_free", lambda model: False)  # a model whose examples would mix
    spec = job_spec(tiny_model, write_dataset(tmp_path, "chat"), "chat")
    fallback = plan(spec, load(tiny_model)[0], budget_gb=1e6)
    assert fallback.padding_free is False and "padded batches" in fallback.reasons[0]
    packing = spec.model_copy(update={"training": spec.training.model_copy(update={"packing": True})})
    with pytest.raises(InvalidArgument) as refused:
        plan(packing, load(tiny_model)[0], budget_gb=1e6)
    assert refused.value.param == "training.packing"


def test_checkpointing_auto_is_off_when_the_estimate_fits_and_on_when_it_does_not(base, tiny_model, tmp_path):
    model, tokenizer = base
    spec = job_spec(tiny_model, write_dataset(tmp_path, "chat"), "chat",
                    gradient_checkpointing="auto")
    arch = from_config(model.config.to_dict(), source="test")
    kwargs = dict(seq_len=256, micro_batch=8, gradient_accumulation_steps=1, lora_r=8,
                  target_modules="all-linear", optimizer="adamw_32bit")
    without = plan_batch(arch, "qlora", budget_gb=1e6, gradient_checkpointing=False, **kwargs).total_gb
    with_it = plan_batch(arch, "qlora", budget_gb=1e6, gradient_checkpointing=True, **kwargs).total_gb
    assert with_it < without

    roomy = plan(spec, model, budget_gb=without * 1.01)
    assert roomy.gradient_checkpointing is False and "off" in roomy.summary()
    tight = plan(spec, model, budget_gb=(with_it + without) / 2)
    assert tight.gradient_checkpointing is True and "on" in tight.summary()

    trainer = make_trainer(spec, tight, model, tokenizer, build_datasets(spec, tokenizer)[0], None, tmp_path / "ck",
                           compute_dtype(), [])
    assert getattr(trainer.args, CHECKPOINTING) is True  # the trainer is told to recompute


def test_an_unset_micro_batch_fills_the_budget_and_keeps_the_effective_batch(base, tiny_model, tmp_path):
    model, tokenizer = base
    spec = job_spec(tiny_model, write_dataset(tmp_path, "chat"), "chat", max_seq_len=1024)
    spec.training.micro_batch_size = spec.training.gradient_accumulation_steps = None
    roomy = plan(spec, model, budget_gb=1e6)
    assert (roomy.micro_batch_size, roomy.gradient_accumulation_steps) == (16, 1)
    arch = from_config(model.config.to_dict(), source="test")

    def total(micro: int) -> float:
        return plan_batch(arch, "qlora", budget_gb=1e6, seq_len=1024, micro_batch=micro,
                          gradient_accumulation_steps=None, gradient_checkpointing=False, lora_r=8,
                          target_modules="all-linear", optimizer="adamw_32bit", adapter_dtype="bf16").total_gb

    squeezed = plan(spec, model, budget_gb=(total(2) + total(4)) / 2)
    # the largest that fits without recomputing (2 x 1,024 tokens fill a pass), accumulation keeping 16 a step
    assert (squeezed.micro_batch_size, squeezed.gradient_accumulation_steps) == (2, 8)
    assert squeezed.gradient_checkpointing is False


def test_a_resumed_run_keeps_the_batch_shape_of_its_checkpoint(base, tiny_model, tmp_path):
    """The free memory may differ when a job resumes; the examples per step must not."""
    model, _ = base
    spec = job_spec(tiny_model, write_dataset(tmp_path, "chat"), "chat")
    spec.training.micro_batch_size = spec.training.gradient_accumulation_steps = None
    checkpoint = tmp_path / "checkpoint-5"
    checkpoint.mkdir()
    write_plan(checkpoint, speed_plan(micro_batch_size=4, gradient_accumulation_steps=4))
    resumed = plan(spec, model, budget_gb=1e6, resuming=read_plan(checkpoint))
    assert (resumed.micro_batch_size, resumed.gradient_accumulation_steps) == (4, 4)
    assert plan(spec, model, budget_gb=1e6).micro_batch_size == 16  # a fresh run fills the memory instead
    (checkpoint / "speed.json").write_text("{not json")
    assert read_plan(checkpoint) is None and read_plan(tmp_path / "absent") is None
