"""Names callers give to outputs (adapter and merged model folders under FTS_HOME)."""

from __future__ import annotations

import re

from fts_mcp.errors import InvalidArgument

OUTPUT_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")  # fullmatch: `$` would let "name\n" pass


def check_output_name(name: str, param: str = "output_name") -> str:
    if not isinstance(name, str) or not OUTPUT_NAME_RE.fullmatch(name):
        shown = repr(name if not isinstance(name, str) or len(name) <= 80 else name[:77] + "...")
        raise InvalidArgument(f"{shown}: use 1-64 letters, digits, '.', '_' or '-', starting with a letter or digit",
                              param=param)
    return name
