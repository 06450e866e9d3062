"""`runtime_url` reaches this host's runtimes (and the hosts FTS_RUNTIME_HOSTS names) only, and what a runtime
answers with an error is never passed on whole: a tool must not become a way to read other servers."""

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from fts_mcp.config import Settings
from fts_mcp.edge.client import check_url, post_load
from fts_mcp.errors import InvalidArgument

LOOPBACK = ["http://127.0.0.1:8001", "http://127.8.9.10:8001/", "http://[::1]:8001", "http://localhost:8001",
            "https://LOCALHOST"]
ELSEWHERE = ["http://10.0.0.5:8001", "http://169.254.169.254/latest/meta-data", "http://example.com",
             "http://127.0.0.1@example.com/", "http://localhost.example.com:8001", "http://[::ffff:10.0.0.5]/",
             "http://0.0.0.0:8001", "http://gpu-1.internal:8001"]


@pytest.mark.parametrize("url", LOOPBACK)
def test_loopback_runtimes_are_accepted(url, monkeypatch):
    monkeypatch.delenv("FTS_RUNTIME_HOSTS", raising=False)
    assert check_url(url) == url.rstrip("/")


@pytest.mark.parametrize("url", ELSEWHERE)
def test_other_hosts_are_refused_naming_the_setting_that_allows_them(url, monkeypatch):
    monkeypatch.delenv("FTS_RUNTIME_HOSTS", raising=False)
    with pytest.raises(InvalidArgument) as refused:
        check_url(url)
    assert refused.value.param == "runtime_url" and "FTS_RUNTIME_HOSTS" in refused.value.message


def test_fts_runtime_hosts_allows_the_hosts_it_names_and_no_others(monkeypatch):
    monkeypatch.setenv("FTS_RUNTIME_HOSTS", " GPU-1.internal , 10.0.0.5,[fd00::7]")
    for url in ("http://gpu-1.internal:8001", "https://Gpu-1.Internal", "http://10.0.0.5:8001", "http://[fd00::7]:80"):
        assert check_url(url) == url
    with pytest.raises(InvalidArgument):
        check_url("http://gpu-2.internal:8001")
    assert check_url("http://gpu-2.internal", allowed={"gpu-2.internal"}) == "http://gpu-2.internal"


@pytest.mark.parametrize("value", ["http://gpu-1:8001", "gpu-1:8001", "gpu 1", "a/b", "*"])
def test_a_runtime_host_that_is_not_a_bare_host_name_is_refused(value, tmp_path):
    with pytest.raises(InvalidArgument) as refused:
        Settings.from_env({"FTS_HOME": str(tmp_path), "FTS_GPUS": "none", "FTS_RUNTIME_HOSTS": value})
    assert refused.value.param == "FTS_RUNTIME_HOSTS"


def serve(status: int, body: bytes, content_type: str = "application/json"):
    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):  # noqa: N802 - the http.server API
            self.rfile.read(int(self.headers["content-length"]))
            self.send_response(status)
            self.send_header("content-type", content_type)
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, f"http://127.0.0.1:{server.server_address[1]}"


def load_error(status: int, body: bytes, content_type: str = "application/json") -> str:
    server, url = serve(status, body, content_type)
    try:
        with pytest.raises(InvalidArgument) as refused:
            post_load(url, "a", "/x")
    finally:
        server.shutdown()
        server.server_close()
    return refused.value.message


@pytest.mark.parametrize("body, content_type", [
    (b"<html>SECRET admin console: root password hunter2</html>", "text/html"),
    (b'{"detail": "SECRET internal token abc"}', "application/json"),
    (b'{"error": "SECRET as a bare string"}', "application/json"),
    (json.dumps({"error": {"message": {"nested": "SECRET"}}}).encode(), "application/json"),
])
def test_a_peers_error_body_is_never_echoed(body, content_type):
    message = load_error(500, body, content_type)
    assert "SECRET" not in message and "500" in message


def test_the_runtimes_own_error_message_is_passed_on_short_and_clean():
    said = {"error": {"message": "adapter 'x@v9' is not in the store\x1b[31m" + "y" * 1000, "type": "not_found",
                      "param": "lora_path", "code": 404}}
    message = load_error(404, json.dumps(said).encode())
    assert "adapter 'x@v9' is not in the store" in message and "404" in message
    assert "\x1b" not in message and "y" * 200 not in message and len(message) < 400
