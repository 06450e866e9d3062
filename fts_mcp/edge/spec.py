"""What `generate` and `runtime` jobs are asked to do (pure pydantic, shared by the server and the worker)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class GenerateJobSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    base_model: str
    adapter_dir: str | None = Field(None, description="verified adapter folder; None answers with the base")
    model: str = Field(description="the reference the caller gave ('base' or a store reference)")
    prompt: str | None = None
    messages: list[dict[str, str]] | None = None
    max_tokens: int = Field(64, ge=1, le=8192)
    temperature: float = Field(0.0, ge=0, le=2)
    quantization: Literal["nf4", "none"] = Field("none", description="the base as the adapter was trained on it")
    trust_remote_code: bool = False


class RuntimeJobSpec(BaseModel):
    """A managed edge runtime: `fts-mcp edge serve` run as a long-lived job (started by deploy_adapter with
    runtime_url='local', stopped by cancel_job)."""

    model_config = ConfigDict(extra="forbid")

    base_model: str
    store: str
    cache: str = Field(description="where adapters from an HTTP store are kept")
    url: str = Field(description="where it listens (loopback)")
    host: str = "127.0.0.1"
    port: int = Field(ge=1, le=65535)
    max_rank: int = Field(64, ge=1, le=1024)
    max_loras: int = Field(8, ge=1, le=256)
    max_batch: int = Field(32, ge=1, le=1024)
    quantization: Literal["nf4", "none"] = Field("none", description="the base as its adapters were trained on it")
    trust_remote_code: bool = False
