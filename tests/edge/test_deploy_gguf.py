"""deploy_adapter(gguf=...): the store version holds the adapter as a GGUF LoRA too, listed in its manifest with its
sha256 (so URL stores and edge caches carry it like the other files, checked), and the answer says how llama.cpp and
Ollama use it. What llama.cpp cannot apply is refused with nothing published. `fts-mcp export-gguf` writes the same
file from a shell. (That llama.cpp answers with it as PEFT does: tests/test_llamacpp.py.)"""

import json
import shutil
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from threading import Thread

import gguf
import pytest
from mcp import Client

from fts_mcp.adapters.sources import StoreSource
from fts_mcp.adapters.store import AdapterStore
from fts_mcp.config import Settings
from fts_mcp.files import sha256_file
from fts_mcp.models.base import TrainingBase, write_training_base
from fts_mcp.server import mcp

pytestmark = pytest.mark.anyio


def metadata(path: Path) -> dict:
    reader = gguf.GGUFReader(str(path))
    return {"tensors": len(reader.tensors), **{k: f.contents() for k, f in reader.fields.items()
                                               if k in ("general.type", "general.architecture", "adapter.type",
                                                        "adapter.lora.alpha")}}


async def deploy(client, **args) -> tuple[bool, dict | str]:
    result = await client.call_tool("deploy_adapter", args)
    return (False, result.content[0].text) if result.is_error else (True, result.structured_content)


async def test_a_deployed_version_carries_its_gguf_with_the_lines_that_use_it(fts_home, tiny_model, adapter_a):
    async with Client(mcp) as client:
        ok, done = await deploy(client, adapter=str(adapter_a), name="router", gguf="f16")
        assert ok, done
        file = Path(done["gguf"]["path"])
        store = AdapterStore(Settings.from_env().store)
        manifest = store.manifest("router", done["version"])
        assert file == store.path("router", done["version"]) / "adapter.gguf"
        assert manifest.files["adapter.gguf"].sha256 == done["gguf"]["sha256"] == sha256_file(file)
        assert manifest.gguf_outtype == done["gguf"]["outtype"] == "f16"
        assert metadata(file) == {"tensors": 2 * 2 * 7, "general.type": "adapter", "general.architecture": "llama",
                                  "adapter.type": "lora", "adapter.lora.alpha": 8.0}  # 2 layers x 7 linear, r=4
        assert done["gguf"]["modelfile"] == f"FROM {tiny_model}\nADAPTER {file}\n"  # Ollama imports the folder
        assert done["gguf"]["llama_server"] == f"llama-server -m base.gguf --lora {file}"
        assert "convert_hf_to_gguf.py" in done["gguf"]["notes"][0]  # a Hugging Face base: convert it first

        plain_ok, plain = await deploy(client, adapter=str(adapter_a), name="router")
        assert plain_ok and not plain["created"] and plain["version"] == done["version"]
        assert plain["gguf"] == done["gguf"]  # the version it matched holds one: said
        assert not [p for p in Path(done["uri"]).parent.iterdir() if p.name.startswith(".")]  # no export left over
    # which version a GGUF request gives (the same bytes, another type, a pinned version): tests/adapters/test_store.py

    # a URL store carries it, checked against its sha256 like every file of a version
    server = ThreadingHTTPServer(("127.0.0.1", 0), partial(SimpleHTTPRequestHandler, directory=str(store.root)))
    Thread(target=server.serve_forever, daemon=True).start()
    try:
        source = StoreSource(f"http://127.0.0.1:{server.server_port}", fts_home / "edge-cache")
        assert sha256_file(source.folder(source.resolve("router")) / "adapter.gguf") == done["gguf"]["sha256"]
        file.write_bytes(b"GGUF but not these bytes")
        fresh = StoreSource(f"http://127.0.0.1:{server.server_port}", fts_home / "other-cache")
        with pytest.raises(Exception, match="sha256|bytes"):
            fresh.folder(fresh.resolve("router"))
    finally:
        server.shutdown()
        server.server_close()


async def test_an_adapter_llama_cpp_cannot_apply_is_refused_and_nothing_is_published(fts_home, tiny_model):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model)
    dora = fts_home / "dora"
    get_peft_model(model, LoraConfig(r=4, use_dora=True, target_modules="all-linear")).save_pretrained(dora)
    async with Client(mcp) as client:
        ok, refused = await deploy(client, adapter=str(dora), name="dora", gguf="f16")
        assert not ok and "adapter: cannot export this adapter for llama.cpp: DoRA" in refused, refused
        assert AdapterStore(Settings.from_env().store).versions("dora") == []  # no half-published version
        ok, bad_type = await deploy(client, adapter=str(dora), name="dora", gguf="q4_k")
        assert not ok and "gguf" in bad_type and "f16" in bad_type, bad_type


async def test_a_qlora_adapter_comes_with_the_warning_that_matters_for_llama_cpp(fts_home, adapter_a):
    qlora = fts_home / "qlora"
    shutil.copytree(adapter_a, qlora)
    write_training_base(qlora, TrainingBase(quantization="nf4"))
    async with Client(mcp) as client:
        ok, done = await deploy(client, adapter=str(qlora), name="q", gguf="f16")
    assert ok, done
    assert any("trained on the NF4 (4-bit) base" in note for note in done["gguf"]["notes"]), done["gguf"]["notes"]


def test_export_gguf_writes_the_file_and_says_how_to_use_it(fts_home, adapter_a, capsys, monkeypatch, tmp_path):
    from fts_mcp.cli import main

    monkeypatch.chdir(tmp_path)
    assert main(["export-gguf", str(adapter_a), "--outtype", "q8_0", "--json"]) == 0
    said = json.loads(capsys.readouterr().out)
    file = tmp_path / "adapter-a.q8_0.gguf"
    assert said["path"] == str(file) and said["sha256"] == sha256_file(file) and said["outtype"] == "q8_0"
    assert metadata(file)["general.type"] == "adapter"
    assert said["llama_server"] == f"llama-server -m base.gguf --lora {file}"

    assert main(["export-gguf", str(adapter_a), "--out", str(tmp_path / "a.gguf")]) == 0
    text = capsys.readouterr().out
    assert "llama-server -m base.gguf --lora" in text and f"ADAPTER {tmp_path / 'a.gguf'}" in text
