"""Path arguments are resolved and must land inside one of the configured roots."""

from __future__ import annotations

from pathlib import Path

from fts_mcp.errors import PathNotAllowed


def resolve_inside(value: str, roots: tuple[Path, ...], *, param: str, must_exist: bool = True) -> Path:
    """Resolve `value` (symlinks and `..` included) and require it to be inside one of `roots`."""
    if not value or "\x00" in value:
        raise PathNotAllowed("expected a non-empty file system path", param=param)
    path = Path(value).expanduser()
    resolved = path.resolve()
    if not any(resolved == root or resolved.is_relative_to(root) for root in roots):
        allowed = ", ".join(str(r) for r in roots)
        raise PathNotAllowed(f"{value!r} resolves to {resolved}, which is outside the allowed roots ({allowed}); "
                             "move the file under one of them or add its folder to FTS_ROOTS", param=param)
    if must_exist and not resolved.exists():
        raise PathNotAllowed(f"{resolved} does not exist", param=param)
    return resolved
