"""list_models finds what an agent can train on here: a folder in the roots, a hub cache entry, the demo model."""

import json
import os
from pathlib import Path

import pytest
from mcp import Client

from fts_mcp.server import mcp

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend():
    return "asyncio"


def fake_hub_cache(cache: Path, repo_id: str, source: Path) -> None:
    """The layout huggingface-hub writes: blobs, refs/main, and a snapshot of links to the blobs."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    revision = "0123456789abcdef0123456789abcdef01234567"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(revision)
    snapshot = repo / "snapshots" / revision
    snapshot.mkdir(parents=True)
    (repo / "blobs").mkdir()
    for file in source.iterdir():
        blob = repo / "blobs" / f"blob-{file.name}"
        blob.write_bytes(file.read_bytes())
        os.symlink(os.path.relpath(blob, snapshot), snapshot / file.name)


async def test_list_models_finds_a_folder_a_cached_hub_id_and_the_demo(fts_home, tiny_model, tmp_path,
                                                                       monkeypatch):
    cache = tmp_path / "hf-cache"
    fake_hub_cache(cache, "acme/tiny-chat", tiny_model)
    encoder = tmp_path / "encoder"  # a cached classifier is not a base for causal-LM fine-tuning
    encoder.mkdir()
    (encoder / "config.json").write_text(json.dumps({**json.loads((tiny_model / "config.json").read_text()),
                                                      "architectures": ["BertForSequenceClassification"]}))
    (encoder / "model.safetensors").write_bytes((tiny_model / "model.safetensors").read_bytes())
    fake_hub_cache(cache, "acme/encoder", encoder)
    app = tmp_path / "app"  # a config.json without weights is an app's, not a model's
    (app / "nested-model").mkdir(parents=True)
    (app / "config.json").write_text("{}")
    for f in tiny_model.iterdir():
        (app / "nested-model" / f.name).write_bytes(f.read_bytes())
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    async with Client(mcp) as client:
        answer = (await client.call_tool("list_models", {})).structured_content
    by_source = {}
    for model in answer["models"]:
        by_source.setdefault(model["source"], []).append(model)
    assert any(m["base_model"] == str(tiny_model) for m in by_source["folder"])
    assert any(m["base_model"] == str(tmp_path / "app" / "nested-model") for m in by_source["folder"])
    assert not any(m["base_model"] == str(tmp_path / "app") for m in by_source["folder"])
    (cached,) = by_source["hub-cache"]
    assert cached["base_model"] == "acme/tiny-chat" and cached["architecture"] == "LlamaForCausalLM"
    assert cached["parameters"] == by_source["folder"][0]["parameters"] > 0 and cached["chat_template"]
    (demo,) = by_source["demo"]
    assert Path(demo["base_model"]).is_relative_to(fts_home)  # inside the roots: it can be trained on as given
    assert json.loads((Path(demo["base_model"]) / "config.json").read_text())["model_type"] == "llama"
