"""What a `generate` job is asked to do (pure pydantic, shared by the server and the worker)."""

from __future__ import annotations

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
    trust_remote_code: bool = False
