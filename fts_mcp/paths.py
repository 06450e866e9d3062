"""Path arguments are resolved and must land inside one of the configured roots: the one path-confinement
policy, used for every argument that names a file or folder."""

from __future__ import annotations

import os
from pathlib import Path

from fts_mcp.errors import PathNotAllowed

MAX_PATH_CHARS = 4096


def _shown(value: str) -> str:
    return repr(value if len(value) <= 120 else value[:117] + "...")


def resolve_inside(value: str, roots: tuple[Path, ...], *, param: str, must_exist: bool = True) -> Path:
    """Resolve `value` (symlinks and `..` included) and require it to be inside one of `roots`."""
    if not isinstance(value, str) or not value.strip() or "\x00" in value:
        raise PathNotAllowed("expected a non-empty file system path", param=param)
    if len(value) > MAX_PATH_CHARS:
        raise PathNotAllowed(f"a path of {len(value):,} characters is longer than any this host accepts "
                             f"({MAX_PATH_CHARS})", param=param)
    try:
        os.fsencode(value)
        resolved = Path(value).expanduser().resolve()
        outside = not any(resolved == root or resolved.is_relative_to(root) for root in roots)
        missing = must_exist and not outside and not resolved.exists()
    except (OSError, ValueError, RuntimeError) as exc:  # name too long, undecodable, a symlink loop...
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise PathNotAllowed(f"{_shown(value)} cannot be used as a path here: {reason}", param=param) from None
    if outside:
        allowed = ", ".join(str(r) for r in roots)
        raise PathNotAllowed(f"{_shown(value)} resolves to {_shown(str(resolved))}, which is outside the allowed "
                             f"roots ({allowed}); move the file under one of them or add its folder to FTS_ROOTS",
                             param=param)
    if missing:
        raise PathNotAllowed(f"{_shown(str(resolved))} does not exist", param=param)
    return resolved
