"""API keys for the edge runtime: which adapters each key may use.

`fts-mcp edge serve --keys keys.json`, the file:

    {"keys": [
      {"key": "sk-acme-…",  "adapters": ["acme-*"]},
      {"key": "sk-globex-…", "adapters": ["globex-support", "globex-tone", "base"]},
      {"key": "sk-ops-…",   "adapters": ["*"], "admin": true}
    ]}

A key sees only the adapters its patterns match (shell-style, on the adapter's name: `acme-*` covers
`acme-support@v3` and `acme-support:prod`) in `/v1/models`, and gets 403 for any other; a stack is allowed when
every adapter in it is; `base` (or `*`) lets it use the base model alone — which is also what a stack whose
weights are all zero (`0*acme-support`) answers. The runtime reads a `model` for this check exactly as it resolves
it (`fts_mcp.edge.engine.parse_model`). `load_lora_adapter`,
`unload_lora_adapter` and `/metrics` need an admin key. Requests without a known key get 401.
"""

from __future__ import annotations

import fnmatch
import hmac
import json
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from fts_mcp.errors import InvalidArgument
from fts_mcp.tokens import clean_token

MIN_KEY_CHARS = 16


class Key(BaseModel):
    model_config = ConfigDict(extra="forbid")

    key: str = Field(min_length=MIN_KEY_CHARS, max_length=512)
    adapters: list[str] = Field(default_factory=list, max_length=1000)
    admin: bool = False
    name: str | None = Field(None, max_length=200, description="who holds it, for logs")

    @field_validator("key")
    @classmethod
    def _clean(cls, key: str) -> str:
        return clean_token(key, param="keys")

    def may_use(self, adapter: str) -> bool:
        return any(fnmatch.fnmatchcase(adapter, pattern) for pattern in self.adapters)


class KeyFile(BaseModel):
    model_config = ConfigDict(extra="forbid")

    keys: list[Key] = Field(min_length=1, max_length=10_000)


class Tenants:
    def __init__(self, keys: list[Key]) -> None:
        if len({k.key for k in keys}) != len(keys):
            raise InvalidArgument("the keys file holds the same key twice", param="--keys")
        self.keys = keys

    @classmethod
    def load(cls, path: Path) -> Tenants:
        try:
            return cls(KeyFile.model_validate(json.loads(path.read_text())).keys)
        except OSError as exc:
            raise InvalidArgument(f"cannot read the keys file {path}: {exc.strerror}", param="--keys") from exc
        except ValueError as exc:  # JSON or validation
            detail = exc.errors()[0] if isinstance(exc, ValidationError) else None
            where = ".".join(str(p) for p in detail["loc"]) if detail else "the file"
            raise InvalidArgument(f"{path}: {where}: {detail['msg'] if detail else 'not JSON'}; expected "
                                  f'{{"keys": [{{"key": "<at least {MIN_KEY_CHARS} characters>", "adapters": '
                                  '["name-*", "base"], "admin": false}]}', param="--keys") from exc

    def holder(self, authorization: str | None) -> Key | None:
        """The key an `Authorization: Bearer …` header carries, compared in constant time; None if unknown."""
        if not authorization or not authorization.startswith("Bearer "):
            return None
        given = authorization[len("Bearer "):].encode()
        found = None
        for key in self.keys:
            if hmac.compare_digest(given, key.key.encode()):
                found = key
        return found

