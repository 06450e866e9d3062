"""evaluate_adapter through MCP: an adapter trained to answer in a JSON format beats its base on held-out
prompts it never saw, and the report carries the forgetting probe and sample answers."""

import json

import anyio
import pytest
from mcp import Client

from fts_mcp.server import mcp
from tests.conftest import FAST_TRAINING, write_jsonl

pytestmark = [pytest.mark.anyio, pytest.mark.slow]
WORDS = ["printer", "laptop", "router", "monitor", "keyboard", "screen", "battery", "mouse", "cable", "server",
         "phone", "tablet", "camera", "speaker", "charger", "drive"]
ANSWER = '{"team": "hardware"}'


@pytest.fixture
def anyio_backend():
    return "asyncio"


async def finished(client, job_id, timeout=240):
    with anyio.fail_after(timeout):
        while True:
            job = (await client.call_tool("job_status", {"job_id": job_id, "wait_seconds": 5})).structured_content
            if job["state"] in ("succeeded", "failed", "cancelled", "interrupted"):
                return job


async def test_a_trained_adapter_beats_its_base_on_held_out_data(fts_home, tiny_model, tmp_path):
    train = write_jsonl(tmp_path / "train.jsonl", [{"prompt": f"Ticket: my {w} is broken\nRoute:", "completion": ANSWER}
                                                   for w in WORDS[:12]])
    held_out = write_jsonl(tmp_path / "held_out.jsonl", [{"prompt": f"Ticket: my {w} is broken\nRoute:",
                                                          "completion": ANSWER} for w in WORDS[12:]])
    async with Client(mcp) as client:
        job = (await client.call_tool("start_qlora_job", {
            "base_model": str(tiny_model), "dataset": str(train), "quantization": "none",
            "lora": {"r": 8, "dropout": 0.0}, "training": {**FAST_TRAINING, "max_steps": 40}})).structured_content
        trained = await finished(client, job["job_id"])
        assert trained["state"] == "succeeded", trained
        assert trained["next"][0]["tool"] == "evaluate_adapter"
        started = await client.call_tool("evaluate_adapter", {"adapter": job["job_id"], "dataset": str(held_out)})
        assert not started.is_error, started.content[0].text
        done = await finished(client, started.structured_content["job_id"])
        assert done["state"] == "succeeded", done
        report = json.loads((await client.read_resource(f"fts://jobs/{done['job_id']}/eval")).contents[0].text)
        missing = await client.call_tool("evaluate_adapter", {"adapter": job["job_id"]})
        # the same comparison for a store reference and for the merged model
        await client.call_tool("deploy_adapter", {"adapter": job["job_id"], "name": "router"})
        merge = (await client.call_tool("merge_adapter", {"adapter": job["job_id"], "dtype": "float32"}))
        merged = await finished(client, merge.structured_content["job_id"])
        both = await client.call_tool("evaluate_adapter", {"adapter": "router@v1", "dataset": str(held_out),
                                                           "answer_format": "json", "regex": ".*"})
        others = []
        for args in ({"adapter": "router@v1"}, {"merged_model": merged["artifacts"]["output_dir"]}):
            started = await client.call_tool("evaluate_adapter", {**args, "dataset": str(held_out),
                                                                  "max_examples": 2})
            assert not started.is_error, started.content[0].text
            others.append(await finished(client, started.structured_content["job_id"]))
    evaluation = done["artifacts"]["evaluation"]
    assert evaluation["examples"] == 4 and report["examples"] == 4
    assert evaluation["adapter"]["exact_match"] == 1.0 > evaluation["base"]["exact_match"]
    assert evaluation["adapter"]["format_ok"] == 1.0  # the expected answers are JSON: checked as such
    assert evaluation["adapter"]["loss"] < evaluation["base"]["loss"] and evaluation["better"]
    assert evaluation["base"]["general_text_perplexity"] > 0 and evaluation["adapter"]["general_text_perplexity"] > 0
    assert evaluation["samples"] and evaluation["samples"][0]["adapter"].strip() == ANSWER
    # better and (on a random tiny model) perhaps worse on general text: the hint follows the verdict
    if evaluation["forgetting"]:
        assert done["next"][0]["tool"] == "start_qlora_job" and "forgot" in done["next"][0]["why"]
    else:
        assert done["next"][0]["tool"] == "deploy_adapter"
        assert done["next"][0]["arguments"]["adapter"] == job["job_id"]  # what the caller named
    assert missing.is_error and "dataset:" in missing.content[0].text  # no eval split kept: name the fix
    for other in others:
        assert other["state"] == "succeeded", other
        assert other["artifacts"]["evaluation"]["adapter"]["exact_match"] == 1.0
    if not others[0]["artifacts"]["evaluation"]["forgetting"]:
        assert others[0]["next"][0]["arguments"]["adapter"] == "router@v1"  # what the caller named, not a folder
    assert others[1]["next"][0]["tool"] == "generate"
    assert both.is_error and "regex" in both.content[0].text
