"""estimate_resources through an MCP client: the recipe's inputs reach the estimator and the answer says what it
assumed."""

import pytest
from mcp import Client

from fts_mcp.server import mcp

pytestmark = pytest.mark.anyio

LLAMA_65B = {"layers": 80, "hidden": 8192, "intermediate": 22_016, "heads": 64, "kv_heads": 64, "vocab": 32_000}


async def test_the_qlora_papers_65b_run_fits_48_gb_through_the_tool(fts_home):
    async with Client(mcp) as client:
        answer = (await client.call_tool("estimate_resources", {
            **LLAMA_65B, "method": "qlora", "seq_len": 528, "micro_batch": 4, "lora_r": 64,
            "gradient_checkpointing": True, "optimizer": "paged_adamw_32bit", "gpu_memory_gb": 48})
                  ).structured_content
    (qlora,) = answer["estimates"]
    assert qlora["fits"] and qlora["memory"]["total_gb"] < 48 and qlora["memory"]["optimizer_gb"] == 0
    assert answer["settings"]["adapter_dtype"] is None  # the recipe's: bf16 on a 4-bit base
    assert "bf16 on a 4-bit base" in " ".join(answer["notes"])
    assert not answer["architecture"]["tied_embeddings"] and "assumed untied" in answer["shape_source"]


async def test_defaults_are_the_recipes_and_are_stated(fts_home):
    async with Client(mcp) as client:
        answer = (await client.call_tool("estimate_resources", {"params": 8_000_000_000, "gpu": "L4"})
                  ).structured_content
    s = answer["settings"]
    assert (s["cross_entropy"], s["padding_free"], s["adapter_dtype"], s["precision"], s["gradient_checkpointing"]) \
        == ("chunked", True, None, "mixed", "auto")
    notes = " | ".join(answer["notes"])
    for words in ("cross_entropy 'chunked'", "padding-free", "fp32 on a 16-bit base", "mixed precision",
                  "resident on the GPU",
                  "checkpointing 'auto'"):
        assert words in notes
    by = {e["method"]: e for e in answer["estimates"]}
    assert by["qlora"]["fits"] and by["qlora"]["gradient_checkpointing"] is True  # 24 GB: on, said why
    assert "checkpointing on" in by["qlora"]["notes"][0]


SMOLLM2_135M = {"layers": 30, "hidden": 576, "intermediate": 1536, "heads": 9, "kv_heads": 3, "vocab": 49_152,
                "tied_embeddings": True}


async def test_without_a_gpu_argument_it_plans_for_this_hosts_cpu(fts_home, monkeypatch):
    """A laptop without a GPU: the estimate is for its CPU and RAM, says so, and picks an adapter method; full
    fine-tuning is never recommended where it would not fit."""
    monkeypatch.setenv("FTS_CPU_TFLOPS", "0.28")  # stated, so the figures do not depend on this machine's speed
    async with Client(mcp) as client:
        small = (await client.call_tool("estimate_resources", {**SMOLLM2_135M, "seq_len": 512, "epochs": 1,
                                                                "dataset_examples": 300, "tokens_per_example": 85})
                 ).structured_content
        huge = (await client.call_tool("estimate_resources", {"params": 70_000_000_000})).structured_content
    assert small["gpu"].startswith("CPU (") and "this host's CPU" in small["notes"][0]
    assert "0.28 TFLOP/s (FTS_CPU_TFLOPS)" in small["notes"][0] and "T4" not in " ".join(small["notes"])
    assert small["recommended_method"] == "lora"  # full fits too, but a CPU trains adapters first
    lora = next(e for e in small["estimates"] if e["method"] == "lora")
    assert 60 <= lora["throughput"]["tokens_per_second"] <= 250  # measured on 2 cores: 124 tokens/s
    assert lora["throughput"]["cost_usd"] == 0  # your own machine
    assert huge["recommended_method"] != "full" and not next(e for e in huge["estimates"]
                                                             if e["method"] == "full")["fits"]


async def test_a_hosts_gpu_is_named_from_nvidia_smi(fts_home, monkeypatch, tmp_path):
    fake = tmp_path / "bin" / "nvidia-smi"
    fake.parent.mkdir()
    fake.write_text("#!/bin/sh\necho 'NVIDIA H100 80GB HBM3, 81559'\n")
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{fake.parent}:{__import__('os').environ['PATH']}")
    monkeypatch.setenv("FTS_GPUS", "0")
    async with Client(mcp) as client:
        answer = (await client.call_tool("estimate_resources", {"params": 8_000_000_000})).structured_content
    assert answer["gpu"] == "H100" and "this host's GPU: NVIDIA H100 80GB HBM3" in answer["notes"][0]
    assert answer["recommended_method"] in ("full", "lora")
