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
