import json
import os
import stat
from pathlib import Path

import pytest

from fts_mcp.adapters.store import AdapterStore, UnknownAdapter
from fts_mcp.errors import InvalidArgument
from fts_mcp.files import write_json_atomic
from tests.conftest import make_adapter


@pytest.fixture
def store(tmp_path):
    return AdapterStore(tmp_path / "store")


def test_publish_versions_aliases_and_16_bit_weights(store, fts_home, tiny_model, adapter_a, adapter_b):
    first, created = store.publish(adapter_a, "support")
    assert created and first.version == "v1" and first.dtype == "bfloat16"
    source_bytes = (adapter_a / "adapter_model.safetensors").stat().st_size
    stored = store.root / "support" / "v1" / "adapter_model.safetensors"
    assert stored.stat().st_size < 0.6 * source_bytes  # fp32 -> bf16 halves the weights
    assert first.files["adapter_model.safetensors"].bytes == stored.stat().st_size
    assert first.r == 4 and first.alpha == 8 and first.base_model

    again, created = store.publish(adapter_a, "support")
    assert not created and again.version == "v1"  # same bytes: nothing new

    second, created = store.publish(adapter_b, "support", alias="prod")
    assert created and second.version == "v2"
    assert store.aliases("support") == {"latest": "v2", "prod": "v2"}
    store.set_alias("support", "prod", "v1")
    assert store.resolve("support:prod").version == "v1"
    assert store.resolve("support").version == "v2" and store.resolve("support@v1").version == "v1"
    index = json.loads((store.root / "index.json").read_text())
    assert index["adapters"]["support"] == {"versions": ["v1", "v2"], "aliases": {"latest": "v2", "prod": "v1"}}
    assert not list((store.root / "support").glob(".publish-*"))  # no temp folders left


def test_versions_are_immutable(store, fts_home, tiny_model, adapter_a, adapter_b):
    store.publish(adapter_a, "support", version="v1")
    with pytest.raises(InvalidArgument, match="immutable") as info:
        store.publish(adapter_b, "support", version="v1")
    assert info.value.param == "version"
    assert store.publish(adapter_a, "support", version="v1")[1] is False  # the same bytes are fine
    assert store.versions("support") == ["v1"]


@pytest.mark.parametrize("kwargs, param", [
    ({"name": "Bad Name"}, "name"), ({"name": "ok", "version": "1"}, "version"),
    ({"name": "ok", "alias": "latest"}, "alias"), ({"name": "ok", "alias": "Prod!"}, "alias"),
    ({"name": "nl\n"}, "name"), ({"name": "ok", "version": "v1\n"}, "version"),
    ({"name": "ok", "alias": "prod\n"}, "alias"),
])
def test_bad_publish_arguments(store, fts_home, adapter_a, kwargs, param):
    with pytest.raises(InvalidArgument) as info:
        store.publish(adapter_a, **kwargs)
    assert info.value.param == param
    assert not store.names()


def test_base_is_not_an_adapter_name(store, fts_home, tiny_model, adapter_a):
    """`base`, and the base model's own folder name, are what a runtime calls the base model: never an adapter."""
    for name in ("base", tiny_model.name):
        with pytest.raises(InvalidArgument, match="base model") as info:
            store.publish(adapter_a, name)
        assert info.value.param == "name"
    assert not store.names()


def test_store_files_are_readable_by_a_web_server_running_as_another_user(store, fts_home, adapter_a):
    """Files 0644 and folders 0755 (under the usual umask 022), so any static server can serve the store; the
    atomic writer creates files as open() does, not private as a temp file."""
    previous = os.umask(0o022)
    try:
        store.publish(adapter_a, "support", alias="prod")
        write_json_atomic(fts_home / "anything.json", {"a": 1})
    finally:
        os.umask(previous)
    modes = {str(p.relative_to(store.root)): stat.S_IMODE(p.stat().st_mode) for p in store.root.rglob("*")}
    assert {"index.json", "support/aliases.json", "support/v1/manifest.json",
            "support/v1/adapter_model.safetensors"} <= set(modes)
    assert {p: oct(m) for p, m in modes.items() if m != (0o755 if (store.root / p).is_dir() else 0o644)} == {}
    assert stat.S_IMODE(store.root.stat().st_mode) == 0o755
    assert stat.S_IMODE((fts_home / "anything.json").stat().st_mode) == 0o644


def test_unknown_references(store, fts_home, adapter_a):
    store.publish(adapter_a, "support")
    for ref, words in (("nope", "no adapter named"), ("support@v9", "no version v9"), ("support:prod", "no alias")):
        with pytest.raises(UnknownAdapter, match=words):
            store.resolve(ref)


def test_publish_refuses_a_broken_adapter(store, fts_home, tiny_model):
    folder = make_adapter(tiny_model, fts_home / "broken", r=2, seed=5)
    (folder / "adapter_config.json").unlink()
    with pytest.raises(InvalidArgument, match="adapter_config.json"):
        store.publish(folder, "broken")
    assert store.versions("broken") == []


def test_a_stored_version_carries_the_tokenizer_and_chat_template(store, fts_home, tiny_model, adapter_a):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    tokenizer.chat_template = "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}"
    tokenizer.save_pretrained(adapter_a)
    manifest, _ = store.publish(adapter_a, "chatty")
    folder = store.root / "chatty" / manifest.version
    assert {"chat_template.jinja", "tokenizer_config.json"} <= set(manifest.files)
    assert (folder / "chat_template.jinja").read_text() == (adapter_a / "chat_template.jinja").read_text()
    rendered = AutoTokenizer.from_pretrained(folder).apply_chat_template([{"role": "user", "content": "x"}],
                                                                       tokenize=False)
    assert rendered == "<user>x"


def test_one_corrupt_adapter_does_not_hide_the_others(store, fts_home, tiny_model, adapter_a, adapter_b):
    """A garbled aliases.json under one name: that name is reported corrupt, every other one still lists and
    resolves, locally and through a source (what the runtime's /v1/models uses)."""
    from fts_mcp.adapters.sources import StoreSource
    from fts_mcp.adapters.store import CorruptAdapter

    store.publish(adapter_a, "good")
    store.publish(adapter_b, "broken")
    (store.root / "broken" / "aliases.json").write_text("{not json")
    assert [e.name for e in store.entries()] == ["good"]
    assert store.resolve("good").name == "good"
    with pytest.raises(CorruptAdapter):
        store.resolve("broken")
    source = StoreSource(store.root, fts_home / "cache")
    assert set(source.catalogue()) == {"good"}


def fake_gguf(outtype: str):
    """What deploy_adapter hands the store: a writer of the GGUF export (here bytes that stand for it)."""
    def write(folder: Path) -> str:
        (folder / "adapter.gguf").write_bytes(b"GGUF " + outtype.encode())
        return outtype
    return write


def test_a_gguf_export_is_part_of_the_versions_bytes(store, adapter_a):
    """The same adapter and GGUF again: the same version; a plain publish matches a version holding a GGUF; another
    type, or a GGUF for bytes published without one, is the next version; a pinned version says which it holds."""
    first, created = store.publish(adapter_a, "router", gguf=fake_gguf("f16"))
    assert created and first.gguf_outtype == "f16" and "adapter.gguf" in first.files
    assert store.publish(adapter_a, "router", gguf=fake_gguf("f16"))[0].version == first.version
    plain, created = store.publish(adapter_a, "router")
    assert not created and plain.version == first.version
    with pytest.raises(InvalidArgument, match="router@v1 holds a f16 GGUF export of them") as pinned:
        store.publish(adapter_a, "router", version="v1", gguf=fake_gguf("q8_0"))
    assert pinned.value.param == "version"
    other, created = store.publish(adapter_a, "router", gguf=fake_gguf("q8_0"))
    assert created and other.version == "v2" and other.gguf_outtype == "q8_0"

    bare, _ = store.publish(adapter_a, "bare")
    with pytest.raises(InvalidArgument, match="bare@v1 holds no GGUF export of them"):
        store.publish(adapter_a, "bare", version="v1", gguf=fake_gguf("f16"))
    assert store.publish(adapter_a, "bare", gguf=fake_gguf("f16"))[0].version == "v2"
    assert not [p for p in store.path("router").iterdir() if p.name.startswith(".")]  # no export folder left


def test_a_gguf_export_over_the_size_a_reader_accepts_is_not_published(store, adapter_a, monkeypatch):
    import fts_mcp.adapters.store as module

    monkeypatch.setattr(module, "MAX_ADAPTER_BYTES", 7)
    with pytest.raises(InvalidArgument, match="adapter.gguf would be 8 bytes") as refused:
        store.publish(adapter_a, "big", gguf=fake_gguf("f16"))
    assert refused.value.param == "gguf" and store.versions("big") == []
