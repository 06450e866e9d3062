"""Preference tuning (method "dpo") end to end through MCP on the tiny model, in detached workers: a DPO job that is
cancelled and resumed learns to prefer the chosen answers and job_status shows its reward margin and preference
accuracy; an SFT job's adapter seeds a DPO job, which evaluate_adapter scores on the pairs. Both are `extended`
(CI's second step); the recipe's side (the loss, the reference, the data) is tests/training/test_preference.py."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.conftest import FAST_TRAINING, SAMPLE_COMPLETION, write_jsonl
from tests.test_e2e import TERMINAL, call, connect, until

pytestmark = [pytest.mark.anyio, pytest.mark.slow]


def codeword_pairs(folder: Path) -> Path:
    """The 16 code-word prompts, each with its own code word chosen and the next prompt's rejected."""
    rows = [json.loads(line) for line in SAMPLE_COMPLETION.read_text().splitlines()]
    pairs = [{"prompt": r["prompt"], "chosen": r["completion"], "rejected": rows[(i + 1) % len(rows)]["completion"]}
             for i, r in enumerate(rows)]
    return write_jsonl(folder / "pairs.jsonl", pairs)


@pytest.mark.extended  # CI's second step: the main run keeps SFT's cancel/resume; DPO's recipe is tested there too
async def test_a_dpo_job_cancelled_and_resumed_learns_the_preferences(fts_home, tiny_model, tmp_path):
    pairs = codeword_pairs(tmp_path)
    async with connect(fts_home) as client:
        refused = await client.call_tool("start_qlora_job", {"base_model": str(tiny_model), "dataset": str(pairs)})
        assert refused.is_error and "method='dpo'" in refused.content[0].text  # pairs need the method named

        job = await call(client, "start_qlora_job", base_model=str(tiny_model), dataset=str(pairs), method="dpo",
                         quantization="nf4", lora={"r": 16}, training={**FAST_TRAINING, "max_steps": 40,
                                                                      "checkpoint_every_steps": 5, "beta": 0.5})
        assert job["spec"]["method"] == "dpo"
        job_id = job["job_id"]
        first = await until(client, job_id, lambda j: j["progress"].get("preference_accuracy") is not None, 120,
                            "a logged step")
        await until(client, job_id, lambda j: j["progress"]["step"] >= 6, 120, "a checkpoint")
        await call(client, "cancel_job", job_id=job_id)
        cancelled = await until(client, job_id, lambda j: j["state"] in TERMINAL, 60, "the cancel")
        assert cancelled["state"] == "cancelled" and cancelled["resumable"], cancelled
        checkpoint = Path(cancelled["artifacts"]["checkpoint_dir"])
        assert (checkpoint / "optimizer.pt").exists()

        await call(client, "resume_job", job_id=job_id)
        done = await until(client, job_id, lambda j: j["state"] in TERMINAL, 120, "the resumed job")
        assert done["state"] == "succeeded", done
        assert done["progress"]["step"] == 40 and done["process"]["attempts"] == 2
        log = (await client.read_resource(f"fts://jobs/{job_id}/log")).contents[0].text
        assert f"resuming from {checkpoint}" in log
        progress = done["progress"]
        assert progress["preference_accuracy"] == 1.0  # chosen rewarded above rejected on every training pair
        assert progress["reward_margin"] > first["progress"]["reward_margin"] + 1.0, (first["progress"], progress)
        history = json.loads(Path(done["artifacts"]["metrics"]).read_text())["log_history"]
        assert [h["step"] for h in history if "loss" in h] == list(range(1, 41))  # one curve across the resume



@pytest.mark.extended  # three more workers (CI's second step); the recipe's side is tests/training/test_preference.py
async def test_dpo_starts_from_a_finished_sft_jobs_adapter_and_is_evaluated_on_pairs(fts_home, tiny_model, tmp_path):
    pairs = codeword_pairs(tmp_path)
    settings = {**FAST_TRAINING, "max_steps": 5, "checkpoint_every_steps": 100}
    async with connect(fts_home) as client:
        sft = await call(client, "start_qlora_job", base_model=str(tiny_model), dataset=str(SAMPLE_COMPLETION),
                         quantization="none", lora={"r": 8}, training=settings)
        sft = await until(client, sft["job_id"], lambda j: j["state"] in TERMINAL, 120, "the sft job")
        assert sft["state"] == "succeeded", sft
        dpo = await call(client, "start_qlora_job", base_model=str(tiny_model), dataset=str(pairs), method="dpo",
                         lora={"r": 8}, resume_from=sft["job_id"], training=settings)
        assert dpo["spec"]["resumed_from_job"] == sft["job_id"]
        done = await until(client, dpo["job_id"], lambda j: j["state"] in TERMINAL, 120, "the dpo job")
        assert done["state"] == "succeeded", done
        assert done["progress"]["step"] == 5  # a fresh run from the SFT weights, not the SFT job's step count
        spec = (await call(client, "job_status", job_id=dpo["job_id"], detail=True))["spec"]
        assert spec["init_adapter"] == sft["artifacts"]["adapter_dir"] and spec["resume_checkpoint"] is None
        saved = Path(done["artifacts"]["adapter_dir"])
        assert not (saved / "ref").exists()  # the frozen reference copy is not part of the adapter

        evaluation = await call(client, "evaluate_adapter", adapter=dpo["job_id"], dataset=str(pairs))
        scored = await until(client, evaluation["job_id"], lambda j: j["state"] in TERMINAL, 120, "the evaluation")
        assert scored["state"] == "succeeded", scored
        found = scored["artifacts"]["evaluation"]
        assert {"preference_accuracy", "logp_margin", "loss"} <= set(found["base"]) & set(found["adapter"]), found
        assert found["samples"] and {"chosen", "rejected", "adapter_logp_margin"} <= set(found["samples"][0])
