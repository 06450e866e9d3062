"""A runtime managed through MCP: deploy_adapter(runtime_url="local") starts one as a `runtime` job, later
deploys (from a restarted server too) load into the same one, generate reaches it, and cancel_job stops it."""

import httpx
import pytest
from mcp import Client

from tests.conftest import make_adapter, server_params
from tests.test_e2e import call, until

pytestmark = [pytest.mark.slow, pytest.mark.anyio]


async def test_the_managed_runtime_starts_serves_survives_a_restart_and_stops(fts_home, tiny_model):
    first = make_adapter(tiny_model, fts_home / "first", r=4, seed=1)
    second = make_adapter(tiny_model, fts_home / "second", r=4, seed=2)
    async with Client(server_params(fts_home)) as client:
        deployed = await call(client, "deploy_adapter", adapter=str(first), name="first", runtime_url="local")
        assert deployed["loaded"] is True
        job_id, url = deployed["runtime_job"], deployed["runtime"]
        assert url.startswith("http://127.0.0.1:") and url in deployed["curl"]
        stop = next(step for step in deployed["next"] if step["tool"] == "cancel_job")  # how to stop it, said
        assert stop["arguments"] == {"job_id": job_id}
        rows = (await call(client, "list_jobs"))["jobs"]
        assert [(r["job_id"], r["state"]) for r in rows if r["kind"] == "runtime"] == [(job_id, "running")]
        answer = await call(client, "generate", model="first@v1", prompt="hi", max_tokens=4, runtime_url="local")
        assert answer["via"] == "runtime"
        # no runtime_url: the managed runtime already serving the adapter's base answers, not a one-shot job
        answer = await call(client, "generate", model="first@v1", prompt="hi", max_tokens=4)
        assert answer["via"] == "runtime"
        # 'base' through the managed runtime means its base: no base_model needed
        answer = await call(client, "generate", model="base", prompt="hi", max_tokens=4, runtime_url="local")
        assert answer["via"] == "runtime"

    # a new server process (the old one is gone): the runtime job still serves, and is found again
    async with Client(server_params(fts_home)) as client:
        again = await call(client, "deploy_adapter", adapter=str(second), name="second", runtime_url="local")
        assert (again["runtime"], again["runtime_job"]) == (url, job_id)
        models = {m["id"] for m in httpx.get(f"{url}/v1/models").json()["data"]}
        assert {"first", "second"} <= models
        for model in ("first@v1", "second@v1"):
            reply = httpx.post(f"{url}/v1/completions", json={"model": model, "prompt": "hi", "max_tokens": 3})
            assert reply.status_code == 200
        stopped = await call(client, "cancel_job", job_id=job_id)
        assert stopped["job_id"] == job_id
        await until(client, job_id, lambda j: j["state"] == "cancelled", 60, "the runtime to stop")
    with pytest.raises(httpx.TransportError):
        httpx.get(f"{url}/health", timeout=2)


def test_deploys_asking_at_once_share_one_runtime(fts_home, tiny_model):
    """Two servers on one FTS_HOME asking for the runtime of the same base at the same moment start one."""
    from concurrent.futures import ThreadPoolExecutor

    from fts_mcp.config import Settings
    from fts_mcp.core import Core

    cores = [Core(Settings.from_env()) for _ in range(2)]
    try:
        with ThreadPoolExecutor(2) as pool:
            found = list(pool.map(lambda core: core.edge.local_runtime(str(tiny_model)), cores))
        assert found[0] == found[1]
        runtimes = [j for j in cores[0].jobs.list(limit=100).jobs if j.kind == "runtime"]
        assert [j.job_id for j in runtimes] == [found[0][1]]
        cores[0].jobs.cancel(found[0][1])
    finally:
        for core in cores:
            core.close()
