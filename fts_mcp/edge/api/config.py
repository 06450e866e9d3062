"""The edge runtime's configuration: one object that `fts-mcp edge serve` and the managed `runtime` job build."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from fts_mcp.adapters.store import MAX_ADAPTER_BYTES
from fts_mcp.errors import InvalidArgument


@dataclass(frozen=True, kw_only=True)
class RuntimeConfig:
    """What the runtime serves, how much memory it may hold, where it listens, who may call it, and how much one
    request may ask for."""

    base: str
    """Base model folder or hub id, loaded once."""
    store: str
    """Adapter store folder or URL (an HTTP store is read through `cache`)."""
    cache: Path
    """Where adapters fetched from an HTTP store are kept."""
    roots: tuple[Path, ...] = ()
    """Folders `load_lora_adapter` may read besides the store."""
    home: Path | None = None
    """FTS_HOME: the server's jobs, caches and database, which `load_lora_adapter` never reads (but the store, when
    it lies there) even where a root covers it. None: FTS_HOME as the environment sets it."""
    store_deadline: float = 15.0
    """Seconds one fetch from an HTTP store may take, start to end (an adapter file: 1 s more per MiB)."""
    store_retry_after: float = 5.0
    """Seconds a failed fetch from an HTTP store is remembered and answered at once; the last good index serves."""
    max_adapter_bytes: int = MAX_ADAPTER_BYTES
    """The largest weights file a store manifest may declare; a larger adapter is refused before any download."""
    trust_remote_code: bool = False
    """Run the base model's own code from the hub (only for a base you trust)."""
    quantize: Literal["auto", "nf4", "none"] = "auto"
    """Load the base in 4-bit NF4 or in 16 bits; auto: NF4 when a GPU is visible."""
    max_cached_bytes: int = 2 << 30
    """Bytes of adapters kept in host memory (LRU beyond it)."""
    max_rank: int = 64
    """Largest adapter rank served (a stack: the sum of its ranks)."""
    max_loras: int = 8
    """Adapters held on the device at once; each running request holds its adapter's slot."""
    max_batch: int = 32
    """Sequences decoded together; 1 serves one request at a time."""
    host: str = "127.0.0.1"
    """Address to listen on; off loopback a `token` or `keys` is required."""
    port: int = 8001
    """Port to listen on."""
    token: str | None = field(default=None, repr=False)
    """One bearer token every client must send; not with `keys`."""
    keys: Path | None = None
    """A tenants file (`fts_mcp.edge.tenants`): a key per tenant and the adapters each may use; not with `token`."""
    allowed_hosts: tuple[str, ...] = ()
    """Host header values accepted besides the bind address and loopback (DNS-rebinding protection)."""
    allowed_origins: tuple[str, ...] = ()
    """Browser Origins accepted besides the bind address and loopback."""
    max_queue: int = 64
    """Sequences (prompts x n) waiting or running at once; more get 429 with Retry-After."""
    request_timeout: float = 300.0
    """Seconds a request may take, waiting included; past it: 504."""

    def __post_init__(self) -> None:
        if self.keys is not None and self.token:
            raise InvalidArgument("give --keys (a key per tenant) or --token (one key for everything), not both",
                                  param="--keys")
