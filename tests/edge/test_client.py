"""What comes back from a runtime at a URL the agent gave is bounded and checked before it reaches the agent."""

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from fts_mcp.edge.client import MAX_ANSWER_BYTES, MAX_ANSWER_CHARS, post_generate
from fts_mcp.errors import FtsError


def serve(body: bytes):
    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):  # noqa: N802 - the http.server API
            self.rfile.read(int(self.headers["content-length"]))
            self.send_response(200)
            self.send_header("content-type", "application/json")
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, f"http://127.0.0.1:{server.server_address[1]}"


def test_a_long_answer_is_truncated_and_vllm_usage_details_are_accepted():
    body = json.dumps({"choices": [{"text": "a" * (MAX_ANSWER_CHARS * 2), "finish_reason": "length"}],
                       "usage": {"prompt_tokens": 3, "completion_tokens": 9, "total_tokens": 12,
                                 "prompt_tokens_details": None}}).encode()
    server, url = serve(body)
    try:
        answer = post_generate(url, "x", "hi", None, 8, 0.0, timeout=10)
    finally:
        server.shutdown()
        server.server_close()
    assert len(answer["text"]) == MAX_ANSWER_CHARS and answer["usage"]["total_tokens"] == 12


def test_an_answer_bigger_than_any_completion_is_refused_while_reading():
    server, url = serve(b'{"choices": [{"text": "' + b"a" * (MAX_ANSWER_BYTES + 10) + b'"}]}')
    try:
        with pytest.raises(FtsError, match="more than"):
            post_generate(url, "x", "hi", None, 8, 0.0, timeout=10)
    finally:
        server.shutdown()
        server.server_close()
