"""generate without a runtime: a one-shot job that waits at most what the agent asked, and never outlives it."""

import anyio
import pytest
from mcp import Client

from fts_mcp.server import mcp

pytestmark = pytest.mark.anyio


async def jobs_of_kind(client, kind):
    listing = (await client.call_tool("list_jobs", {"limit": 50})).structured_content["jobs"]
    return [j for j in listing if j["kind"] == kind]


async def test_a_one_shot_generate_past_its_timeout_is_cancelled(fts_home, tiny_model):
    async with Client(mcp) as client:
        result = await client.call_tool("generate", {"model": "base", "base_model": str(tiny_model), "prompt": "hi",
                                                     "timeout_seconds": 0.5})
        assert result.is_error and "timeout" in result.content[0].text and "cancelled" in result.content[0].text
        (row,) = await jobs_of_kind(client, "generate")
        job = (await client.call_tool("job_status", {"job_id": row["job_id"]})).structured_content
        assert job["process"]["cancel_requested"] or job["state"] == "cancelled"


async def test_a_client_that_gives_up_leaves_no_job_behind(fts_home, tiny_model):
    async with Client(mcp) as client:
        with anyio.move_on_after(0.5):
            await client.call_tool("generate", {"model": "base", "base_model": str(tiny_model), "prompt": "hi"})
        await anyio.sleep(0.5)
        (job,) = await jobs_of_kind(client, "generate")
        job_id = job["job_id"]

        async def state():
            return (await client.call_tool("job_status", {"job_id": job_id})).structured_content["state"]

        deadline = anyio.current_time() + 60
        while (current := await state()) not in ("cancelled", "succeeded", "failed", "interrupted"):
            assert anyio.current_time() < deadline
            await anyio.sleep(0.2)
        assert current == "cancelled"


@pytest.mark.slow
async def test_a_one_shot_generate_takes_an_adapter_folder_and_says_it_needs_a_store_for_a_runtime(fts_home,
                                                                                                  tiny_model):
    from tests.conftest import make_adapter

    adapter = make_adapter(tiny_model, fts_home.parent / "folder-adapter", r=4, seed=3)
    async with Client(mcp) as client:
        answer = await client.call_tool("generate", {"model": str(adapter), "prompt": "hi", "max_tokens": 3})
        assert not answer.is_error, answer.content[0].text
        assert answer.structured_content["via"] == "job"
        (row,) = await jobs_of_kind(client, "generate")
        job = (await client.call_tool("job_status", {"job_id": row["job_id"], "detail": True})).structured_content
        assert job["spec"]["adapter_dir"] == str(adapter) and job["spec"]["base_model"] == str(tiny_model)
        refused = await client.call_tool("generate", {"model": str(adapter), "prompt": "hi", "runtime_url": "local"})
        assert refused.is_error and "deploy_adapter" in refused.content[0].text
