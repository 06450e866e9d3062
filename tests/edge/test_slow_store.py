"""A slow, silent or failing HTTP store must not freeze the runtime: store reads run off the event loop with an
overall deadline, a failed refresh serves the last good index, failures are remembered briefly, and a manifest
cannot make the runtime download more than a sane size (or download a bad file again on every request).

The stores here are local threaded HTTP servers that answer, fail (500), never answer, or trickle one byte at a
time, with small limits configured for the test."""

from __future__ import annotations

import json
import socket
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import pytest
import uvicorn

from fts_mcp.adapters.sources import FetchLimits, StoreSource
from fts_mcp.adapters.store import CorruptAdapter
from fts_mcp.edge.api.config import RuntimeConfig
from fts_mcp.edge.api.routes import build_app
from fts_mcp.edge.engine import Engine
from fts_mcp.errors import FtsError
from tests.conftest import wait_for
from tests.test_transports import free_port, port_open

TRICKLE_SECONDS = 0.2  # one byte this often: every read is prompt, the whole never arrives in time
FAST = FetchLimits(deadline=0.6, read_timeout=0.5, retry_after=30.0, stale_wait=0.2, index_ttl=0.0)


class StoreHandler(BaseHTTPRequestHandler):
    """Serves the files under `server.root`, the way `server.mode` says: ok, fail (500), silent (accepts, never
    answers) or trickle (headers, then one byte per TRICKLE_SECONDS). Counts the requests for each path."""

    def do_GET(self) -> None:  # noqa: N802 - the name http.server calls
        server = self.server
        path = self.path.lstrip("/")
        server.hits[path] += 1
        if server.mode == "silent":
            server.stop.wait(30)
            return
        if server.mode == "fail":
            self.send_error(500)
            return
        file = server.root / path
        if not file.is_file():
            self.send_error(404)
            return
        data = file.read_bytes()
        self.send_response(200)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if server.mode == "trickle":
            for byte in data:
                if server.stop.wait(TRICKLE_SECONDS):
                    return
                self.wfile.write(bytes([byte]))
                self.wfile.flush()
            return
        self.wfile.write(data)

    def log_message(self, *args) -> None:
        pass


class Store(ThreadingHTTPServer):
    def __init__(self, root: Path) -> None:
        super().__init__(("127.0.0.1", 0), StoreHandler)
        self.root, self.mode, self.hits, self.stop = root, "ok", Counter(), threading.Event()

    def handle_error(self, request, client_address) -> None:  # a client that gave up mid-answer: expected here
        pass

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


@pytest.fixture
def store(tmp_path):
    root = tmp_path / "served"
    root.mkdir()
    (root / "index.json").write_text(json.dumps({"adapters": {"fa": {"versions": ["v1"],
                                                                      "aliases": {"latest": "v1"}}}}))
    server = Store(root)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield server
    server.stop.set()
    server.shutdown()
    server.server_close()


def source_at(url: str, cache: Path, limits: FetchLimits = FAST) -> StoreSource:
    return StoreSource(url, cache, limits=limits)


def timed(call) -> tuple[float, object]:
    started = time.monotonic()
    try:
        return time.monotonic() - started, call()
    except FtsError as exc:
        return time.monotonic() - started, exc


def test_a_trickling_index_is_cut_at_the_overall_deadline(store, tmp_path):
    store.mode = "trickle"
    source = source_at(store.url, tmp_path / "cache")
    elapsed, outcome = timed(source.catalogue)
    assert isinstance(outcome, FtsError) and "0.6" in outcome.message, outcome
    assert elapsed < FAST.deadline + 0.4  # the deadline, not a per-read timeout that every byte resets


def test_a_failed_refresh_serves_the_last_good_index(store, tmp_path):
    source = source_at(store.url, tmp_path / "cache")
    assert set(source.catalogue()) == {"fa"}
    store.mode = "fail"
    assert set(source.catalogue()) == {"fa"}  # a 500: the index read before still serves
    with pytest.raises(FtsError, match="no adapter named 'fb'.*fa"):  # and resolves: 'fb' is unknown, not an error
        source.resolve("fb")


def test_a_slow_refresh_serves_the_last_good_index_after_a_short_wait(store, tmp_path):
    source = source_at(store.url, tmp_path / "cache")
    assert set(source.catalogue()) == {"fa"}
    store.mode = "silent"
    elapsed, outcome = timed(source.catalogue)
    assert outcome == {"fa": {"versions": ["v1"], "aliases": {"latest": "v1"}}} and elapsed < FAST.stale_wait + 0.3


def test_a_failure_is_remembered_briefly_and_then_tried_again(store, tmp_path):
    store.mode = "fail"
    source = source_at(store.url, tmp_path / "cache", FetchLimits(deadline=0.6, read_timeout=0.5, retry_after=0.5))
    for _ in range(5):
        elapsed, outcome = timed(lambda: source.resolve("fa"))
        assert isinstance(outcome, FtsError) and elapsed < 0.3
    assert store.hits["index.json"] == 1  # asked once; the other four were answered from memory
    wait_for(lambda: isinstance(timed(lambda: source.resolve("fa"))[1], FtsError) and store.hits["index.json"] == 2,
             3, 0.1, "the store to be asked again once the failure is forgotten")


def served_version(store: Store, files: dict[str, tuple[bytes, int]]) -> None:
    """fa@v1 on the store: each file's bytes, and the size its manifest declares."""
    folder = store.root / "fa" / "v1"
    folder.mkdir(parents=True)
    manifest = {"name": "fa", "version": "v1", "base_model": None, "r": 4, "alpha": 8, "target_modules": "all",
                "dtype": "bfloat16", "created": "2026-01-01T00:00:00Z",
                "files": {f: {"bytes": size, "sha256": "0" * 64} for f, (_, size) in files.items()}}
    (folder / "manifest.json").write_text(json.dumps(manifest))
    for name, (data, _) in files.items():
        (folder / name).write_bytes(data)


def test_declared_sizes_are_capped_before_anything_is_downloaded(store, tmp_path):
    served_version(store, {"adapter_config.json": (b"{}", 300 << 20), "adapter_model.safetensors": (b"x", 1)})
    source = source_at(store.url, tmp_path / "cache")
    with pytest.raises(CorruptAdapter, match="adapter_config.json.*MiB"):
        source.folder(source.resolve("fa"))
    assert store.hits["fa/v1/adapter_config.json"] == 0


def test_weights_above_the_runtimes_limit_are_refused_by_name(store, tmp_path):
    served_version(store, {"adapter_config.json": (b"{}", 2), "adapter_model.safetensors": (b"x" * 5000, 5000)})
    source = source_at(store.url, tmp_path / "cache",
                       FetchLimits(deadline=0.6, read_timeout=0.5, retry_after=30.0, max_adapter_bytes=4096))
    with pytest.raises(CorruptAdapter, match="adapter_model.safetensors.*4,096"):
        source.folder(source.resolve("fa"))
    assert store.hits["fa/v1/adapter_model.safetensors"] == 0


def test_a_file_that_failed_its_sha256_is_not_downloaded_again_on_every_request(store, tmp_path):
    served_version(store, {"adapter_config.json": (b"{}", 2), "adapter_model.safetensors": (b"x" * 5000, 5000)})
    source = source_at(store.url, tmp_path / "cache")
    for _ in range(3):
        with pytest.raises(CorruptAdapter, match="sha256"):
            source.folder(source.resolve("fa"))
    assert store.hits["fa/v1/adapter_config.json"] == 1


class SilentStore:
    """Accepts connections and never answers (a hung store or CDN)."""

    def __init__(self) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.held: list[socket.socket] = []
        self.closed = threading.Event()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self.closed.is_set():
            try:
                self.held.append(self.listener.accept()[0])
            except OSError:
                return

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.listener.getsockname()[1]}"

    def close(self) -> None:
        self.closed.set()
        self.listener.close()
        for conn in self.held:
            conn.close()


def test_a_silent_store_never_holds_up_health_or_the_base(tiny_model, tmp_path):
    """Many requests for an adapter wait on a store that never answers; meanwhile /health, /v1/models and the base
    answer at once, and once the store's failure is known, each further request is answered from memory."""
    silent = SilentStore()
    limits = FetchLimits(deadline=3.0, read_timeout=3.0, retry_after=30.0, stale_wait=0.2)
    engine = Engine(str(tiny_model), source_at(silent.url, tmp_path / "cache", limits), max_rank=8)
    port = free_port()
    config = RuntimeConfig(base=str(tiny_model), store=silent.url, cache=tmp_path / "cache", max_rank=8)
    server = uvicorn.Server(uvicorn.Config(build_app(engine, config), host="127.0.0.1", port=port,
                                           log_level="warning"))
    threading.Thread(target=server.run, daemon=True).start()
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for(lambda: port_open(port), 10, what="the runtime to listen")

        def complete(model: str, timeout: float = 30) -> httpx.Response:
            return httpx.post(f"{url}/v1/completions", json={"model": model, "prompt": "hi", "max_tokens": 2},
                              timeout=timeout)

        with ThreadPoolExecutor(45) as pool:  # more than anyio's 40 worker threads
            waiting = [pool.submit(complete, "someone") for _ in range(45)]
            wait_for(lambda: silent.held, 10, 0.05, "the requests to reach the store")
            elapsed, health = timed(lambda: httpx.get(f"{url}/health", timeout=2))
            assert health.status_code == 200 and elapsed < 1
            elapsed, base = timed(lambda: complete("base", timeout=5))
            assert base.status_code == 200 and base.json()["fts"]["adapter"] == "base" and elapsed < 2
            elapsed, listed = timed(lambda: httpx.get(f"{url}/v1/models", timeout=5))
            assert listed.status_code == 200 and elapsed < 2
            assert [m["id"] for m in listed.json()["data"]] == [str(tiny_model)]
            answers = [f.result() for f in waiting]
        assert {a.status_code for a in answers} == {502}
        assert all(a.json()["error"]["param"] == "model" for a in answers)
        for _ in range(5):  # the failure is remembered: no second wait for the same silent store
            elapsed, again = timed(lambda: complete("someone"))
            assert again.status_code == 502 and elapsed < 0.5
    finally:
        server.should_exit = True
        silent.close()
