"""Planning tools, reference documents and prompts through an MCP client, on both protocol generations."""

import json

import pytest
from mcp import Client, MCPError

from fts_mcp.docs import DOC_TOPICS
from fts_mcp.server import mcp
from tests.conftest import SAMPLE_CHAT

pytestmark = pytest.mark.anyio
MODES = pytest.mark.parametrize("mode", ["auto", "legacy"])


@MODES
async def test_reference_documents_are_listed_and_readable(fts_home, mode):
    async with Client(mcp, mode=mode) as client:
        listed = {str(r.uri) for r in (await client.list_resources()).resources}
        templates = {t.uri_template for t in (await client.list_resource_templates()).resource_templates}
        assert "fts://docs" in listed and "fts://docs/{topic}" in templates
        index = (await client.read_resource("fts://docs")).contents[0].text
        for topic in DOC_TOPICS:
            assert f"`{topic}`" in index
            text = (await client.read_resource(f"fts://docs/{topic}")).contents[0].text
            assert text.startswith("# ")
        with pytest.raises(MCPError):
            await client.read_resource("fts://docs/astrology")


@MODES
async def test_planning_tools_through_a_client(fts_home, tiny_model, mode):
    async with Client(mcp, mode=mode) as client:
        tools = {t.name: t for t in (await client.list_tools()).tools}
        assert tools["recommend_ft_vs_rag"].annotations.read_only_hint
        assert tools["estimate_resources"].annotations.read_only_hint
        advice = (await client.call_tool("recommend_ft_vs_rag", {"knowledge_changes": "daily", "output_format": True,
                                                                 "labelled_examples": 4000})).structured_content
        assert advice["recommendation"] == "both" and advice["conflicts"]
        plan = (await client.call_tool("estimate_resources", {"params": 70_000_000_000, "gpu": "H100",
                                                              "dataset_examples": 10_000})).structured_content
        by = {e["method"]: e for e in plan["estimates"]}
        assert set(by) == {"full", "lora", "qlora"} and plan["recommended_method"] == "qlora"
        assert by["qlora"]["fits"] and not by["full"]["fits"] and by["full"]["gpus_needed"] > 10
        assert by["qlora"]["throughput"]["cost_usd"] > 0
        local = (await client.call_tool("estimate_resources", {"base_model": str(tiny_model), "method": "qlora"}))
        assert local.structured_content["architecture"]["hidden"] == 64
        pairs = (await client.call_tool("estimate_resources", {"params": 70_000_000_000, "gpu": "H100",
                                                               "method": "qlora", "objective": "dpo"}))
        dpo = pairs.structured_content["estimates"][0]["memory"]
        assert dpo["reference_forward_gb"] > 0 and dpo["activations_gb"] > by["qlora"]["memory"]["activations_gb"]


@MODES
@pytest.mark.parametrize("tool, args, words", [
    ("estimate_resources", {"params": -5}, ["params", "greater than or equal"]),
    ("estimate_resources", {"params": 10**9, "micro_batch": 0}, ["micro_batch"]),
    ("estimate_resources", {"params": 10**9, "gpu": "Voodoo2"}, ["gpu", "H100", "A100-80GB"]),
    ("estimate_resources", {"base_model": "/nonexistent/model"}, ["base_model", "outside the allowed roots"]),
    ("estimate_resources", {"layers": 2, "hidden": 64}, ["intermediate", "heads", "vocab"]),
    ("estimate_resources", {"params": 10**9, "target_modules": ["c_attn"]}, ["target_modules", "q_proj"]),
    ("recommend_ft_vs_rag", {"budget": "infinite"}, ["budget", "tight"]),
    ("recommend_ft_vs_rag", {"labelled_examples": -3}, ["labelled_examples"]),
])
async def test_bad_planning_inputs_name_the_field(fts_home, mode, tool, args, words):
    async with Client(mcp, mode=mode) as client:
        result = await client.call_tool(tool, args)
    assert result.is_error
    for word in words:
        assert word in result.content[0].text


async def test_prompts(fts_home):
    async with Client(mcp) as client:
        assert {p.name for p in (await client.list_prompts()).prompts} >= {"plan_finetune", "diagnose_job"}
        plan = await client.get_prompt("plan_finetune", {"use_case": "support replies in our JSON schema",
                                                         "data_available": "3,000 tickets", "hardware": "one L4"})
        text = plan.messages[0].content.text
        assert "recommend_ft_vs_rag" in text and "estimate_resources" in text and "start_qlora_job" in text
        job = (await client.call_tool("start_qlora_job", {"base_model": "acme/not-cached",
                                                          "dataset": str(SAMPLE_CHAT)})).structured_content
        log = fts_home / "jobs" / job["job_id"] / "worker.log"
        log.write_text("".join(f"step {i} loss=2.0 " + "x" * 300 + "\n" for i in range(500)))  # a long, noisy log
        diagnosis = (await client.get_prompt("diagnose_job", {"job_id": job["job_id"]})).messages[0].content.text
        assert "base model unavailable" in diagnosis and "download" in diagnosis
        assert len(diagnosis) < 4_000 and f"fts://jobs/{job['job_id']}/loss.png" in diagnosis
        metrics = (await client.read_resource(f"fts://jobs/{job['job_id']}/metrics")).contents[0].text
        assert json.loads(metrics) == {"job_id": job["job_id"], "points": []}
