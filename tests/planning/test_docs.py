"""Every number in the reference documents agrees with what estimate_resources computes."""

import pytest

from fts_mcp.datafiles import DIMINISHING_RETURNS, MIN_USEFUL_EXAMPLES, ROBUST_RANGE
from fts_mcp.docs import DOC_TOPICS, read_doc
from fts_mcp.models.architecture import Architecture
from fts_mcp.planning.advice import Criteria, recommend
from fts_mcp.planning.estimate import REFERENCE_SHAPES
from fts_mcp.planning.memory import BITS_CONSTANTS_DOUBLE, UTILIZATION, lora_params, memory

# The memory document's table describes the plain Hugging Face loop (full cross-entropy: batch x sequence x vocab x
# 12 bytes; fp32 adapters) and its H200 measurements; the estimator's defaults are the recipe's, so the table's
# figures pin those two.
SETTINGS = {"seq_len": 2048, "micro_batch": 1, "lora_r": 16, "target_modules": "all-linear",
            "gradient_checkpointing": True, "optimizer": "adamw_32bit", "cross_entropy": "full",
            "adapter_dtype": "fp32"}


def table_row(shape: str, method: str) -> str:
    m, _ = memory(REFERENCE_SHAPES[shape], method, **SETTINGS)
    constants = "—" if method != "qlora" else \
        f"{m.quantization_constants_gb:.2f} / {m.quantization_constants_without_double_quant_gb:.2f}"
    trained = m.adapters_gb + m.gradients_gb + m.optimizer_gb
    if method == "full":
        trained = m.gradients_gb + m.optimizer_gb
    return (f"| {shape} | {method} | {m.weights_gb:,.1f} | {constants} | {trained:,.1f} | {m.activations_gb:,.1f} | "
            f"{m.logits_gb:,.1f} | {m.total_gb:,.1f} |")


@pytest.mark.parametrize("shape", ["Llama-3.1-8B", "Llama-3.1-70B"])
@pytest.mark.parametrize("method", ["full", "lora", "qlora"])
def test_memory_table_matches_the_estimator(shape, method):
    assert table_row(shape, method) in read_doc("memory")


def test_memory_doc_prose_figures():
    doc = read_doc("memory")
    full70, _ = memory(REFERENCE_SHAPES["Llama-3.1-70B"], "full", **SETTINGS)
    assert f"about {full70.weights_gb + full70.gradients_gb + full70.optimizer_gb:,.0f} GB" in doc
    for shape, batch in (("Llama-3.1-8B", 4), ("Llama-3.2-1B", 8)):
        m, _ = memory(REFERENCE_SHAPES[shape], "qlora", **{**SETTINGS, "micro_batch": batch})
        assert f"{m.peak_allocated_gb:.1f} GB" in doc


def test_lora_and_qlora_docs():
    arch = REFERENCE_SHAPES["Llama-3.1-8B"]
    n = lora_params(arch, 16, "all-linear")
    lora = read_doc("lora")
    assert f"{n:,} in all" in lora and f"{n // arch.layers:,} per layer" in lora
    assert f"adapter file is {n * 4 / 1e6:.0f} MB" in lora and f"bf16, {n * 2 / 1e6:.0f} MB" in lora
    m, _ = memory(arch, "qlora", **SETTINGS)
    full, _ = memory(arch, "full", **SETTINGS)
    assert f"{m.adapters_gb + m.gradients_gb + m.optimizer_gb:.2f} GB here" in lora
    assert f"{full.gradients_gb + full.optimizer_gb:.1f} GB for the same states" in lora
    qlora = read_doc("qlora")
    assert f"= {BITS_CONSTANTS_DOUBLE:.3f} bit per parameter" in qlora
    block = arch.layers * arch.block_linear_params
    assert f"from {block * 2 / 1e9:.1f} GB in" in qlora and f"bf16 to {block / 2 / 1e9:.1f} GB" in qlora
    m70, _ = memory(REFERENCE_SHAPES["Llama-3.1-70B"], "qlora", **SETTINGS)
    assert f"{m70.quantization_constants_gb:.1f} GB of constants instead of" in qlora
    assert f"{m70.quantization_constants_without_double_quant_gb:.1f} GB" in qlora


def test_data_compute_and_edge_docs():
    doc = read_doc("data-and-compute")
    assert f"**{MIN_USEFUL_EXAMPLES}-500**" in doc and f"**{ROBUST_RANGE[0]:,}-{ROBUST_RANGE[1]:,}**" in doc
    assert f"**~{DIMINISHING_RETURNS:,}**" in doc
    names = {"full": "full fine-tuning", "lora": "LoRA", "qlora": "QLoRA"}
    for method, util in UTILIZATION.items():
        assert f"{util:.2f} for {names[method]}" in doc
    steps = recommend(Criteria(output_format=True, labelled_examples=2000)).next_steps
    cost_step = next(s for s in steps if "h (" in s)
    hours = cost_step.split("takes about ")[1].split(" h")[0]
    low, high = hours.split("-")
    assert f"takes about {low} h, and {high} h" in doc
    arch = REFERENCE_SHAPES["Llama-3.1-8B"]
    m, _ = memory(arch, "qlora", **SETTINGS)
    edge = read_doc("edge")
    assert f"about {m.weights_gb:.1f} GB" in edge and f"{lora_params(arch, 16, 'all-linear') * 2 / 1e6:.0f} MB" in edge


def test_every_topic_is_in_the_index():
    index = read_doc("index")
    assert all(f"`{topic}`" in index for topic in DOC_TOPICS)
    assert isinstance(REFERENCE_SHAPES["Llama-3.1-8B"], Architecture)


def test_memory_doc_recipe_figures():
    doc = read_doc("memory")
    plain, _ = memory(REFERENCE_SHAPES["Llama-3.1-8B"], "qlora", **{**SETTINGS, "micro_batch": 4})
    recipe, _ = memory(REFERENCE_SHAPES["Llama-3.1-8B"], "qlora", seq_len=2048, micro_batch=4,
                       gradient_checkpointing=True)
    assert f"from {plain.peak_allocated_gb:.1f} GB to\n{recipe.peak_allocated_gb:.1f} GB" in doc
    llama_65b = Architecture(layers=80, hidden=8192, intermediate=22_016, heads=64, kv_heads=64, vocab=32_000)
    paper, _ = memory(llama_65b, "qlora", seq_len=528, micro_batch=4, lora_r=64, gradient_checkpointing=True,
                      optimizer="paged_adamw_32bit")
    assert f"comes to {paper.total_gb:.1f} GB in\nall ({paper.peak_allocated_gb:.1f} GB allocated, plus " \
           f"{paper.optimizer_paged_gb:.1f} GB of paged" in doc
    assert paper.total_gb < 48
