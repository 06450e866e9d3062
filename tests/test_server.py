"""The MCP layer through an in-process client, on both protocol generations (2026-07-28 and 2025-11-25)."""

import json

import pytest
from mcp import Client, MCPError

from fts_mcp.server import mcp
from tests.conftest import SAMPLE_CHAT, write_jsonl

pytestmark = pytest.mark.anyio
MODES = pytest.mark.parametrize("mode", ["auto", "legacy"])
# Every tool's annotations, stated once: (read_only, destructive, idempotent, open_world). Idempotent means the
# same call again changes nothing more: merge and deploy return the first result, cancel returns an ended job
# unchanged. Resuming twice is refused the second time (the job is no longer stopped), so it is not idempotent.
ANNOTATIONS = {
    "recommend_ft_vs_rag": (True, False, True, False),
    "estimate_resources": (True, False, True, False),
    "validate_dataset": (True, False, True, False),
    "start_qlora_job": (False, False, False, False),
    "job_status": (True, False, True, False),
    "list_jobs": (True, False, True, False),
    "cancel_job": (False, True, True, False),
    "resume_job": (False, False, False, False),
    "merge_adapter": (False, False, True, False),
    "deploy_adapter": (False, False, True, False),
    "list_adapters": (True, False, True, False),
    "generate": (False, False, False, True),
}
TOOLS = set(ANNOTATIONS)


@MODES
async def test_tools_have_schemas_and_honest_annotations(fts_home, mode):
    async with Client(mcp, mode=mode) as client:
        tools = {t.name: t for t in (await client.list_tools()).tools}
    assert set(tools) == TOOLS
    for name, expected in ANNOTATIONS.items():
        a = tools[name].annotations
        assert (a.read_only_hint, a.destructive_hint, a.idempotent_hint, a.open_world_hint) == expected, name
        assert tools[name].output_schema is not None and tools[name].description
    assert "queued" in tools["start_qlora_job"].description and "running" in tools["start_qlora_job"].description
    assert tools["job_status"].input_schema["properties"]["wait_seconds"]["maximum"] == 300
    lora = tools["start_qlora_job"].input_schema["$defs"]["LoraSpec"]["properties"]
    assert lora["r"]["default"] == 16 and lora["target_modules"]["default"] == "all-linear"


@MODES
async def test_validate_dataset_reports_lines_and_token_stats(fts_home, tiny_model, tmp_path, mode):
    bad = write_jsonl(tmp_path / "bad.jsonl", ['{"messages": [{"role": "user", "content": "q"}, '
                                               '{"role": "assistant", "content": "a"}]}', "{oops", {"text": 1}])
    async with Client(mcp, mode=mode) as client:
        report = (await client.call_tool("validate_dataset", {"path": str(bad)})).structured_content
        assert report["ok"] is False and [e["line"] for e in report["errors"]] == [2, 3]
        good = (await client.call_tool("validate_dataset", {"path": str(SAMPLE_CHAT), "base_model": str(tiny_model),
                                                            "max_seq_len": 64})).structured_content
    assert good["ok"] and good["format"] == "chat" and good["examples"] == 16
    stats = good["token_stats"]
    assert 0 < stats["min"] <= stats["p50"] <= stats["max"] and stats["trained_tokens"] < stats["total_tokens"]
    assert stats["over_max_seq_len"] == 16 and any("truncated" in w for w in good["warnings"])


@MODES
async def test_bad_dataset_is_refused_and_nothing_is_queued(fts_home, tiny_model, tmp_path, mode):
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"messages": [{"role": "user", "content": "q"},
                                                             {"role": "robot", "content": "a"}]}])
    async with Client(mcp, mode=mode) as client:
        result = await client.call_tool("start_qlora_job", {"base_model": str(tiny_model), "dataset": str(bad)})
        assert result.is_error
        assert "line 1" in result.content[0].text and "robot" in result.content[0].text
        listing = (await client.call_tool("list_jobs", {})).structured_content
    assert listing["total"] == 0


@MODES
@pytest.mark.parametrize("args, names", [
    ({"dataset": "/etc/passwd"}, ["dataset", "outside the allowed roots"]),
    ({"base_model": "/usr/lib"}, ["base_model", "outside the allowed roots"]),
    ({"base_model": "not a model!"}, ["base_model", "hub id"]),
    ({"output_name": "../x"}, ["output_name", "letters, digits"]),
    ({"resume_from": "job-nope"}, ["resume_from", "not a job id"]),
    ({"resume_from": "job-000000000000"}, ["job_id", "no job job-000000000000"]),
    ({"lora": {"r": 0}}, ["r", "greater than or equal to 1"]),
    ({"lora": {"r": 8, "rank": 8}}, ["rank", "Extra inputs are not permitted"]),
    ({"training": {"learning_rate": -1}}, ["learning_rate", "greater than 0"]),
    ({"quantization": "int3"}, ["quantization", "nf4"]),
])
async def test_bad_arguments_name_the_argument(fts_home, tiny_model, mode, args, names):
    call = {"base_model": str(tiny_model), "dataset": str(SAMPLE_CHAT), **args}
    async with Client(mcp, mode=mode) as client:
        result = await client.call_tool("start_qlora_job", call)
        assert result.is_error
        for name in names:
            assert name in result.content[0].text
        assert (await client.call_tool("list_jobs", {})).structured_content["total"] == 0


@MODES
async def test_unknown_and_malformed_job_ids(fts_home, mode):
    async with Client(mcp, mode=mode) as client:
        for tool in ("job_status", "cancel_job", "resume_job"):
            unknown = await client.call_tool(tool, {"job_id": "job-000000000000"})
            assert unknown.is_error and "no job job-000000000000" in unknown.content[0].text
            malformed = await client.call_tool(tool, {"job_id": "rm -rf"})
            assert malformed.is_error and "not a job id" in malformed.content[0].text
        with pytest.raises(MCPError):
            await client.read_resource("fts://jobs/job-000000000000")


@MODES
async def test_uncached_hub_model_on_offline_host_fails_without_hanging(fts_home, mode):
    async with Client(mcp, mode=mode) as client:
        job = (await client.call_tool("start_qlora_job", {"base_model": "acme/not-downloaded-7b",
                                                          "dataset": str(SAMPLE_CHAT)})).structured_content
        assert job["state"] == "failed"
        assert job["error"]["code"] == "model_unavailable" and job["error"]["param"] == "base_model"
        assert "offline" in job["error"]["message"]
        text = (await client.read_resource(f"fts://jobs/{job['job_id']}")).contents[0].text
        assert json.loads(text)["state"] == "failed"
        listed = (await client.call_tool("list_jobs", {"state": "failed"})).structured_content
        assert [j["job_id"] for j in listed["jobs"]] == [job["job_id"]]
        assert (await client.call_tool("list_jobs", {"state": "running"})).structured_content["total"] == 0
        again = await client.call_tool("cancel_job", {"job_id": job["job_id"]})  # idempotent: returned unchanged
        assert not again.is_error
        assert {k: again.structured_content[k] for k in ("state", "error", "updated_at", "finished_at")} == \
            {k: job[k] for k in ("state", "error", "updated_at", "finished_at")}


async def test_merge_adapter_refuses_through_mcp_with_the_argument_named(fts_home, tiny_model):
    async with Client(mcp) as client:
        tool = {t.name: t for t in (await client.list_tools()).tools}["merge_adapter"]
        assert "cat" in tool.description and "equal ranks" in tool.description
        result = await client.call_tool("merge_adapter", {"adapter": str(fts_home), "base_model": str(tiny_model)})
        text = result.content[0].text
        assert result.is_error and text.startswith("Error executing tool merge_adapter: adapter:")
        assert "adapter_config.json" in text
        result = await client.call_tool("merge_adapter", {"adapters": [{"adapter": "x", "weight": 1, "extra": 2}]})
        assert result.is_error and "extra" in result.content[0].text
