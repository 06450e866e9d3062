"""Model shape: from a config.json (local folder or the Hugging Face cache; never weights) or explicit numbers."""

from __future__ import annotations

import json
from pathlib import Path

from pydantic import BaseModel, Field

from fts_mcp.errors import InvalidArgument, ModelUnavailable


class Architecture(BaseModel):
    """A decoder-only transformer's shape. `params` is derived when not given."""

    layers: int = Field(ge=1, le=1000)
    hidden: int = Field(ge=1, le=1_000_000)
    intermediate: int = Field(ge=1, le=10_000_000)
    heads: int = Field(ge=1, le=10_000)
    kv_heads: int = Field(ge=1, le=10_000)
    vocab: int = Field(ge=1, le=10_000_000)
    head_dim: int | None = Field(None, ge=1, le=100_000)
    tied_embeddings: bool = False
    experts: int = Field(1, ge=1, le=10_000, description="MLP experts per layer (MoE); 1 for dense")
    gated_mlp: bool = Field(True, description="SwiGLU-style gate/up/down (Llama, Qwen, Mistral); False for GPT-2")

    @property
    def dim_head(self) -> int:
        return self.head_dim or self.hidden // self.heads

    def linear_shapes(self) -> list[tuple[str, int, int]]:
        """(name, in, out) of each linear layer in one block (the LoRA targets of 'all-linear')."""
        q, kv = self.heads * self.dim_head, self.kv_heads * self.dim_head
        attention = [("q_proj", self.hidden, q), ("k_proj", self.hidden, kv), ("v_proj", self.hidden, kv),
                     ("o_proj", q, self.hidden)]
        if self.gated_mlp:
            mlp = [("gate_proj", self.hidden, self.intermediate), ("up_proj", self.hidden, self.intermediate),
                   ("down_proj", self.intermediate, self.hidden)]
        else:
            mlp = [("up_proj", self.hidden, self.intermediate), ("down_proj", self.intermediate, self.hidden)]
        return attention + [(name, i, o) for name, i, o in mlp for _ in range(self.experts)]

    @property
    def block_linear_params(self) -> int:
        return sum(i * o for _, i, o in self.linear_shapes())

    @property
    def embedding_params(self) -> int:
        """Input embedding plus an untied output head (neither is quantized by bitsandbytes)."""
        return self.vocab * self.hidden * (1 if self.tied_embeddings else 2)

    @property
    def params(self) -> int:
        norms = (2 * self.layers + 1) * self.hidden
        return self.layers * self.block_linear_params + self.embedding_params + norms

    @property
    def matmul_params(self) -> int:
        """Parameters that take part in a matmul per token (blocks + output head; MoE counts 2 active experts)."""
        active = self.block_linear_params
        if self.experts > 1:
            per_expert = sum(i * o for name, i, o in self.linear_shapes()[4:]) // self.experts
            active -= per_expert * (self.experts - min(2, self.experts))
        return self.layers * active + self.vocab * self.hidden



TIED_SHARE = 0.09


def likely_tied(arch: Architecture) -> bool:
    """Whether a model known only by its numbers probably shares its input embedding with its output head. Small
    models with big vocabularies do (Llama 3.2 1B/3B, Qwen 2.5 up to 3B, Qwen 3 up to 4B, Gemma), larger ones do
    not; the rule is that one vocab x hidden matrix is at least 9% of the parameters. Of the published shapes in
    families.py it misjudges only Gemma-2-27B (tied, 4%), on the safe side: its head is counted twice."""
    tied = arch.model_copy(update={"tied_embeddings": True})
    return arch.vocab * arch.hidden >= TIED_SHARE * tied.params

def _first(config: dict, *keys: str):
    return next((config[k] for k in keys if config.get(k) is not None), None)


def from_config(config: dict, *, source: str) -> Architecture:
    """Read the common Hugging Face config keys (Llama / Mistral / Qwen / Gemma / Phi families, GPT-2 style)."""
    if "text_config" in config:  # multimodal wrappers keep the language model's shape here
        config = {**config, **config["text_config"]}
    values = {
        "layers": _first(config, "num_hidden_layers", "n_layer", "num_layers"),
        "hidden": _first(config, "hidden_size", "n_embd", "d_model"),
        "heads": _first(config, "num_attention_heads", "n_head"),
        "vocab": _first(config, "vocab_size"),
    }
    missing = [k for k, v in values.items() if v is None]
    if missing:
        raise InvalidArgument(f"{source} lacks {', '.join(missing)}; pass the architecture numbers explicitly "
                              "(layers, hidden, intermediate, heads, kv_heads, vocab) or params", param="base_model")
    gated = "n_inner" not in config and config.get("model_type") not in ("gpt2", "gpt_neox", "gptj", "opt", "bloom")
    values["intermediate"] = _first(config, "intermediate_size", "n_inner", "ffn_dim") or 4 * values["hidden"]
    values["kv_heads"] = _first(config, "num_key_value_heads", "num_kv_heads") or values["heads"]
    values["head_dim"] = _first(config, "head_dim")
    values["experts"] = _first(config, "num_local_experts", "num_experts", "n_routed_experts") or 1
    if values["experts"] > 1:
        values["intermediate"] = _first(config, "moe_intermediate_size", "intermediate_size") or values["intermediate"]
    values["tied_embeddings"] = bool(config.get("tie_word_embeddings", config.get("model_type") == "gpt2"))
    values["gated_mlp"] = gated
    return Architecture(**values)


def read_config(model: str, roots: tuple[Path, ...], offline: bool) -> tuple[dict, str]:
    """config.json of a local model folder inside the roots, or of a hub id from the local cache."""
    from fts_mcp.models.refs import looks_like_path
    from fts_mcp.paths import resolve_inside

    if looks_like_path(model):
        path = resolve_inside(model, roots, param="base_model") / "config.json"
        if not path.is_file():
            raise InvalidArgument(f"{path} does not exist; expected a model folder with config.json",
                                  param="base_model")
    else:
        from huggingface_hub import hf_hub_download  # lazy: only when a hub id is planned
        from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

        try:
            path = Path(hf_hub_download(model, "config.json", local_files_only=offline, etag_timeout=10))
        except LocalEntryNotFoundError as exc:
            raise ModelUnavailable(f"config.json of {model!r} is not in the local Hugging Face cache and this host "
                                   "is offline; pass the architecture numbers or a local folder instead",
                                   param="base_model") from exc
        except (HfHubHTTPError, OSError, ValueError) as exc:
            raise ModelUnavailable(f"cannot read config.json of {model!r}: {exc}", param="base_model") from exc
    try:
        config = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise InvalidArgument(f"{path} is not valid JSON: {exc}", param="base_model") from exc
    if not isinstance(config, dict):
        raise InvalidArgument(f"{path} does not hold a JSON object", param="base_model")
    return config, str(path)
