"""The `runtime` recipe: an edge runtime (`fts-mcp edge serve`) as a long-lived job.

It loads the base, serves the adapter store on loopback and reports `phase: serving` with its `url`; it runs until
the job is cancelled (then it stops listening and ends `cancelled`). Like any job it is a detached worker, so it
outlives the MCP server that started it; `deploy_adapter(runtime_url="local")` finds it again by its base model.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path
from types import SimpleNamespace

import uvicorn

from fts_mcp.edge.api.config import RuntimeConfig
from fts_mcp.edge.api.routes import build_app
from fts_mcp.edge.api.server import open_engine
from fts_mcp.edge.spec import RuntimeJobSpec
from fts_mcp.errors import FtsError
from fts_mcp.jobs.context import JobContext
from fts_mcp.jobs.records import Artifacts
from fts_mcp.network import HostOriginGuard

POLL_SECONDS = 0.5


def run(spec: RuntimeJobSpec, ctx: JobContext) -> Artifacts | None:
    ctx.phase("loading_model")
    config = RuntimeConfig(base=spec.base_model, store=spec.store, cache=Path(spec.cache), host=spec.host,
                           port=spec.port, max_rank=spec.max_rank, max_loras=spec.max_loras, max_batch=spec.max_batch,
                           quantize=spec.quantization, trust_remote_code=spec.trust_remote_code)
    engine = open_engine(config)
    # loopback only, with the Host / Origin checks `edge serve` has (a web page must not reach it by DNS rebinding)
    loopback = [f"127.0.0.1:{spec.port}", f"localhost:{spec.port}"]
    guarded = HostOriginGuard(build_app(engine, config), SimpleNamespace(
        allowed_hosts=loopback, allowed_origins=[f"http://{host}" for host in loopback]))
    server = uvicorn.Server(uvicorn.Config(guarded, host=spec.host, port=spec.port, log_level="warning"))
    thread = threading.Thread(target=server.run, name="edge-runtime", daemon=True)
    ctx.stop.in_loop = True  # cancel: stop listening, then end
    thread.start()
    while not server.started and thread.is_alive():
        time.sleep(0.05)
    if not thread.is_alive():
        raise FtsError(f"the runtime could not listen on {spec.url} (port taken?)", param="runtime_url")
    ctx.report({"phase": "serving", "url": spec.url}, event=False)
    while thread.is_alive() and not ctx.stop:
        time.sleep(POLL_SECONDS)
    server.should_exit = True
    thread.join(timeout=30)
    engine.close()
    ctx.stop.in_loop = False
    if not ctx.stop:
        raise FtsError(f"the runtime at {spec.url} stopped serving on its own; see the job's log", param="runtime_url")
    return None
