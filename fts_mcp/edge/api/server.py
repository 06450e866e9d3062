"""`serve(config)`: load the base once, put the Host / Origin guard and the bearer token in front of the app, and
listen until stopped."""

from __future__ import annotations

import uvicorn

from fts_mcp.adapters.sources import FetchLimits, StoreSource
from fts_mcp.config import Settings
from fts_mcp.edge.api.config import RuntimeConfig
from fts_mcp.edge.api.routes import build_app
from fts_mcp.edge.engine import Engine
from fts_mcp.edge.tenants import Tenants
from fts_mcp.network import BearerAuth, HostOriginGuard, check_bind, clean_token, security_settings


def open_engine(config: RuntimeConfig) -> Engine:
    """The base model, loaded once, serving the adapters of `config.store`; `load_lora_adapter` reads the roots
    but not FTS_HOME."""
    limits = FetchLimits(deadline=config.store_deadline, retry_after=config.store_retry_after,
                         max_adapter_bytes=config.max_adapter_bytes)
    home = config.home or (Settings.from_env().home if config.roots else None)
    return Engine(config.base, StoreSource(config.store, config.cache, limits=limits), quantize=config.quantize,
                  max_rank=config.max_rank, max_cached_bytes=config.max_cached_bytes, roots=config.roots,
                  private=(home,) if home else (), trust_remote_code=config.trust_remote_code,
                  max_loras=config.max_loras, max_batch=config.max_batch)


def serve(config: RuntimeConfig) -> None:
    """Check who may reach it (a keys file is read before the model loads), load the base, and serve."""
    tenants = Tenants.load(config.keys) if config.keys is not None else None
    check_bind(config.host, config.token or (tenants.keys[0].key if tenants else None))
    token = clean_token(config.token)
    engine = open_engine(config)
    app = HostOriginGuard(build_app(engine, config, tenants),
                          security_settings(config.host, config.port, list(config.allowed_hosts),
                                            list(config.allowed_origins)))
    uvicorn.run(BearerAuth(app, token) if token else app, host=config.host, port=config.port, log_level="warning")
