"""The runtime as OpenAI's own Python client sees it: completions and chat, streamed and not, prompt lists, `n`,
stop sequences, usage, and the errors the client raises by type."""

from __future__ import annotations

import json
import threading

import httpx
import openai
import pytest
import uvicorn

from fts_mcp.adapters.sources import StoreSource
from fts_mcp.adapters.store import AdapterStore
from fts_mcp.edge.api.config import RuntimeConfig
from fts_mcp.edge.api.routes import build_app
from fts_mcp.edge.engine import Engine
from fts_mcp.edge.tenants import Tenants
from fts_mcp.errors import InvalidArgument
from tests.conftest import make_adapter, wait_for
from tests.test_transports import free_port, port_open

PROMPT = "Code word for apple:"
CHAT = [{"role": "user", "content": "Code word for river?"}]


@pytest.fixture(scope="module")
def runtime(tiny_model, tmp_path_factory):
    root = tmp_path_factory.mktemp("openai")
    store = AdapterStore(root / "store")
    for name, seed in (("fa", 1), ("fb", 2)):
        store.publish(make_adapter(tiny_model, root / name, r=4, seed=seed), name)
    engine = Engine(str(tiny_model), StoreSource(root / "store", root / "cache"), max_rank=8)
    port = free_port()
    config = RuntimeConfig(base=str(tiny_model), store=str(root / "store"), cache=root / "cache", max_rank=8)
    server = uvicorn.Server(uvicorn.Config(build_app(engine, config), host="127.0.0.1", port=port,
                                           log_level="warning"))
    threading.Thread(target=server.run, daemon=True).start()
    wait_for(lambda: port_open(port), 10, what="the runtime to listen")
    yield engine, openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0)
    server.should_exit = True


def test_completions_streamed_and_not_agree_and_report_usage(runtime):
    engine, client = runtime
    whole = client.completions.create(model="fa", prompt=PROMPT, max_tokens=12)
    assert whole.choices[0].text == engine.generate("fa", prompt=PROMPT, max_tokens=12)["text"]
    assert whole.usage.completion_tokens == 12 and whole.usage.prompt_tokens == len(engine.prompt_ids(PROMPT, None, 1))
    chunks = list(client.completions.create(model="fa", prompt=PROMPT, max_tokens=12, stream=True,
                                            stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == whole.choices[0].text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == whole.choices[0].finish_reason == "length"
    assert len([c for c in chunks if c.choices]) > 2  # it really streamed, token by token
    assert chunks[-1].choices == [] and chunks[-1].usage.total_tokens == whole.usage.total_tokens


def test_chat_streamed_and_not_agree(runtime):
    engine, client = runtime
    whole = client.chat.completions.create(model="fb", messages=CHAT, max_completion_tokens=10)
    expected = engine.generate("fb", messages=CHAT, max_tokens=10)["text"]
    assert whole.choices[0].message.content == expected and whole.choices[0].message.role == "assistant"
    stream = client.chat.completions.create(model="fb", messages=CHAT, max_tokens=10, stream=True)
    deltas = [c.choices[0].delta for c in stream]
    assert deltas[0].role == "assistant" and "".join(d.content or "" for d in deltas) == expected


def test_prompt_lists_and_n_give_every_choice_its_index(runtime):
    engine, client = runtime
    prompts = [PROMPT, "hi"]
    answer = client.completions.create(model="fa", prompt=prompts, n=2, max_tokens=6)
    assert [c.index for c in answer.choices] == [0, 1, 2, 3]
    expected = [engine.generate("fa", prompt=p, max_tokens=6)["text"] for p in prompts]
    assert [c.text for c in answer.choices] == [expected[0], expected[0], expected[1], expected[1]]  # greedy: n alike
    assert answer.usage.prompt_tokens == sum(len(engine.prompt_ids(p, None, 1)) for p in prompts)
    sampled = client.completions.create(model="fa", prompt="hi", n=3, max_tokens=12, temperature=1.0, seed=3)
    again = client.completions.create(model="fa", prompt="hi", n=3, max_tokens=12, temperature=1.0, seed=3)
    assert [c.text for c in sampled.choices] == [c.text for c in again.choices]  # seeded: reproducible
    assert len({c.text for c in sampled.choices}) > 1  # and the n choices differ


def test_a_stop_sequence_ends_the_text_before_it(runtime):
    engine, client = runtime
    full = engine.generate("fa", prompt=PROMPT, max_tokens=12)["text"]
    marker = full[len(full) // 2]
    cut = full[: full.index(marker)]
    whole = client.completions.create(model="fa", prompt=PROMPT, max_tokens=12, stop=[marker])
    assert (whole.choices[0].text, whole.choices[0].finish_reason) == (cut, "stop")
    streamed = client.completions.create(model="fa", prompt=PROMPT, max_tokens=12, stop=marker, stream=True)
    assert "".join(c.choices[0].text for c in streamed) == cut


def test_errors_arrive_as_the_clients_own_exceptions(runtime):
    _, client = runtime
    with pytest.raises(openai.NotFoundError, match="Available models"):
        client.completions.create(model="nobody", prompt="hi", max_tokens=2)
    with pytest.raises(openai.BadRequestError, match="presence_penalty: not supported"):
        client.completions.create(model="fa", prompt="hi", max_tokens=2, presence_penalty=0.5)
    with pytest.raises(openai.BadRequestError, match="nonsense: not a field"):
        client.completions.create(model="fa", prompt="hi", max_tokens=2, extra_body={"nonsense": 1})
    neutral = client.completions.create(model="fa", prompt="hi", max_tokens=2, presence_penalty=0, echo=False)
    assert neutral.choices[0].finish_reason == "length"  # a neutral value changes nothing, so it is accepted


ACME, GLOBEX, OPS = "sk-acme-0123456789abcdef", "sk-globex-0123456789abcdef", "sk-ops-0123456789abcdef0"


@pytest.fixture(scope="module")
def tenants_runtime(runtime, tmp_path_factory):
    engine, _ = runtime
    keys = tmp_path_factory.mktemp("keys") / "keys.json"
    keys.write_text(json.dumps({"keys": [{"key": ACME, "adapters": ["fa", "fa-*"]},
                                         {"key": GLOBEX, "adapters": ["fb", "base"]},
                                         {"key": OPS, "adapters": ["*"], "admin": True}]}))
    port = free_port()
    config = RuntimeConfig(base=engine.base_name, store=str(engine.source.location),
                           cache=engine.source.cache_dir, keys=keys)
    server = uvicorn.Server(uvicorn.Config(build_app(engine, config, Tenants.load(keys)), host="127.0.0.1",
                                           port=port, log_level="warning"))
    threading.Thread(target=server.run, daemon=True).start()
    wait_for(lambda: port_open(port), 10, what="the runtime to listen")
    yield f"http://127.0.0.1:{port}"
    server.should_exit = True


def test_a_tenant_sees_and_uses_only_its_adapters(tenants_runtime):
    def client(key):
        return openai.OpenAI(base_url=f"{tenants_runtime}/v1", api_key=key, max_retries=0)

    acme, globex = client(ACME), client(GLOBEX)
    assert {m.id for m in acme.models.list()} == {"fa", "fa@v1", "fa:latest"}
    assert "fb" in {m.id for m in globex.models.list()} and "fa" not in {m.id for m in globex.models.list()}
    assert acme.completions.create(model="fa", prompt="hi", max_tokens=2).choices[0].finish_reason == "length"
    with pytest.raises(openai.PermissionDeniedError, match="may not use 'fb'"):
        acme.completions.create(model="fb", prompt="hi", max_tokens=2)
    with pytest.raises(openai.PermissionDeniedError):
        acme.chat.completions.create(model="fa+fb", messages=CHAT, max_tokens=2)  # a stack: every part
    with pytest.raises(openai.PermissionDeniedError):
        acme.completions.create(model="base", prompt="hi", max_tokens=2)
    globex.completions.create(model="base", prompt="hi", max_tokens=2)
    with pytest.raises(openai.AuthenticationError):
        client("sk-unknown-0123456789abcdef").models.list()


def test_a_tenant_never_learns_another_tenants_adapter_names(tenants_runtime):
    acme = openai.OpenAI(base_url=f"{tenants_runtime}/v1", api_key=ACME, max_retries=0)
    with pytest.raises(openai.NotFoundError) as missing:  # a name its pattern allows, which does not exist
        acme.completions.create(model="fa-missing", prompt="hi", max_tokens=2)
    assert "fa" in str(missing.value) and "fb" not in str(missing.value)
    health = httpx.get(f"{tenants_runtime}/health", headers={"Authorization": f"Bearer {ACME}"}).json()
    assert health["status"] == "ok" and "cached" not in health and "loaded" not in health
    assert "cached" in httpx.get(f"{tenants_runtime}/health", headers={"Authorization": f"Bearer {OPS}"}).json()


def test_admin_calls_need_an_admin_key(tenants_runtime):
    load = {"lora_name": "mine", "lora_path": "fa@v1"}
    assert httpx.post(f"{tenants_runtime}/v1/load_lora_adapter", json=load,
                      headers={"Authorization": f"Bearer {ACME}"}).status_code == 403
    assert httpx.get(f"{tenants_runtime}/metrics", headers={"Authorization": f"Bearer {ACME}"}).status_code == 403
    assert httpx.get(f"{tenants_runtime}/metrics", headers={"Authorization": f"Bearer {OPS}"}).status_code == 200
    assert httpx.post(f"{tenants_runtime}/v1/load_lora_adapter", json=load,
                      headers={"Authorization": f"Bearer {OPS}"}).status_code == 200


@pytest.mark.parametrize("content, words", [
    ('{"keys": [{"key": "short", "adapters": ["*"]}]}', "keys.0.key"),
    ('{"keys": []}', "keys"),
    ('{"keys": [{"key": "sk-0123456789abcdefX", "adaptors": ["*"]}]}', "adaptors"),
    ("not json", "not JSON"),
])
def test_a_bad_keys_file_is_refused_naming_the_entry(tmp_path, content, words):
    path = tmp_path / "keys.json"
    path.write_text(content)
    with pytest.raises(InvalidArgument, match=words) as refused:
        Tenants.load(path)
    assert refused.value.param == "--keys"
