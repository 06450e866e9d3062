"""Smoke-test an installed fts-mcp (run with the Python of a fresh venv that installed the built wheel):

    /tmp/venv/bin/python tools/wheel_smoke.py [--demo]

Checks that the package imported is the installed one (not a source checkout), that `fts-mcp serve` answers
`tools/list` over stdio with every tool, that `fts-mcp edge serve --help` runs, and with --demo that
`fts-mcp demo` runs end to end. Run it from a folder outside the source tree.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import sysconfig
import tempfile
from pathlib import Path

import anyio

EXPECTED_TOOLS = {"recommend_ft_vs_rag", "estimate_resources", "validate_dataset", "start_qlora_job", "job_status",
                  "list_jobs", "cancel_job", "resume_job", "merge_adapter", "deploy_adapter", "list_adapters",
                  "generate"}


async def list_tools(command: str, env: dict[str, str], cwd: str) -> set[str]:
    from mcp import Client, StdioServerParameters

    params = StdioServerParameters(command=command, args=["serve"], env=env, cwd=cwd)
    async with Client(params) as client:
        return {tool.name for tool in (await client.list_tools()).tools}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--demo", action="store_true", help="also run `fts-mcp demo`")
    args = parser.parse_args()

    import fts_mcp

    installed = Path(fts_mcp.__file__).resolve()
    site = Path(sysconfig.get_paths()["purelib"]).resolve()
    assert installed.is_relative_to(site), f"fts_mcp was imported from {installed}, not from {site}"
    command = str(Path(sys.executable).parent / "fts-mcp")
    with tempfile.TemporaryDirectory() as home:
        env = {**os.environ, "FTS_HOME": home, "FTS_GPUS": "none", "HF_HUB_OFFLINE": "1"}
        env.pop("PYTHONPATH", None)
        tools = anyio.run(list_tools, command, env, home)
        assert EXPECTED_TOOLS <= tools, f"missing tools: {EXPECTED_TOOLS - tools}"
        print(f"fts-mcp serve: tools/list answered {len(tools)} tools")
        help_text = subprocess.run([command, "edge", "serve", "--help"], env=env, cwd=home, capture_output=True,
                                   text=True, check=True).stdout
        assert "--base" in help_text
        print("fts-mcp edge serve --help: ok")
        if args.demo:
            subprocess.run([command, "demo"], env=env, cwd=home, check=True, timeout=600)
            print("fts-mcp demo: ok")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
