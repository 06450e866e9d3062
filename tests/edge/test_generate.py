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
