"""Bearer secrets as given on a command line or in a keys file (no MCP or HTTP imports: the edge runtime's
tenants use it in a job's work horse too)."""

from __future__ import annotations

from fts_mcp.errors import InvalidArgument

MIN_TOKEN_CHARS = 16  # as the edge runtime's tenant keys (fts_mcp/edge/tenants.py): guessing one is out of reach


def clean_token(token: str | None, param: str = "--token") -> str | None:
    """A token as given, or None; a blank one is refused like a missing one, never accepted as a password, and so
    is one shorter than MIN_TOKEN_CHARS."""
    if token is None or token == "":
        return None
    if not token.strip() or token != token.strip():
        raise InvalidArgument("the bearer token is blank or has leading/trailing whitespace; set a real secret "
                              "(e.g. `openssl rand -hex 32`)", param=param)
    if len(token) < MIN_TOKEN_CHARS:
        raise InvalidArgument(f"the bearer token is {len(token)} characters long; use at least {MIN_TOKEN_CHARS} "
                              "characters (e.g. `openssl rand -hex 32`)", param=param)
    return token
