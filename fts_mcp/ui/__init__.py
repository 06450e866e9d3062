"""The job view: one self-contained HTML page (scripts and styles inlined, no network but its own server), built from
`ui/` by `npm run build:ui` and committed as `job.html` beside this file, so a clone or a wheel needs no npm.

MCP hosts that render apps show it for the training, status and evaluation tools (the `ui://` resource they link in
`_meta.ui.resourceUri`); `fts-mcp serve --transport http` serves the same page to browsers at /ui.
"""

from __future__ import annotations

import base64
import hashlib
import re
from functools import cache
from importlib.resources import files

VIEW_URI = "ui://fts-mcp/job-view.html"
VIEW_META = {"ui": {"resourceUri": VIEW_URI}}  # a tool definition's `_meta`: the host renders its answer in the view
PAGE_NAME = "job.html"
_INLINE_SCRIPT = re.compile(r"<script\b[^>]*>(.*?)</script>", re.DOTALL | re.IGNORECASE)


@cache
def page() -> str:
    """The built page."""
    return files(__package__).joinpath(PAGE_NAME).read_text(encoding="utf-8")


@cache
def script_hashes() -> tuple[str, ...]:
    """A Content-Security-Policy source ('sha256-...') for each inline script of the page: a browser runs those and
    no other script."""
    return tuple("'sha256-" + base64.b64encode(hashlib.sha256(body.encode()).digest()).decode() + "'"
                 for body in _INLINE_SCRIPT.findall(page()))
