"""`python -m fts_mcp.jobs.ray.entry`: the entrypoint the server submits for each job, run by the cluster's Python.

Ray runs it with the `python` first on the PATH of the node's `ray start` (or of the job's runtime environment),
which may lack what a job needs: a head started from a shell outside the project's environment has no torch. So it
first checks that this Python can run the job (its version, the packages the recipes import, and that the fts-mcp
it runs is the server's), and fails the job at once with a `result` frame naming what is missing and how to provide
it, instead of failing late with an ImportError. Only then does it import the job's code (`fts_mcp.jobs.ray.node`),
which needs what was checked; until then it imports nothing beyond the standard library and fts_mcp's own package.

The packages are looked up, not imported (a missing one is found in milliseconds); one that is installed but broken
still fails the recipe, with its own error.
"""

from __future__ import annotations

import importlib.util
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import fts_mcp

FRAME_MARK = "@fts-frame "  # frames.MARK: this module may not import frames (it needs pydantic)

PYTHON = (3, 11, 4)  # fts-mcp's requires-python
# What a job imports on the cluster (module: the name to install it by): fts-mcp's own dependencies less the
# server's (mcp, starlette, uvicorn, httpx, prometheus-client) and those only some jobs load lazily (gguf).
NEEDED = {
    "torch": "torch", "transformers": "transformers", "peft": "peft", "trl": "trl", "datasets": "datasets",
    "accelerate": "accelerate", "safetensors": "safetensors", "huggingface_hub": "huggingface-hub",
    "bitsandbytes": "bitsandbytes", "pydantic": "pydantic", "platformdirs": "platformdirs", "psutil": "psutil",
    "filelock": "filelock", "matplotlib": "matplotlib",
}
FindSpec = Callable[[str], Any]


def _present(module: str, find_spec: FindSpec) -> bool:
    try:
        return find_spec(module) is not None
    except (ImportError, ValueError):  # a parent package that fails, a module hidden by an import hook
        return False


def check_environment(job: dict[str, Any], *, find_spec: FindSpec = importlib.util.find_spec,
                      version: str = fts_mcp.__version__, python: tuple[int, ...] = tuple(sys.version_info[:3]),
                      executable: str = sys.executable) -> str | None:
    """What keeps this Python from running the job, with how to provide it; None when nothing does."""
    here = f"the cluster's Python ({executable}, {'.'.join(map(str, python))})"
    if python < PYTHON:
        return (f"{here} is older than fts-mcp's {'.'.join(map(str, PYTHON))}: start the cluster's nodes (`ray start`) "
                f"from a Python {'.'.join(map(str, PYTHON))} or later that has fts-mcp's dependencies, or give the "
                "job one with FTS_RAY_RUNTIME_ENV's conda")
    missing = [name for module, name in NEEDED.items() if not _present(module, find_spec)]
    if missing:
        listed = ", ".join(missing)
        pip = json.dumps({"pip": missing})
        return (f"{here} lacks {listed}, which fts-mcp's jobs import: add {'it' if len(missing) == 1 else 'them'} "
                f"to every job with FTS_RAY_RUNTIME_ENV='{pip}' (or \"uv\"; Ray installs and caches them), or run "
                "the cluster's nodes from an image or environment that has fts-mcp's dependencies (`ray start` from a "
                "shell whose `python` has them)")
    server = job.get("server_version")
    if server and server != version:
        return (f"the cluster ran fts-mcp {version}, the server is {server}: the job carries the server's own "
                f"fts_mcp, but another one ({fts_mcp.__file__}) came first on the cluster's path; uninstall fts-mcp "
                f"there, or install {server}")
    return None


def fail(message: str) -> None:
    """The job's outcome, as the server reads it from the log (`fts_mcp.jobs.ray.frames`)."""
    frame = {"t": "result", "state": "failed",
             "error": {"code": "ray_environment", "message": message, "param": "FTS_RAY_RUNTIME_ENV"}}
    sys.stdout.write(FRAME_MARK + json.dumps(frame, separators=(",", ":")) + "\n")
    sys.stdout.flush()


def main() -> int:
    package = Path.cwd()
    job = json.loads((package / "job.json").read_text())
    problem = check_environment(job)
    if problem is not None:
        print(f"fts-mcp cannot run here: {problem}", file=sys.stderr)
        fail(problem)
        return 1
    from fts_mcp.jobs.ray import node  # lazy: it imports what the check above looked for

    return node.run(package, job)


if __name__ == "__main__":
    raise SystemExit(main())
