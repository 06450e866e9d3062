"""One request must not take the runtime down: body size, context length, a bounded queue, a deadline, and a
client that disconnects. The HTTP rules are tested over a real socket against an engine whose generation is
slow on purpose; the engine's own stopping rules against the tiny model."""

import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
import uvicorn

from fts_mcp.adapters.sources import StoreSource
from fts_mcp.edge.api.access import MAX_BODY_BYTES
from fts_mcp.edge.api.config import RuntimeConfig
from fts_mcp.edge.api.routes import build_app
from fts_mcp.edge.engine import DeadlineExceeded, Engine, Metrics, Ticket, parse_model
from fts_mcp.errors import InvalidArgument
from tests.conftest import wait_for
from tests.test_transports import free_port, port_open


class SlowEngine:
    """Generates one token per 10 ms on a thread per request and honours `cancel` and `deadline` the way the real
    engine's scheduler does."""

    base_name = "slow-base"
    base_names = frozenset({"slow-base", "base"})
    named: dict = {}
    cache: dict = {}
    device = "cpu"

    def __init__(self) -> None:
        self.metrics = Metrics()
        self.cancelled = threading.Event()
        self.source = type("NoStore", (), {"catalogue": staticmethod(lambda wait=None: {})})()

    def terms(self, model):
        return parse_model(model, self.base_names)

    def resolve(self, model):
        return None

    def base_warning(self, model):  # every adapter here was trained on the base it is served on
        return None

    def prompt_ids(self, prompt, messages, max_tokens):
        return [1]

    def text_of(self, tokens):
        return "x" * len(tokens)

    def submit(self, model, ids, *, max_tokens=64, deadline=None, **_):
        ticket = Ticket(model=model, key="base", prompt_tokens=len(ids))

        def produce():
            for _ in range(max_tokens):
                with ticket.producing():
                    if ticket.cancel.is_set():
                        self.cancelled.set()
                        ticket.finish_reason, ticket.text = "cancelled", self.text_of(ticket.tokens)
                        return
                    if deadline is not None and time.monotonic() > deadline:
                        ticket.finish_reason, ticket.text = "deadline", self.text_of(ticket.tokens)
                        return
                    ticket.tokens.append(7)
                time.sleep(0.01)
            with ticket.producing():
                ticket.finish_reason, ticket.text = "length", self.text_of(ticket.tokens)

        threading.Thread(target=produce, daemon=True).start()
        return ticket


def limits_of(**limits) -> RuntimeConfig:
    return RuntimeConfig(base=SlowEngine.base_name, store="unused", cache=Path("unused"), **limits)


@pytest.fixture
def serve():
    servers = []

    def start(engine, **limits) -> str:
        port = free_port()
        server = uvicorn.Server(uvicorn.Config(build_app(engine, limits_of(**limits)), host="127.0.0.1", port=port,
                                               log_level="warning"))
        threading.Thread(target=server.run, daemon=True).start()
        wait_for(lambda: port_open(port), 10, what="the runtime to listen")
        servers.append(server)
        return f"http://127.0.0.1:{port}"

    yield start
    for server in servers:
        server.should_exit = True


def ask(url: str, max_tokens: int, timeout: float = 30) -> httpx.Response:
    return httpx.post(f"{url}/v1/completions", json={"model": "base", "prompt": "hi", "max_tokens": max_tokens},
                      timeout=timeout)


def test_generation_stops_when_the_client_disconnects(serve):
    engine = SlowEngine()
    url = serve(engine)
    with pytest.raises(httpx.ReadTimeout):
        ask(url, 2000, timeout=0.3)  # 20 s of tokens; the client gives up after 0.3 s
    assert engine.cancelled.wait(5), "generation went on after the client left"


def test_a_full_queue_answers_429_with_retry_after(serve):
    url = serve(SlowEngine(), max_queue=2)
    with ThreadPoolExecutor(6) as pool:
        answers = list(pool.map(lambda _: ask(url, 50), range(6)))
    codes = sorted(a.status_code for a in answers)
    assert codes.count(200) >= 2 and 429 in codes, codes
    refused = next(a for a in answers if a.status_code == 429)
    assert refused.headers["retry-after"] == "1" and refused.json()["error"]["type"] == "rate_limit_exceeded"
    assert ask(url, 1).status_code == 200  # the queue drains


def test_a_request_past_its_deadline_gets_504(serve):
    url = serve(SlowEngine(), request_timeout=0.3)
    answer = ask(url, 500)
    assert answer.status_code == 504 and answer.json()["error"]["param"] == "max_tokens"


def test_bodies_are_bounded_and_errors_name_the_field(serve):
    url = serve(SlowEngine())
    big = httpx.post(f"{url}/v1/completions", content=b'{"model": "base", "prompt": "' + b"a" * MAX_BODY_BYTES
                     + b'"}', headers={"content-type": "application/json"}, timeout=30)
    assert big.status_code == 413
    bad = httpx.post(f"{url}/v1/completions", json={"model": "base", "prompt": "x", "max_tokens": 0})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "max_tokens"
    deep = httpx.post(f"{url}/v1/completions", content=b"[" * 100_000, headers={"content-type": "application/json"})
    assert deep.status_code == 400


@pytest.fixture(scope="module")
def engine(tiny_model, tmp_path_factory):
    root = tmp_path_factory.mktemp("engine")
    return Engine(str(tiny_model), StoreSource(root / "store", root / "cache"), max_rank=8)


def test_prompt_and_completion_must_fit_the_context(engine):
    with pytest.raises(InvalidArgument) as info:
        engine.generate("base", prompt="a" * (engine.context + 10), max_tokens=4)
    assert info.value.param == "prompt" and f"{engine.context:,}" in info.value.message
    with pytest.raises(InvalidArgument) as info:
        engine.generate("base", prompt="a" * (engine.context - 20), max_tokens=100)
    assert info.value.param == "max_tokens"


def test_the_engine_stops_between_tokens_on_cancel_and_deadline(engine):
    cancel = threading.Event()
    cancel.set()
    stopped = engine.generate("base", prompt="hello", max_tokens=200, cancel=cancel)
    assert stopped["finish_reason"] == "cancelled" and stopped["usage"]["completion_tokens"] <= 1
    with pytest.raises(DeadlineExceeded):
        engine.generate("base", prompt="hello", max_tokens=200, deadline=time.monotonic() - 1)
    assert engine.generate("base", prompt="hello", max_tokens=3)["usage"]["completion_tokens"] <= 3


@pytest.mark.parametrize("config", ['{"r": "many", "lora_alpha": 8}', '{"r": 0}', "[1, 2]", '{"peft_type": "LORA"}'])
def test_a_stored_adapter_with_a_bad_config_is_refused_as_corrupt(engine, tiny_model, tmp_path, config):
    """Even with matching sha256s (the store's publisher was wrong, not the transfer): 502, never a crash."""
    import json

    from fts_mcp.adapters.store import AdapterStore, CorruptAdapter
    from fts_mcp.files import sha256_file
    from tests.conftest import make_adapter

    store = AdapterStore(engine.source.local.root)
    name = f"bad{abs(hash(config)) % 10_000}"
    manifest, _ = store.publish(make_adapter(tiny_model, tmp_path / "src", r=4, seed=2), name)
    folder = store.root / name / manifest.version
    (folder / "adapter_config.json").write_text(config)
    data = json.loads((folder / "manifest.json").read_text())
    data["files"]["adapter_config.json"] = {"bytes": len(config), "sha256": sha256_file(folder / "adapter_config.json")}
    (folder / "manifest.json").write_text(json.dumps(data))
    with pytest.raises(CorruptAdapter):
        engine.generate(name, prompt="hi", max_tokens=2)
    assert engine.generate("base", prompt="hi", max_tokens=2)["usage"]["completion_tokens"] <= 2


def test_a_chat_the_template_refuses_is_a_400_naming_messages(engine):
    template = engine.tokenizer.chat_template
    engine.tokenizer.chat_template = "{{ raise_exception('roles must alternate user/assistant') }}"
    try:
        with pytest.raises(InvalidArgument, match="roles must alternate") as info:
            engine.generate("base", messages=[{"role": "user", "content": "hi"}], max_tokens=2)
        assert info.value.param == "messages"
    finally:
        engine.tokenizer.chat_template = template


def test_a_stream_sends_tokens_as_they_are_generated(serve):
    """50 tokens at 10 ms each: the first arrives long before the last is generated, then one event per token."""
    url = serve(SlowEngine())
    started, arrivals = time.monotonic(), []
    with httpx.stream("POST", f"{url}/v1/completions", timeout=30,
                      json={"model": "base", "prompt": "hi", "max_tokens": 50, "stream": True}) as response:
        for line in response.iter_lines():
            if line.startswith("data: {"):
                arrivals.append(time.monotonic() - started)
    assert len(arrivals) >= 40  # a delta per token (give or take those that share a wake-up)
    assert arrivals[0] < 0.25 and arrivals[-1] > 0.45  # the first came before the 50 x 10 ms were up


def test_the_queue_counts_sequences_not_requests(serve):
    """A request with n=3 takes three places: with room for four, a second such request waits its turn (429),
    and one asking for more than the runtime ever takes is refused, naming n."""
    url = serve(SlowEngine(), max_queue=4)

    def many(n: int, max_tokens: int) -> httpx.Response:
        return httpx.post(f"{url}/v1/completions", json={"model": "base", "prompt": "hi", "n": n,
                                                         "max_tokens": max_tokens}, timeout=30)

    with ThreadPoolExecutor(2) as pool:
        first = pool.submit(many, 3, 100)  # a second of tokens
        time.sleep(0.3)
        second = pool.submit(many, 3, 1)
        assert second.result().status_code == 429 and first.result().status_code == 200
    assert len(first.result().json()["choices"]) == 3
    too_many = many(5, 1)
    assert too_many.status_code == 400 and too_many.json()["error"]["param"] == "n"
    assert many(3, 1).status_code == 200  # the places were given back


@pytest.mark.anyio
async def test_a_stream_whose_client_is_gone_before_the_first_byte_gives_its_place_back():
    """The streamed answer's body never starts (sending its headers fails): its queue places come back anyway."""
    import json

    app = build_app(SlowEngine(), limits_of(max_queue=1))
    body = json.dumps({"model": "base", "prompt": "hi", "max_tokens": 5, "stream": True}).encode()
    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST", "scheme": "http",
             "path": "/v1/completions", "raw_path": b"/v1/completions", "query_string": b"", "root_path": "",
             "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())],
             "client": ("127.0.0.1", 1), "server": ("127.0.0.1", 80)}
    sent = []

    async def receive():
        if not sent:
            sent.append(True)
            return {"type": "http.request", "body": body, "more_body": False}
        return {"type": "http.disconnect"}

    async def send(message):
        if message["type"] == "http.response.start":
            raise OSError("the client is gone")

    with pytest.raises(OSError):
        await app(scope, receive, send)
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://127.0.0.1") as client:
        again = await client.post("/v1/completions", json={"model": "base", "prompt": "hi", "max_tokens": 2})
    assert again.status_code == 200, again.text  # not 429: the place was given back
