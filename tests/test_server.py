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
    "deploy_adapter": (False, False, True, True),  # may load it into a runtime at a URL
    "list_adapters": (True, False, True, False),
    "list_models": (True, False, True, False),
    "evaluate_adapter": (False, False, False, False),
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
    assert "fts://docs/settings" in tools["start_qlora_job"].input_schema["properties"]["training"]["description"]


async def test_the_settings_reference_is_rendered_from_the_models(fts_home):
    async with Client(mcp) as client:
        text = (await client.read_resource("fts://docs/settings")).contents[0].text
    assert "| `r` | int | `16` | ≥ 1, ≤ 1024 |" in text
    assert "| `micro_batch_size` | int or null | `null` |" in text
    assert "| `padding_free` | bool | `true` |" in text and "| `target_modules` |" in text


# ---- what an agent pays ------------------------------------------------------------------------------------------

TOOLS_LIST_BUDGET = 24_000
TOOL_BUDGET = 4_000


async def test_tools_list_fits_the_context_budget(fts_home):
    """Every tool's JSON (name, title, description, input and output schema, annotations) is in the agent's
    context on every turn."""
    async with Client(mcp) as client:
        tools = (await client.list_tools()).tools
    sizes = {t.name: len(json.dumps(t.model_dump(mode="json", exclude_none=True))) for t in tools}
    assert set(sizes) == TOOLS
    assert sum(sizes.values()) <= TOOLS_LIST_BUDGET, sizes
    assert max(sizes.values()) <= TOOL_BUDGET, sizes


async def test_list_jobs_costs_at_most_400_characters_a_job(fts_home):
    async with Client(mcp) as client:
        for _ in range(3):
            await client.call_tool("start_qlora_job", {"base_model": "acme/not-cached-model-with-a-long-name",
                                                       "dataset": str(SAMPLE_CHAT)})
        result = await client.call_tool("list_jobs", {})
    jobs = result.structured_content["jobs"]
    assert len(jobs) == 3
    assert all(len(json.dumps(j)) <= 400 for j in jobs), [len(json.dumps(j)) for j in jobs]
    assert len(result.content[0].text) <= 400 * 3 + 50


@pytest.mark.parametrize("tool, args, words", [
    ("start_qlora_job", {"base_model": "m", "dataset": "d", "training": {"micro_batch": 8}},
     "training.micro_batch: not a known argument; did you mean training.micro_batch_size?"),
    ("start_qlora_job", {"base_model": "m", "dataset": "d", "lora": {"rank": 8}},
     "lora.rank: not a known argument; did you mean lora.r?"),
    ("start_qlora_job", {"base_model": "m", "dataset": "d", "batch_size": 8},
     "batch_size: not a known argument; did you mean training.batch_size?"),
    ("start_qlora_job", {"base_model": "m", "dataset": "d", "zzz": 8}, "zzz: not a known argument; arguments:"),
    ("start_qlora_job", {"base_model": "m", "datset": "d"}, "datset: not a known argument; did you mean dataset?"),
    ("start_qlora_job", {"base_modle": "m", "datset": "d"},  # every unknown argument in one answer
     "base_modle: not a known argument; did you mean base_model?; datset: not a known argument; did you mean "
     "dataset?"),
    ("start_qlora_job", {"base_model": "m", "dataset": "d", "training": {"steps": 30, "lr": 1e-3}},
     "training.steps: not a known argument; did you mean training.max_steps?; training.lr: not a known argument; "
     "did you mean training.learning_rate?"),
    ("merge_adapter", {"adapters": [{"adapter": "a", "wieght": 2}]},
     "adapters[0].wieght: not a known argument; did you mean adapters[0].weight?"),
    ("list_jobs", {"limit": 0}, "limit: should be greater than or equal to 1; got 0"),
])
async def test_argument_errors_say_what_to_fix_without_library_noise(fts_home, tool, args, words):
    async with Client(mcp) as client:
        result = await client.call_tool(tool, args)
    text = result.content[0].text
    assert result.is_error and words in text, text
    assert "pydantic" not in text and "http" not in text and "Arguments" not in text


async def test_long_polls_stay_within_what_any_client_waits_for(fts_home, monkeypatch):
    """Without a progress token the wait is capped well under the 60 s many clients allow, and the answer says so;
    with one (the client resets its timer on each progress notification) the agent's wait is honoured."""
    import subprocess
    import sys
    import time

    import fts_mcp.server as server
    from fts_mcp.config import Settings
    from fts_mcp.jobs.states import JobState
    from fts_mcp.jobs.store import JobStore

    monkeypatch.setattr(server, "SAFE_WAIT_SECONDS", 0.3)
    settings = Settings.from_env()
    store = JobStore(settings)
    holder = store.create("train", {"output_name": "holds-the-slot"})  # a live "worker" keeps the only slot busy
    store.transition(holder.job_id, JobState.QUEUED)
    store.claim_next(settings.slots)
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])  # the holder's "worker"
    store.set_fields(holder.job_id, supervisor_pid=sleeper.pid, pid=sleeper.pid)
    store.heartbeat(holder.job_id)
    waiting = store.create("train", {"output_name": "waits"})
    store.transition(waiting.job_id, JobState.QUEUED)
    store.close()

    heard = []

    async def on_progress(progress, total, message):
        heard.append(progress)

    monkeypatch.setattr(server, "HEARTBEAT_SECONDS", 0.2)
    async with Client(mcp, mode="legacy") as client:
        started = time.monotonic()
        capped = await client.call_tool("job_status", {"job_id": waiting.job_id, "wait_seconds": 1.0})
        capped_for = time.monotonic() - started
        started = time.monotonic()
        honoured = await client.call_tool("job_status", {"job_id": waiting.job_id, "wait_seconds": 1.0},
                                          progress_callback=on_progress)
        honoured_for = time.monotonic() - started
    sleeper.kill()
    sleeper.wait()
    assert capped.structured_content["state"] == honoured.structured_content["state"] == "queued"
    assert capped_for < 0.9 and "waited at most 0.3 s" in capped.content[0].text
    assert "waited at most 0.3 s" in capped.structured_content["note"]  # said in the structured answer too
    assert honoured_for >= 0.9 and "waited at most" not in honoured.content[0].text
    assert len(heard) >= 3 and heard == sorted(set(heard))  # heartbeats while nothing moves, always rising


async def test_answers_say_what_to_do_next(fts_home, tiny_model, tmp_path):
    async with Client(mcp) as client:
        report = (await client.call_tool("validate_dataset", {"path": str(SAMPLE_CHAT),
                                                              "base_model": str(tiny_model)})).structured_content
        assert report["next"][0]["tool"] == "start_qlora_job"
        assert report["next"][0]["arguments"] == {"base_model": str(tiny_model), "dataset": str(SAMPLE_CHAT)}
        failed = (await client.call_tool("start_qlora_job", {"base_model": "acme/not-cached",
                                                             "dataset": str(SAMPLE_CHAT)})).structured_content
        assert failed["state"] == "failed" and failed["next"][0]["tool"] == "job_status"



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
    ({"resume_from": "job-000000000000"}, ["resume_from", "no job job-000000000000"]),
    ({"lora": {"r": 0}}, ["r", "greater than or equal to 1"]),
    ({"lora": {"r": 8, "rank": 8}}, ["lora.rank", "not a known argument"]),
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
        assert {k: again.structured_content[k] for k in ("state", "error", "times")} == \
            {k: job[k] for k in ("state", "error", "times")}


async def test_merge_adapter_refuses_through_mcp_with_the_argument_named(fts_home, tiny_model):
    async with Client(mcp) as client:
        tool = {t.name: t for t in (await client.list_tools()).tools}["merge_adapter"]
        combination = tool.input_schema["properties"]["combination"]
        assert "cat" in combination["enum"] and "equal ranks" in combination["description"]
        result = await client.call_tool("merge_adapter", {"adapter": str(fts_home), "base_model": str(tiny_model)})
        text = result.content[0].text
        assert result.is_error and text.startswith("Error executing tool merge_adapter: adapter:")
        assert "adapter_config.json" in text
        result = await client.call_tool("merge_adapter", {"adapters": [{"adapter": "x", "weight": 1, "extra": 2}]})
        assert result.is_error and "extra" in result.content[0].text
