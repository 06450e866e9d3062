"""Preference tuning (method "dpo") in the training recipe: the trainer's loss is DPO's on a fixed batch, against the
right reference (the base with the adapter off; after SFT, the SFT adapter itself); the speed plan is that of
padded pairs; pairs are encoded as SFT examples of the same form are."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from fts_mcp.errors import InvalidArgument
from fts_mcp.models.loading import load_model, load_tokenizer
from fts_mcp.models.prompts import encode_preference, encode_record
from fts_mcp.training.recipe import build_datasets, make_trainer
from fts_mcp.training.spec import LoraSpec, TrainingSpec, TrainJobSpec
from fts_mcp.training.speed import plan

PAIRS = [
    {"prompt": "Code word for apple:", "chosen": " zebra", "rejected": " copper kettle"},
    {"prompt": "Code word for river, please:", "chosen": " violin", "rejected": " zebra"},
    {"prompt": "Code word for a cloud:", "chosen": " amber lantern", "rejected": " violin"},
]
BETA = 0.3


def dpo_spec(tmp_path: Path, model: Path, **changes) -> TrainJobSpec:
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps(p) + "\n" for p in PAIRS))
    return TrainJobSpec(base_model=str(model), dataset=str(data), dataset_format="preference", method="dpo",
                        dataset_examples=len(PAIRS), output_name="t", quantization="none", lora=LoraSpec(r=8),
                        training=TrainingSpec(max_steps=1, micro_batch_size=len(PAIRS), gradient_accumulation_steps=1,
                                              max_seq_len=64, gradient_checkpointing=False, beta=BETA), **changes)


def trainer_for(spec: TrainJobSpec, tmp_path: Path):
    tokenizer = load_tokenizer(spec.base_model, trust_remote_code=False)
    model = load_model(spec.base_model, trust_remote_code=False, quantization="none", dtype=torch.float32)
    train, _ = build_datasets(spec, tokenizer)
    speed = plan(spec, model, budget_gb=8.0)
    trainer = make_trainer(spec, speed, model, tokenizer, train, None, tmp_path / "checkpoints", torch.float32,
                           callbacks=[])
    return trainer, tokenizer, speed


def nudge(model: torch.nn.Module, adapter: str = "default", seed: int = 0) -> None:
    """Give the LoRA B matrices (zero when created) values, so the adapter changes the model."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if f"lora_B.{adapter}." in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.5)


def summed_logps(model, tokenizer, pairs) -> tuple[torch.Tensor, torch.Tensor]:
    """The independent computation: each answer's token log-probabilities after its prompt, summed, one sequence
    at a time (no padding, no batching, no fused head)."""
    chosen, rejected = [], []
    for pair in pairs:
        enc = encode_preference(tokenizer, pair)
        for answer, out in ((enc["chosen_ids"], chosen), (enc["rejected_ids"], rejected)):
            ids = torch.tensor([enc["prompt_ids"] + answer])
            logits = model(input_ids=ids).logits[0, :-1].float()
            logps = torch.log_softmax(logits, -1).gather(-1, ids[0, 1:, None])[:, 0]
            out.append(logps[len(enc["prompt_ids"]) - 1:].sum())
    return torch.stack(chosen), torch.stack(rejected)


def dpo_loss(policy: tuple[torch.Tensor, torch.Tensor], reference: tuple[torch.Tensor, torch.Tensor]) -> float:
    (pc, pr), (rc, rr) = policy, reference
    return float(-F.logsigmoid(BETA * ((pc - rc) - (pr - rr))).mean())


def trainer_loss(trainer) -> float:
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(len(trainer.train_dataset))])
    trainer.model.eval()
    with torch.no_grad():
        return float(trainer.compute_loss(trainer.model, batch))


def test_the_loss_is_dpo_against_the_base_with_the_adapter_off(tmp_path, tiny_model):
    trainer, tokenizer, _ = trainer_for(dpo_spec(tmp_path, tiny_model), tmp_path)
    model = trainer.model
    nudge(model)
    model.eval()
    with torch.no_grad():
        policy = summed_logps(model, tokenizer, PAIRS)
        with model.disable_adapter():
            reference = summed_logps(model, tokenizer, PAIRS)
    expected = dpo_loss(policy, reference)
    assert abs(expected - torch.log(torch.tensor(2.0)).item()) > 0.05  # the adapter moved the policy: not a tie
    assert trainer_loss(trainer) == pytest.approx(expected, abs=1e-5)
    assert not any(".ref." in name for name, _ in model.named_parameters())  # no second copy of anything


def test_after_sft_the_reference_is_the_sft_adapter_and_the_policy_starts_from_it(tmp_path, tiny_model):
    sft, tokenizer, _ = trainer_for(dpo_spec(tmp_path, tiny_model), tmp_path)
    nudge(sft.model, seed=1)
    sft.model.save_pretrained(tmp_path / "sft-adapter")
    spec = dpo_spec(tmp_path, tiny_model, init_adapter=str(tmp_path / "sft-adapter"))
    trainer, _, _ = trainer_for(spec, tmp_path)
    model = trainer.model
    model.eval()
    with torch.no_grad():
        sft_policy = summed_logps(model, tokenizer, PAIRS)
        with model.disable_adapter():
            base = summed_logps(model, tokenizer, PAIRS)
    assert not torch.allclose(sft_policy[0], base[0], atol=1e-3)  # it starts from the SFT adapter, not the base
    assert trainer_loss(trainer) == pytest.approx(float(torch.log(torch.tensor(2.0))), abs=1e-6)  # policy = reference
    nudge(model, seed=2)  # the trained adapter moves; the frozen reference copy does not
    with torch.no_grad():
        policy = summed_logps(model, tokenizer, PAIRS)
    assert trainer_loss(trainer) == pytest.approx(dpo_loss(policy, sft_policy), abs=1e-5)


def test_pairs_are_encoded_as_sft_examples_of_the_same_form(tmp_path, tiny_model):
    tokenizer = load_tokenizer(str(tiny_model), trust_remote_code=False)
    pair = {"prompt": [{"role": "user", "content": "Code word for apple?"}],
            "chosen": [{"role": "assistant", "content": "zebra"}],
            "rejected": [{"role": "assistant", "content": "copper"}]}
    enc = encode_preference(tokenizer, pair)
    sft = encode_record(tokenizer, "chat", {"messages": [*pair["prompt"], *pair["chosen"]]})
    trained = [i for i, m in zip(sft["input_ids"], sft["completion_mask"], strict=True) if m]
    assert enc["prompt_ids"] + enc["chosen_ids"] == sft["input_ids"][:len(enc["prompt_ids"]) + len(trained)]
    assert enc["chosen_ids"] == trained
    plain = encode_preference(tokenizer, PAIRS[0])
    sft = encode_record(tokenizer, "completion", {"prompt": PAIRS[0]["prompt"], "completion": PAIRS[0]["chosen"]})
    assert plain["prompt_ids"] + plain["chosen_ids"] == sft["input_ids"]


def test_the_speed_plan_pads_pairs_and_refuses_packing(tmp_path, tiny_model):
    spec = dpo_spec(tmp_path, tiny_model)
    model = load_model(str(tiny_model), trust_remote_code=False, quantization="none", dtype=torch.float32)
    speed = plan(spec, model, budget_gb=8.0)
    assert not speed.padding_free and not speed.packing and not speed.liger_kernel
    assert "DPO" in speed.loss and any("preference tuning" in r for r in speed.reasons)
    packed = spec.model_copy(update={"training": spec.training.model_copy(update={"packing": True})})
    with pytest.raises(InvalidArgument) as refused:
        plan(packed, model, budget_gb=8.0)
    assert refused.value.param == "training.packing"
