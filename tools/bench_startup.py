"""Server start-up: process start -> answered tools/list over stdio, fts-mcp vs. a bare MCPServer with one tool.

    python tools/bench_startup.py [--runs 7]

Both are measured side by side in one run (interleaved, median of N), with a fresh FTS_HOME. The bar for
fts-mcp is 1.3x the bare server: the server process must stay free of torch and other heavy imports.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import anyio
from mcp import Client, StdioServerParameters

BARE_SERVER = '''
from mcp.server.mcpserver import MCPServer

mcp = MCPServer("bare", log_level="WARNING")


@mcp.tool()
def ping() -> str:
    """Answer pong."""
    return "pong"


mcp.run()
'''


async def time_to_tools_list(params: StdioServerParameters) -> float:
    start = time.perf_counter()
    async with Client(params, mode="legacy") as client:
        await client.list_tools()
        return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=7)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        bare = Path(tmp) / "bare_server.py"
        bare.write_text(BARE_SERVER)
        env = {**os.environ, "FTS_HOME": str(Path(tmp) / "home")}
        servers = {
            "bare MCPServer": StdioServerParameters(command=sys.executable, args=[str(bare)], env=env),
            "fts-mcp serve": StdioServerParameters(command=sys.executable, args=["-m", "fts_mcp", "serve"], env=env),
        }
        times: dict[str, list[float]] = {name: [] for name in servers}
        for _ in range(args.runs):
            for name, params in servers.items():
                times[name].append(anyio.run(time_to_tools_list, params))
    medians = {name: statistics.median(values) for name, values in times.items()}
    for name, value in medians.items():
        print(f"{name:<16} median {value * 1000:7.0f} ms  (min {min(times[name]) * 1000:.0f}, "
              f"max {max(times[name]) * 1000:.0f}, {args.runs} runs)")
    print(f"ratio fts-mcp / bare: {medians['fts-mcp serve'] / medians['bare MCPServer']:.2f} (bar: <= 1.30)")


if __name__ == "__main__":
    main()
