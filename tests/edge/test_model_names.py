"""What a request's `model` and load_lora_adapter's `lora_name` / `lora_path` may name.

`base` (and the base model's own folder name) is the base model and nothing else: the tenant check and the
resolver read a `model` with the same parse, so a key allowed only the base is only ever served the base, and a
weight of zero (base output) needs the base's permission. load_lora_adapter takes names by the store's rule and
reads only the store and the configured roots, never the rest of FTS_HOME; what it refuses is a JSON 400 naming
the field."""

from __future__ import annotations

import json
import shutil
import threading
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer

import pytest
from starlette.testclient import TestClient

from fts_mcp.adapters.sources import StoreSource
from fts_mcp.adapters.store import AdapterStore
from fts_mcp.edge.api.access import RuntimeState
from fts_mcp.edge.api.config import RuntimeConfig
from fts_mcp.edge.api.routes import build_app
from fts_mcp.edge.api.server import open_engine
from fts_mcp.edge.engine import Engine, parse_model
from fts_mcp.edge.tenants import Key
from fts_mcp.errors import FtsError, InvalidArgument
from tests.conftest import make_adapter

BASE_ONLY = Key(key="sk-base-only-0123456789", adapters=["base"])
FA_ONLY = Key(key="sk-fa-only-0123456789ab", adapters=["fa"])
FA_AND_BASE = Key(key="sk-fa-and-base-01234567", adapters=["fa", "base"])


def plant(store: AdapterStore, source: str, name: str) -> None:
    """An adapter stored under `name` by hand, the way a store written before names were reserved holds it."""
    folder = store.root / name / "v1"
    shutil.copytree(store.root / source / "v1", folder)
    manifest = json.loads((folder / "manifest.json").read_text())
    (folder / "manifest.json").write_text(json.dumps({**manifest, "name": name}))
    (store.root / name / "aliases.json").write_text(json.dumps({"latest": "v1"}))


@pytest.fixture(scope="module")
def world(tiny_model, tmp_path_factory):
    root = tmp_path_factory.mktemp("names")
    store = AdapterStore(root / "store")
    for name, seed in (("fa", 1), ("fb", 2)):
        store.publish(make_adapter(tiny_model, root / name, r=4, seed=seed), name)
    plant(store, "fa", "base")  # a store adapter that calls itself `base` ...
    plant(store, "fb", tiny_model.name)  # ... and one named like the base model's folder
    engine = Engine(str(tiny_model), StoreSource(store.root, root / "cache"), max_rank=8)
    return root, store, engine


def state_of(engine: Engine) -> RuntimeState:
    return RuntimeState(engine, RuntimeConfig(base=engine.base_name, store=str(engine.source.location),
                                              cache=engine.source.cache_dir), None)


def served(engine: Engine, model: str) -> str | None:
    """What answers `model`: 'base', an adapter key, or None when the resolver refuses it."""
    try:
        target = engine.resolve(model)
    except FtsError:
        return None
    return "base" if target is None else target[0]


def permitted(state: RuntimeState, key: Key, model: str) -> bool:
    try:
        return state.permits(key, model)
    except InvalidArgument:
        return False


@pytest.mark.parametrize("model", ["base", "base@v1", "base:latest", "1*base", "0.5*base", "base+fa", "fa+base",
                                   "base+base", "0*fa", "0*fa+0*fb", " base ", "BASE", "tiny-llama", "tiny-llama@v1",
                                   "1*tiny-llama", "tiny-llama+fa", "base\n", "base@v1\n"])
def test_a_key_for_the_base_alone_is_only_ever_served_the_base(world, model):
    _, _, engine = world
    state = state_of(engine)
    if permitted(state, BASE_ONLY, model):
        assert served(engine, model) in ("base", None), model


def test_base_means_the_base_in_a_stack_and_alone(world, tiny_model):
    _, _, engine = world
    for model in ("base", "1*base", "base+base", str(tiny_model), tiny_model.name):
        assert served(engine, model) == "base", model
    assert served(engine, "base+fa") == served(engine, "fa+base") == "1*fa@v1"  # the base adds no delta
    for model in ("base@v1", "base:latest", f"{tiny_model.name}@v1"):  # the base has no versions or aliases
        with pytest.raises(InvalidArgument, match="base model"):
            engine.resolve(model)
    assert "base" not in state_of(engine).available() and tiny_model.name not in state_of(engine).available()


def test_weight_zero_is_base_output_and_needs_the_bases_permission(world):
    _, _, engine = world
    state = state_of(engine)
    assert not permitted(state, FA_ONLY, "0*fa") and not permitted(state, FA_ONLY, "0*fa+0.0*fa")
    assert permitted(state, FA_AND_BASE, "0*fa")
    assert permitted(state, FA_ONLY, "fa") and permitted(state, FA_ONLY, "0.5*fa")
    assert permitted(state, FA_ONLY, "base+fa")  # the base adds no delta: this is fa's output
    assert not permitted(state, FA_ONLY, "fa+fb")


def test_one_parse_reads_every_form():
    names = {"base", "/m/tiny", "tiny"}
    parsed = [(t.weight, t.ref, t.name) for t in parse_model("0.7*a@v2 + 0.3*b:prod+base", names)]
    assert parsed == [(0.7, "a@v2", "a"), (0.3, "b:prod", "b"), (1.0, None, None)]
    assert [t.ref for t in parse_model("/m/tiny", names)] == [None]
    for bad in ("a++b", "*a", "1e999*a", "101*a", "a b", "a\n+b", "+".join(["a"] * 9), "tiny@v1", "nl\n"):
        with pytest.raises(InvalidArgument) as info:
            parse_model(bad, names)
        assert info.value.param == "model"


@pytest.fixture
def admin(world):
    _, _, engine = world
    with TestClient(build_app(engine, state_of(engine).config), raise_server_exceptions=False) as client:
        yield client
    for name in list(engine.named):
        engine.unload_named(name)


@pytest.mark.parametrize("name", ["a+b", "base", "BASE", "tiny-llama", "x" * 200, "nl\n", "a b", "fa@v1\n", ""])
def test_load_lora_adapter_takes_names_by_the_stores_rule(admin, name):
    answer = admin.post("/v1/load_lora_adapter", json={"lora_name": name, "lora_path": "fa@v1"})
    assert answer.status_code == 400 and answer.json()["error"]["param"] == "lora_name", answer.text


def test_load_lora_adapter_still_takes_a_store_reference_as_its_name(admin, world):
    for name in ("mine", "fa@v1", "team.support_2:prod"):
        answer = admin.post("/v1/load_lora_adapter", json={"lora_name": name, "lora_path": "fa@v1"})
        assert answer.status_code == 200, answer.text


@pytest.mark.parametrize("path", ["/tmp/\x00x", "./a\x00", "/" + "a" * 5000, "~nobody-such-user/x"])
def test_an_unusable_lora_path_is_a_json_400_naming_it(admin, path):
    answer = admin.post("/v1/load_lora_adapter", json={"lora_name": "mine", "lora_path": path})
    assert answer.status_code == 400 and answer.json()["error"]["param"] == "lora_path", answer.text


def test_lora_path_reads_the_store_and_the_roots_but_not_the_rest_of_fts_home(tiny_model, tmp_path, monkeypatch):
    home = tmp_path / "home"
    store = AdapterStore(home / "store")
    store.publish(make_adapter(tiny_model, tmp_path / "src", r=4, seed=1), "fa")
    job_adapter = make_adapter(tiny_model, home / "jobs" / "j1" / "adapter", r=4, seed=2)
    elsewhere = make_adapter(tiny_model, tmp_path / "elsewhere" / "adapter", r=4, seed=3)
    monkeypatch.setenv("FTS_HOME", str(home))
    config = RuntimeConfig(base=str(tiny_model), store=str(store.root), cache=home / "edge-cache", max_rank=8,
                           roots=(tmp_path,))  # as `edge serve` has them: FTS_HOME's parent is a root
    with TestClient(build_app(open_engine(config), config), raise_server_exceptions=False) as client:
        def load(path: str):
            return client.post("/v1/load_lora_adapter", json={"lora_name": "mine", "lora_path": path})

        for path in (str(job_adapter), str(store.root / ".." / "jobs" / "j1" / "adapter"),
                     str(home / "store" / "fa" / "v1" / ".." / ".." / ".." / "jobs" / "j1" / "adapter")):
            answer = load(path)
            assert answer.status_code == 400 and answer.json()["error"]["param"] == "lora_path", (path, answer.text)
            assert "FTS_HOME" in answer.json()["error"]["message"]
        assert load(str(elsewhere)).status_code == 200  # a root
        assert load(str(store.root / "fa" / "v1")).status_code == 200  # the store, inside FTS_HOME
        assert load("fa@v1").status_code == 200


def test_a_name_that_is_no_url_path_is_a_clean_answer_through_an_http_store(world, tiny_model, tmp_path):
    """An HTTP store's index listing 'nl\\n': the name is refused, never turned into a URL (a bare 500)."""
    root, store, _ = world
    served_root = tmp_path / "served"
    shutil.copytree(store.root, served_root)
    index = json.loads((served_root / "index.json").read_text())
    index["adapters"]["nl\n"] = index["adapters"]["fa"]
    (served_root / "index.json").write_text(json.dumps(index))
    server = ThreadingHTTPServer(("127.0.0.1", 0), partial(Quiet, directory=str(served_root)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        engine = Engine(str(tiny_model), StoreSource(f"http://127.0.0.1:{server.server_address[1]}",
                                                      tmp_path / "cache"), max_rank=8)
        with TestClient(build_app(engine, state_of(engine).config), raise_server_exceptions=False) as client:
            for model in ("nl\n", "nl\n+fa", "fa@v1\n", "fa\n"):
                answer = client.post("/v1/completions", json={"model": model, "prompt": "hi", "max_tokens": 2})
                assert answer.status_code in (400, 404) and answer.json()["error"]["param"] == "model", answer.text
            assert "nl\n" not in [m["id"] for m in client.get("/v1/models").json()["data"]]
    finally:
        server.shutdown()
        server.server_close()


class Quiet(SimpleHTTPRequestHandler):
    def log_message(self, *args) -> None:
        pass


def test_an_adapter_named_base_is_not_published_nor_listed(world):
    _, store, _ = world
    assert "base" not in store.names()
    with pytest.raises(InvalidArgument) as info:
        store.publish(store.path("fa", "v1"), "base")
    assert info.value.param == "name"

