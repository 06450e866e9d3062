"""Nothing outside the store (or the runtime's cache) is read or written, whatever a reference, a stored
manifest or an HTTP store says."""

import json
import threading
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from fts_mcp.adapters.sources import FetchLimits, StoreSource
from fts_mcp.adapters.store import AdapterStore, CorruptAdapter, parse_ref
from fts_mcp.errors import FtsError, InvalidArgument
from tests.conftest import make_adapter

BAD_REFS = ["/etc/passwd", "../../etc", "..", "a/../../b", "name@../v1", "name:../x", "name@v1/../../x", "UPPER",
            "", "x" * 300, "name\x00", "name@v0", "name:", "a b", "~root", "name@v1@v2", "nl\n", "name@v1\n",
            "name:prod\n", "\nname", "base", "base@v1"]


@pytest.mark.parametrize("ref", BAD_REFS)
def test_references_are_checked_where_they_enter(ref):
    with pytest.raises(InvalidArgument) as info:
        parse_ref(ref, param="model")
    assert info.value.param == "model" and len(info.value.message) < 400


@pytest.fixture
def published(tmp_path, tiny_model):
    store = AdapterStore(tmp_path / "store")
    store.publish(make_adapter(tiny_model, tmp_path / "src", r=4, seed=1), "support")
    return store


def test_a_manifest_that_disagrees_with_its_folder_is_refused(published, tmp_path, tiny_model):
    """A crafted manifest in support/v2 claiming to be another adapter (or listing other files) is corrupt."""
    v1 = published.root / "support" / "v1"
    (published.root / "support" / "v2").mkdir()
    manifest = json.loads((v1 / "manifest.json").read_text())
    escape = {**manifest["files"], "../../escape": manifest["files"]["adapter_config.json"]}
    for tampered in ({**manifest, "version": "v1"}, {**manifest, "name": "other", "version": "v2"},
                     {**manifest, "version": "v2", "files": escape}):
        (published.root / "support" / "v2" / "manifest.json").write_text(json.dumps(tampered))
        with pytest.raises(CorruptAdapter):
            published.resolve("support@v2")


def test_symlinked_versions_and_names_are_not_followed_out_of_the_store(published, tmp_path):
    (tmp_path / "elsewhere").mkdir()
    (published.root / "escape").symlink_to(tmp_path / "elsewhere")
    (published.root / "support" / "v9").symlink_to(tmp_path / "elsewhere")
    assert published.names() == ["support"] and published.versions("support") == ["v1"]
    with pytest.raises(FtsError):
        published.resolve("escape")


class Quiet(SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


@pytest.fixture
def http_store(tmp_path):
    """A static HTTP server on 127.0.0.1 serving whatever the test writes under `root`."""
    root = tmp_path / "served"
    root.mkdir()
    server = ThreadingHTTPServer(("127.0.0.1", 0), partial(Quiet, directory=str(root)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield root, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def serve_malicious(root: Path, name: str, version: str, files: dict, index_name: str | None = None) -> None:
    folder = root / name / version
    folder.mkdir(parents=True, exist_ok=True)
    manifest = {"name": name, "version": version, "base_model": None, "r": 4, "alpha": 8, "target_modules": "all",
                "dtype": "bfloat16", "created": "2026-01-01T00:00:00Z",
                "files": {f: {"bytes": len(data), "sha256": "0" * 64} for f, data in files.items()}}
    (folder / "manifest.json").write_text(json.dumps(manifest))
    for file_name, data in files.items():
        if "/" not in file_name:  # the server has the plain files; the others exist only in the manifest
            (folder / file_name).write_bytes(data)
    (root / "index.json").write_text(json.dumps({"adapters": {
        index_name or name: {"versions": [version], "aliases": {"latest": version}}}}))


@pytest.mark.parametrize("file_name", ["../../../evil.txt", "/tmp/fts-evil.txt", "sub/adapter_config.json",
                                       "authorized_keys", "adapter_config.json/../../x"])
def test_a_url_store_cannot_write_outside_the_cache(http_store, tmp_path, file_name):
    root, url = http_store
    payload = b"ssh-ed25519 attacker"
    serve_malicious(root, "support", "v1", {"adapter_config.json": b"{}", "adapter_model.safetensors": b"x",
                                            file_name: payload})
    cache = tmp_path / "cache"
    source = StoreSource(url, cache)
    with pytest.raises(CorruptAdapter):
        source.folder(source.resolve("support"))
    written = [p for p in tmp_path.rglob("*") if p.is_file() and p.read_bytes() == payload
               and not p.is_relative_to(root)]
    assert written == [] and not Path("/tmp/fts-evil.txt").exists()


def test_a_url_store_index_with_a_dotdot_name_is_ignored(http_store, tmp_path):
    root, url = http_store
    serve_malicious(root, "support", "v1", {"adapter_config.json": b"{}", "adapter_model.safetensors": b"x"},
                    index_name="../../outside")
    source = StoreSource(url, tmp_path / "cache")
    assert source.catalogue() == {}
    with pytest.raises(InvalidArgument):
        source.resolve("../../outside")


def test_a_url_store_file_is_verified_before_it_is_kept(http_store, tmp_path, tiny_model):
    """Bytes that do not match the manifest's sha256 never land under their name; more bytes than declared are
    refused while streaming. (Each try asks the store again here: by default a file that proved corrupt is not
    downloaded again for a minute.)"""
    root, url = http_store
    store = AdapterStore(root)
    store.publish(make_adapter(tiny_model, tmp_path / "src", r=4, seed=1), "support")
    weights = root / "support" / "v1" / "adapter_model.safetensors"
    original = weights.read_bytes()
    weights.write_bytes(original[:-1] + bytes([original[-1] ^ 0xFF]))  # same size, other bytes
    cache = tmp_path / "cache"
    source = StoreSource(url, cache, limits=FetchLimits(corrupt_retry_after=0))
    with pytest.raises(CorruptAdapter, match="sha256"):
        source.folder(source.resolve("support"))
    assert not (cache / "support" / "v1" / "adapter_model.safetensors").exists()
    weights.write_bytes(original + b"more")  # longer than declared
    with pytest.raises(CorruptAdapter, match="more than"):
        source.folder(source.resolve("support"))
    weights.write_bytes(original)
    assert (source.folder(source.resolve("support")) / "adapter_model.safetensors").read_bytes() == original
    assert not [p for p in cache.rglob("*.part")]


def test_a_file_inside_a_version_may_not_be_a_link_out_of_the_store(published, tmp_path):
    """The folder is inside the store, but a file in it is a symlink to elsewhere: refused before it is read."""
    version = published.root / "support" / "v1"
    secret = tmp_path / "secret.txt"
    secret.write_text("not an adapter")
    config = version / "adapter_config.json"
    config.unlink()
    config.symlink_to(secret)
    source = StoreSource(published.root, tmp_path / "cache")
    with pytest.raises(CorruptAdapter, match="link"):
        source.folder(published.resolve("support"))
