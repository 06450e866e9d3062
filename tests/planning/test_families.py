"""Estimates by hub id work offline for the common open families, from their published shapes."""

import pytest

from fts_mcp.config import Settings
from fts_mcp.errors import ModelUnavailable
from fts_mcp.planning.estimate import REFERENCE_SHAPES, RunSettings
from fts_mcp.planning.families import FAMILIES, family_key
from fts_mcp.planning.service import Planning

# Parameter counts the model cards publish (billions).
PUBLISHED = {"llama-3.2-1b": 1.24, "llama-3.2-3b": 3.21, "llama-3.1-8b": 8.03, "llama-3.1-70b": 70.6,
             "qwen2.5-7b": 7.62, "qwen2.5-72b": 72.7, "qwen3-8b": 8.19, "mistral-7b-v0.3": 7.25, "gemma-2-9b": 9.24,
             "phi-3-mini": 3.82, "phi-4": 14.7, "gemma-3-1b": 1.0}
SETTINGS = RunSettings(seq_len=2048, micro_batch=4, lora_r=16, target_modules="all-linear",
                            gradient_checkpointing=True, optimizer="adamw_32bit")


@pytest.mark.parametrize("entry, billions", PUBLISHED.items())
def test_the_table_reproduces_published_parameter_counts(entry, billions):
    assert FAMILIES[entry].params / 1e9 == pytest.approx(billions, rel=0.02)


@pytest.mark.parametrize("hub_id, entry", [
    ("meta-llama/Llama-3.1-8B", "llama-3.1-8b"), ("meta-llama/Meta-Llama-3.1-8B-Instruct", "llama-3.1-8b"),
    ("Qwen/Qwen2.5-7B-Instruct", "qwen2.5-7b"), ("mistralai/Mistral-7B-Instruct-v0.3", "mistral-7b-v0.3"),
    ("google/gemma-2-9b-it", "gemma-2-9b"), ("microsoft/Phi-3-mini-4k-instruct", "phi-3-mini"),
    ("Qwen/Qwen2.5-Coder-7B-Instruct", "qwen2.5-7b"), ("Qwen/Qwen3-4B-Instruct-2507", "qwen3-4b"),
    ("mistralai/Mistral-7B-Instruct-v0.2", "mistral-7b-v0.2"), ("google/gemma-3-1b-it", "gemma-3-1b"),
])
def test_variants_map_to_their_base_shape(hub_id, entry):
    assert family_key(hub_id) == entry


@pytest.fixture
def planning(tmp_path):
    return Planning(Settings.from_env({"FTS_HOME": str(tmp_path), "FTS_ROOTS": str(tmp_path), "FTS_GPUS": "none",
                                       "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}))


def test_an_offline_estimate_by_hub_id_uses_the_table_and_says_so(planning):
    by_name = planning.estimate_resources(base_model="meta-llama/Llama-3.1-8B", settings=SETTINGS, gpu="H200")
    assert "built-in table: llama-3.1-8b" in by_name.shape_source
    shape = REFERENCE_SHAPES["Llama-3.1-8B"].model_dump(exclude={"head_dim", "tied_embeddings", "experts",
                                                                  "gated_mlp"})
    explicit = planning.estimate_resources(shape=shape, settings=SETTINGS, gpu="H200")
    assert [e.memory for e in by_name.estimates] == [e.memory for e in explicit.estimates]  # the 8B figures


def test_an_unknown_hub_id_offline_still_says_what_to_do(planning):
    with pytest.raises(ModelUnavailable, match="architecture numbers"):
        planning.estimate_resources(base_model="acme/mystery-13b", settings=SETTINGS)


def test_a_card_known_only_by_its_memory_gets_time_and_cost_from_a_stated_assumption(planning):
    result = planning.estimate_resources(params=8_000_000_000, settings=SETTINGS, gpu_memory_gb=24,
                                         dataset_tokens=10_000_000, epochs=1)
    qlora = next(e for e in result.estimates if e.method == "qlora")
    assert qlora.throughput is not None and qlora.throughput.hours > 0 and qlora.throughput.cost_usd > 0
    assert "assume the speed and price of an" in result.notes[0] and "24 GB" in result.notes[0]
    assert result.gpu is None and result.gpu_memory_gb == 24


def test_without_a_dataset_size_the_answer_says_what_to_add(planning):
    result = planning.estimate_resources(params=8_000_000_000, settings=SETTINGS, gpu="L4")
    assert all(e.throughput is None or e.throughput.hours is None for e in result.estimates)
    assert "give dataset_examples" in result.notes[0]
