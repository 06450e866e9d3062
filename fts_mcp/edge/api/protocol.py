"""The bodies the runtime takes and gives, in OpenAI's shape (vLLM's `entrypoints/openai/protocol.py` in small).

Requests are strict: a field this runtime does not implement is refused by name (`UNSUPPORTED`) unless sent at its
neutral value, and any other unknown field is refused too. Responses carry `fts.adapter`, the adapter version that
answered, beside OpenAI's fields.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_serializer

DEFAULT_MAX_TOKENS = 64
# OpenAI request fields this runtime does not implement, and the value at which sending them changes nothing.
UNSUPPORTED = {"logprobs": (None, False), "top_logprobs": (None, 0), "echo": (None, False), "best_of": (None, 1),
               "suffix": (None, ""), "logit_bias": (None, {}), "presence_penalty": (None, 0), "frequency_penalty":
               (None, 0), "tools": (None, []), "tool_choice": (None, "none"), "functions": (None, []),
               "function_call": (None, "none"), "response_format": (None, {"type": "text"}),
               "parallel_tool_calls": (None,), "service_tier": (None, "auto", "default"), "store": (None, False),
               "metadata": (None, {}), "modalities": (None, ["text"]), "audio": (None,), "prediction": (None,),
               "reasoning_effort": (None,), "web_search_options": (None,)}


# ---- requests ----------------------------------------------------------------------------------------------------

class Message(BaseModel):
    model_config = ConfigDict(extra="forbid")

    role: Literal["system", "user", "assistant", "developer"]
    content: str
    name: str | None = None


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    include_usage: bool = False


class GenerationRequest(BaseModel):
    """What both generation endpoints take."""

    model_config = ConfigDict(extra="forbid")

    model: str = Field(min_length=1, max_length=1000)
    max_tokens: int | None = Field(None, ge=1, le=8192)
    temperature: float = Field(0.0, ge=0, le=2)  # greedy unless asked: an adapter's answers are reproducible
    top_p: float = Field(1.0, gt=0, le=1)
    n: int = Field(1, ge=1, le=16)
    stop: str | list[str] | None = Field(None, validate_default=True)
    seed: int | None = Field(None, ge=-(2**63), lt=2**64)
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = Field(None, max_length=256)

    @field_validator("stop")
    @classmethod
    def _stops(cls, value: str | list[str] | None) -> list[str]:
        stops = [value] if isinstance(value, str) else list(value or [])
        if len(stops) > 4 or any(not s or len(s) > 256 for s in stops):
            raise ValueError("stop takes up to 4 non-empty strings of at most 256 characters")
        return stops


class CompletionRequest(GenerationRequest):
    """POST /v1/completions."""

    prompt: str | list[str] = Field(min_length=1)
    max_tokens: int = Field(DEFAULT_MAX_TOKENS, ge=1, le=8192)

    @field_validator("prompt")
    @classmethod
    def _prompts(cls, value: str | list[str]) -> list[str]:
        prompts = [value] if isinstance(value, str) else value
        if len(prompts) > 64:
            raise ValueError("at most 64 prompts per request")
        return prompts

    @property
    def limit(self) -> int:
        return self.max_tokens

    @property
    def sequences(self) -> int:
        """What it asks of the queue: prompts x n."""
        return len(self.prompt) * self.n


class ChatRequest(GenerationRequest):
    """POST /v1/chat/completions."""

    messages: list[Message] = Field(min_length=1, max_length=1000)
    max_completion_tokens: int | None = Field(None, ge=1, le=8192)

    @property
    def limit(self) -> int:
        return self.max_completion_tokens or self.max_tokens or DEFAULT_MAX_TOKENS

    @property
    def sequences(self) -> int:
        return self.n


class LoraAdapterRequest(BaseModel):
    """POST /v1/load_lora_adapter and /v1/unload_lora_adapter (which needs no `lora_path`)."""

    lora_name: str = Field(min_length=1, max_length=200)
    lora_path: str | None = None


# ---- responses ---------------------------------------------------------------------------------------------------

class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class AdapterInfo(BaseModel):
    """`fts` in an answer: what served it beyond OpenAI's fields."""

    adapter: str  # the adapter version that answered ('base' for the base model)
    warning: str | None = None  # e.g. an adapter trained on another base (NF4 vs 16-bit) than this runtime serves

    @model_serializer(mode="wrap")
    def _without_empty_warning(self, handler: Any) -> dict[str, Any]:
        data = handler(self)
        if data.get("warning") is None:
            data.pop("warning", None)
        return data


class CompletionChoice(BaseModel):
    index: int
    finish_reason: str | None
    logprobs: None = None
    text: str | None  # None only for a choice cut short by its client leaving


class ChatMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None


class ChatChoice(BaseModel):
    index: int
    finish_reason: str | None
    logprobs: None = None
    message: ChatMessage


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage
    fts: AdapterInfo


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage
    fts: AdapterInfo


class ChatDelta(BaseModel):
    """A chat stream's new text: the role in the first chunk only, no content in a choice's last chunk."""

    role: Literal["assistant"] | None = None
    content: str | None = None

    @model_serializer
    def _present(self) -> dict[str, str]:
        return {name: value for name, value in (("role", self.role), ("content", self.content)) if value is not None}


class ChatRoleChoice(BaseModel):
    """A choice in a chat stream's first chunk: the role, before any text."""

    index: int
    delta: ChatDelta = Field(default_factory=lambda: ChatDelta(role="assistant", content=""))
    finish_reason: None = None
    logprobs: None = None


class ChatStreamChoice(BaseModel):
    index: int
    finish_reason: str | None
    logprobs: None = None
    delta: ChatDelta


class CompletionChunk(BaseModel):
    """One server-sent event of a streamed completion (its choices carry `text`, as CompletionChoice)."""

    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None  # sent (null until the last chunk) only with stream_options.include_usage


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatRoleChoice] | list[ChatStreamChoice]
    usage: Usage | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    owned_by: str = "fts-mcp"
    warning: str | None = None  # an adapter trained on another base than this runtime serves


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class Health(BaseModel):
    status: Literal["ok"] = "ok"
    base: str
    device: str
    cached: list[str] | None = None  # adapter names: for an admin key only, when there are tenants
    loaded: list[str] | None = None


class ErrorInfo(BaseModel):
    message: str
    type: str
    param: str | None
    code: int


class ErrorResponse(BaseModel):
    error: ErrorInfo
