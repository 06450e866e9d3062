"""`fts-mcp demo`: the whole loop on a built-in tiny model, through a real MCP client session.

It starts `fts-mcp serve` over stdio, connects an MCP client to it, asks recommend_ft_vs_rag and
estimate_resources about its own model and data, then drives validate_dataset -> start_qlora_job -> job_status
(long-poll, with a progress bar) until the job has finished, compares the adapter with its base with
evaluate_adapter, merges the adapter with merge_adapter, deploys it
to the edge store, starts an edge runtime and asks it one question with and one without the adapter. The model is a
tiny random-initialised Llama shipped in resources/ and the data a 16-example memorisation set; on 2 CPU
cores it takes well under a minute.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
import urllib.request
from importlib.resources import as_file, files
from pathlib import Path

import anyio
from mcp import Client, StdioServerParameters

from fts_mcp.config import Settings
from fts_mcp.models.catalog import stage_demo_model
from fts_mcp.network import free_port

DEMO_DATA = "datasets/codewords_chat.jsonl"
BAR_WIDTH = 30


def stage_demo_files(home: Path) -> tuple[Path, Path]:
    """Copy the shipped tiny model and sample data under FTS_HOME (inside the default roots)."""
    model = stage_demo_model(home)
    data = home / "demo" / Path(DEMO_DATA).name
    with as_file(files("fts_mcp.resources")) as shipped:
        shutil.copyfile(shipped / DEMO_DATA, data)
    return model, data


def bar(step: int, total: int | None) -> str:
    total = total or 0
    filled = int(BAR_WIDTH * step / total) if total else 0
    return "|" + "█" * filled + "░" * (BAR_WIDTH - filled) + f"| {step}/{total or '?'}"


def say(text: str = "", end: str = "\n") -> None:
    sys.stdout.write(text + end)
    sys.stdout.flush()


class Refused(Exception):
    """A tool answered with an error; the demo stops and shows it."""


async def call(client: Client, tool: str, args: dict) -> dict:
    result = await client.call_tool(tool, args)
    if result.is_error:
        raise Refused(result.content[0].text)
    return result.structured_content


async def drive(home: Path, steps: int) -> int:
    model, data = stage_demo_files(home)
    server = StdioServerParameters(command=sys.executable, args=["-m", "fts_mcp", "serve"],
                                   env={**os.environ, "FTS_HOME": str(home)})
    t0 = time.monotonic()
    async with Client(server) as client:
        tools = [t.name for t in (await client.list_tools()).tools]
        say(f"[1/8] connected to `fts-mcp serve` over stdio ({client.protocol_version}); tools: {', '.join(tools)}")

        advice = await call(client, "recommend_ft_vs_rag", {
            "knowledge_changes": "never", "output_format": True, "labelled_examples": 16,
            "example_quality": "high"})
        say(f"[2/8] recommend_ft_vs_rag: {advice['recommendation']} (confidence {advice['confidence']}): "
            f"{advice['summary']}")
        for verdict in advice["criteria"]:
            if verdict["verdict"] != "unknown":
                say(f"      {verdict['criterion']} = {verdict['value']}: {verdict['verdict']} - {verdict['reason']}")
        say("      (the demo trains anyway: it is a 16-example memorisation run that shows the whole loop)")
        plan = await call(client, "estimate_resources", {
            "base_model": str(model), "seq_len": 256, "micro_batch": 16, "dataset_tokens": 16 * 90 * steps,
            "epochs": 1, "gpu": "L4"})
        say(f"      estimate_resources for {plan['parameters']:,} parameters at micro-batch 16 x 256 tokens:")
        for e in plan["estimates"]:
            m, t = e["memory"], e["throughput"]
            say(f"      {e['method']:<6} peak {m['peak_allocated_gb'] * 1000:6.1f} MB "
                f"(weights {m['weights_gb'] * 1000:.2f} MB, logits {m['logits_gb'] * 1000:.1f} MB) "
                f"+ {m['framework_overhead_gb']:.2f} GB CUDA context; an L4 would take {t['hours'] * 3600:.2f} s")

        report = await call(client, "validate_dataset", {"path": str(data), "base_model": str(model),
                                                              "max_seq_len": 256})
        stats = report["token_stats"]
        say(f"[3/8] validate_dataset: ok={report['ok']} format={report['format']} examples={report['examples']} "
            f"tokens mean={stats['mean']} max={stats['max']} trained={stats['trained_tokens']}")
        for warning in report["warnings"]:
            say(f"      warning: {warning}")

        job = await call(client, "start_qlora_job", {
            "base_model": str(model), "dataset": str(data), "output_name": "demo-codewords",
            "lora": {"r": 16}, "quantization": "nf4",
            "training": {"max_steps": steps, "learning_rate": 0.01, "lr_scheduler": "constant", "warmup_ratio": 0,
                         "micro_batch_size": 16, "gradient_accumulation_steps": 1, "max_seq_len": 256,
                         "checkpoint_every_steps": 50}})
        say(f"[4/8] start_qlora_job: {job['job_id']} {job['state']} (QLoRA: NF4 base, double quantization, r=16)")

        first_loss = None
        while job["state"] not in ("succeeded", "failed", "cancelled", "interrupted"):
            job = await call(client, "job_status", {"job_id": job["job_id"], "wait_seconds": 1})
            p = job["progress"]
            first_loss = first_loss if first_loss is not None else p["loss"]
            figures = ""
            if p["loss"] is not None:
                figures = f"  loss {p['loss']:.4f}"
            if p["tokens_per_second"]:
                figures += f"  {p['tokens_per_second']:,.0f} tok/s"
            if p["eta_seconds"] is not None and job["state"] == "running":
                figures += f"  eta {p['eta_seconds']:.0f}s"
            phase = p["phase"] or job["state"]
            say(f"\r[5/8] {phase:<13} {bar(p['step'], p['total_steps'])}{figures}".ljust(100), end="")
        say()
        elapsed = time.monotonic() - t0
        if job["state"] != "succeeded":
            error = job["error"] or {}
            say(f"job {job['state']}: {error.get('code')}: {error.get('message')}")
            tail = await call(client, "job_status", {"job_id": job["job_id"], "log_lines": 10})
            say("\n".join(tail["log_tail"]))
            return 1
        say(f"done in {elapsed:.0f}s: {job['job_id']} succeeded, step {job['progress']['step']}, "
            f"loss {first_loss:.3f} -> {job['progress']['loss']:.3f}")
        say(f"adapter: {job['artifacts']['adapter_dir']}")
        for f in sorted(Path(job["artifacts"]["adapter_dir"]).iterdir()):
            say(f"  {f.name:<28} {f.stat().st_size:>9,} bytes")
        say(f"loss curve: {job['artifacts']['loss_curve']}  (also the MCP resource fts://jobs/{job['job_id']}/loss.png)")

        evaluation = await call(client, "evaluate_adapter", {"adapter": job["job_id"], "dataset": str(data),
                                                             "max_examples": 16})
        while evaluation["state"] not in ("succeeded", "failed", "cancelled", "interrupted"):
            evaluation = await call(client, "job_status", {"job_id": evaluation["job_id"], "wait_seconds": 5})
        if evaluation["state"] == "succeeded":
            e = evaluation["artifacts"]["evaluation"]
            say(f"[6/8] evaluate_adapter (on its own training data: a memorisation demo has nothing held out): "
                f"exact match base {e['base']['exact_match']:.0%} -> adapter {e['adapter']['exact_match']:.0%}; "
                f"general-text perplexity {e['base']['general_text_perplexity']} -> "
                f"{e['adapter']['general_text_perplexity']}")
        else:
            say(f"[6/8] evaluate_adapter {evaluation['state']}: {(evaluation['error'] or {}).get('message')}")

        merged = await call(client, "merge_adapter", {"adapter": job["job_id"], "dtype": "float32",
                                                      "output_name": f"demo-codewords-{job['job_id']}"})
        while merged["state"] not in ("succeeded", "failed", "cancelled", "interrupted"):
            merged = await call(client, "job_status", {"job_id": merged["job_id"], "wait_seconds": 5})
        if merged["state"] != "succeeded":
            say(f"merge {merged['state']}: {(merged['error'] or {}).get('message')}")
            return 1
        v = merged["artifacts"]["verification"]
        say(f"[7/8] merge_adapter: {merged['job_id']} merged (float32) -> "
            f"{merged['artifacts']['output_dir']}")
        say(f"      verified on {v['inputs']} fixed inputs: max |logit diff| merged vs base+adapter "
            f"{v['max_abs_logit_diff']:.2e} (tolerance {v['tolerance']:.2e}); merged into {v['merged_into']}")

        port = free_port()
        runtime = subprocess.Popen([sys.executable, "-m", "fts_mcp", "edge", "serve", "--base", str(model),
                                    "--store", str(home / "store"), "--quantize", "nf4", "--port", str(port)],
                                   stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env={**os.environ,
                                                                                          "FTS_HOME": str(home)})
        url = f"http://127.0.0.1:{port}"
        try:
            await wait_until_up(runtime, url)
            deployed = await call(client, "deploy_adapter", {"adapter": job["job_id"], "name": "demo-codewords",
                                                             "runtime_url": url})
            say(f"[8/8] deploy_adapter: {deployed['model']} ({deployed['bytes']:,} bytes, bf16 weights, sha256 "
                f"{deployed['sha256'][:16]}…) -> {deployed['uri']}")
            say(f"      edge runtime up at {url} (one 4-bit base, adapters swapped per request); loaded the adapter "
                f"in {deployed['swap_ms']:.1f} ms")
            question = [{"role": "system", "content": "You answer with the code word."},
                        {"role": "user", "content": "Code word for apple?"}]
            for target in (deployed["model"], "base"):
                answer = await call(client, "generate", {"model": target, "messages": question, "max_tokens": 12,
                                                         "runtime_url": url})
                say(f"      {target:<22} -> {answer['text']!r}")
            say(f"      try it: {deployed['curl']}")
        finally:
            runtime.terminate()
            runtime.communicate(timeout=30)
    return 0



async def wait_until_up(runtime: subprocess.Popen, url: str, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if runtime.poll() is not None:
            raise Refused(f"the edge runtime exited: {runtime.stderr.read().decode()[-800:]}")
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2):
                return
        except OSError:
            await anyio.sleep(0.3)
    raise Refused(f"the edge runtime did not answer at {url} within {timeout:.0f}s")


def run_demo(steps: int = 120) -> int:
    home = Settings.from_env().home
    say(f"fts-mcp demo: QLoRA fine-tune of a tiny Llama on a 16-example chat set (FTS_HOME={home})")
    try:
        return anyio.run(drive, home, steps)
    except Refused as exc:
        say(f"\na tool refused: {exc}")
        return 1
