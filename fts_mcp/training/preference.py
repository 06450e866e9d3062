"""Preference tuning (method "dpo"): TRL's DPOTrainer on the job's preference pairs, with the job's LoRA config.

The recipe (`fts_mcp.training.recipe`) runs it like SFT: the same loading, speed plan, checkpoints, cancel and
resume, progress and saving; only the trainer differs. The loss is DPO's sigmoid loss,
-log sigmoid(beta * ((log p(chosen) - log ref(chosen)) - (log p(rejected) - log ref(rejected)))), with each
log-probability summed over the answer's tokens.

The reference costs no second copy of the model:

* a new adapter: the reference is the base with the adapter switched off (TRL's way with a PEFT model);
* after an SFT job (`spec.init_adapter`): the policy starts from that adapter and the reference is a frozen copy of
  it (TRL's "ref" adapter, adapter-sized), i.e. the SFT model, as in Zephyr and the DPO paper. With the base as the
  reference instead, every pair would start with the SFT job's own log-ratio as its reward and the KL term would
  pull the adapter back towards the base, undoing what SFT taught.

Rows arrive tokenized by `fts_mcp.models.prompts.encode_preference` (the encoding SFT, evaluation and generation
use), so TRL's own tokenization is skipped.
"""

from __future__ import annotations

from typing import Any

from datasets import Dataset
from peft import LoraConfig, PeftModel
from transformers import TrainerCallback
from trl import DPOConfig, DPOTrainer

from fts_mcp.training.spec import TrainJobSpec

# What TRL logs, and where job_status shows it (fts_mcp.jobs.records.Progress)
FIGURES = {"rewards/margins": "reward_margin", "rewards/accuracies": "preference_accuracy",
           "eval_rewards/margins": "eval_reward_margin", "eval_rewards/accuracies": "eval_preference_accuracy"}


def dpo_config(spec: TrainJobSpec, common: dict[str, Any]) -> DPOConfig:
    """The training arguments every job shares (`common`), plus DPO's: beta, and each sequence (prompt + one
    answer) cut at max_seq_len from its start."""
    return DPOConfig(**common, beta=spec.training.beta, loss_type=["sigmoid"], max_length=spec.training.max_seq_len,
                     truncation_mode="keep_start", padding_free=False, precompute_ref_log_probs=False)


class PreferenceTrainer(DPOTrainer):
    """DPOTrainer taking rows already tokenized (`prompt_ids`, `chosen_ids`, `rejected_ids`), and counting trained
    tokens (both sequences of each pair, from the attention mask) for the tokens/s figure."""

    def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
        if "prompt_ids" in dataset.column_names:
            return dataset
        return super()._prepare_dataset(dataset, processing_class, args, dataset_name)

    def training_step(self, model, inputs, num_items_in_batch=None):
        self.state.num_input_tokens_seen += int(inputs["attention_mask"].sum())
        return super().training_step(model, inputs, num_items_in_batch)


def policy(spec: TrainJobSpec, model: Any) -> tuple[Any, LoraConfig | None]:
    """The model to train and the LoRA config to add: a new adapter, or (after SFT) the SFT adapter itself,
    trainable, and none to add."""
    lora = LoraConfig(r=spec.lora.r, lora_alpha=spec.lora.effective_alpha, lora_dropout=spec.lora.dropout,
                      target_modules=spec.lora.target_modules, bias="none", task_type="CAUSAL_LM")
    if spec.init_adapter is None:
        return model, lora
    return PeftModel.from_pretrained(model, spec.init_adapter, is_trainable=True), None


def make_dpo_trainer(spec: TrainJobSpec, common: dict[str, Any], model: Any, tokenizer: Any, train_data: Dataset,
                     eval_data: Dataset | None, callbacks: list[TrainerCallback]) -> PreferenceTrainer:
    """TRL's DPOTrainer with `common` (the recipe's training arguments, batch shape from the speed plan) and no
    reference model: TRL switches the adapter off (or to the frozen "ref" copy after SFT) for the reference pass."""
    model, lora = policy(spec, model)
    return PreferenceTrainer(model=model, ref_model=None, args=dpo_config(spec, common),
                             train_dataset=train_data, eval_dataset=eval_data, processing_class=tokenizer,
                             peft_config=lora, callbacks=callbacks)

