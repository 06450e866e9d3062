"""The job view: an MCP App (a ui:// resource the training, status and evaluation tools link to, with the extension
advertised in the server's capabilities) and the same page at /ui for browsers.

What hosts read runs in the main suite. The browser tests (marker `browser`, CI's second step) drive headless
Chromium against a real server and real training jobs on the tiny model: once through a small host page that embeds
the view with the ext-apps AppBridge (tools/call and resources/read relayed to the server), once at /ui. Screenshots
go to $FTS_UI_SHOTS (else the test's tmp folder)."""

import functools
import http.client
import http.server
import json
import os
import socket
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import anyio
import httpx2
import pytest
from mcp import Client
from mcp.client.streamable_http import streamable_http_client

from fts_mcp.server import mcp
from fts_mcp.ui import VIEW_URI, page
from tests.conftest import FAST_TRAINING, REPO, SAMPLE_CHAT, wait_for

EXTENSION = "io.modelcontextprotocol/ui"
APP_MIME = "text/html;profile=mcp-app"
WITH_VIEW = {"start_qlora_job", "job_status", "evaluate_adapter"}
TOKEN = "ui-test-token-0123456789"
CHROMIUM = Path(os.environ.get("FTS_CHROMIUM", "/usr/bin/chromium"))
# as the machine notes say for a closed network; a sandboxed iframe rendered in the page's own process, so that a
# full-page screenshot holds the view
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--disable-features=IsolateSandboxedIframes"]
TERMINAL = ("succeeded", "failed", "cancelled", "interrupted")


# ---- what hosts read ------------------------------------------------------------------------------------------

@pytest.mark.anyio
@pytest.mark.parametrize("mode", ["auto", "legacy"])
async def test_the_training_status_and_evaluation_tools_link_the_view(fts_home, mode):
    async with Client(mcp, mode=mode) as client:
        tools = {t.name: t for t in (await client.list_tools()).tools}
        read = (await client.read_resource(VIEW_URI)).contents[0]
        listed = {r.uri: r for r in (await client.list_resources()).resources}
        extensions = client.server_capabilities.extensions
    assert {name for name, t in tools.items() if (t.meta or {}).get("ui")} == WITH_VIEW
    assert all(tools[name].meta == {"ui": {"resourceUri": VIEW_URI}} for name in WITH_VIEW)
    assert read.mime_type == APP_MIME and read.text == page() and read.meta == {"ui": {"prefersBorder": True}}
    assert read.text.lstrip().lower().startswith("<!doctype html>")
    assert "<script src=" not in read.text and "<link" not in read.text  # one self-contained file
    assert listed[VIEW_URI].mime_type == APP_MIME
    if mode == "auto":  # 2026-07-28: capabilities.extensions is in the schema
        assert extensions == {EXTENSION: {}}


def test_the_handshake_advertises_the_extension_too(fts_home):
    """On the 2025-11-25 wire (what most hosts speak) the SDK's schema has no capabilities.extensions; the server puts
    it into `initialize` there as well, as MCP Apps hosts on that wire read it."""
    request = ('{"jsonrpc":"2.0","id":1,"method":"initialize","params":{"protocolVersion":"2025-06-18","capabilities":'
               f'{{"extensions":{{"{EXTENSION}":{{"mimeTypes":["{APP_MIME}"]}}}}}},'
               '"clientInfo":{"name":"t","version":"1"}}}\n')
    proc = subprocess.Popen([sys.executable, "-m", "fts_mcp", "serve"], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True)
    proc.stdin.write(request)
    proc.stdin.flush()
    answer = json.loads(proc.stdout.readline())
    proc.communicate(timeout=20)
    assert answer["result"]["capabilities"]["extensions"] == {EXTENSION: {}}
    assert answer["result"]["capabilities"]["tools"] is not None


@contextmanager
def fts_server(*args: str, log: Path | None = None):
    """`fts-mcp serve --transport http` in a process; its stderr goes to `log`."""
    port = free_port()
    err = open(log, "w") if log else subprocess.DEVNULL  # noqa: SIM115 - closed below
    proc = subprocess.Popen([sys.executable, "-m", "fts_mcp", "serve", "--transport", "http", "--port", str(port),
                             *args], env=dict(os.environ), stdout=subprocess.DEVNULL, stderr=err)
    try:
        wait_for(lambda: port_open(port) or proc.poll() is not None, 30, what="the server to listen")
        assert proc.poll() is None, log.read_text() if log else "the server exited"
        yield port
    finally:
        proc.terminate()
        proc.wait(timeout=15)
        if log:
            err.close()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def port_open(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def test_ui_is_served_under_the_http_rules(fts_home, tmp_path):
    """The page (no data in it) answers a plain navigation, under the Host/Origin rules, with a policy that runs its own
    scripts only and lets it talk to its own origin only; /mcp still wants the token. The server says where it is."""
    with fts_server("--token", TOKEN, log=tmp_path / "serve.log") as port:
        said = (tmp_path / "serve.log").read_text()
        assert f"fts-mcp: job view at http://127.0.0.1:{port}/ui#token=<--token>" in said and TOKEN not in said, said
        base = f"http://127.0.0.1:{port}"
        with httpx2.Client(timeout=20) as http:
            got = http.get(f"{base}/ui")
            assert got.status_code == 200 and got.text == page()
            assert got.headers["content-type"].startswith("text/html")
            policy = got.headers["content-security-policy"]
            assert "script-src 'sha256-" in policy and "unsafe-inline" not in policy.split("style-src")[0]
            assert "connect-src 'self'" in policy and "frame-ancestors 'none'" in policy
            assert got.headers["x-content-type-options"] == "nosniff" and got.headers["cache-control"] == "no-store"
            assert http.head(f"{base}/ui/").status_code == 200
            assert http.post(f"{base}/ui", content=b"x").status_code == 405
            assert http.get(f"{base}/ui", headers={"Host": "evil.example"}).status_code == 421
            assert http.get(f"{base}/ui", headers={"Origin": "http://evil.example"}).status_code == 403
            assert http.post(f"{base}/mcp", json={"jsonrpc": "2.0", "id": 1, "method": "tools/list"}).status_code == 401
            assert http.get(f"{base}/ui/anything").status_code == 401  # not the page: the token rules


def test_a_token_from_the_environment_stays_out_of_the_servers_log(fts_home, tmp_path, monkeypatch):
    monkeypatch.setenv("FTS_AUTH_TOKEN", TOKEN)
    with fts_server(log=tmp_path / "serve.log") as port:
        said = (tmp_path / "serve.log").read_text()
    assert f"fts-mcp: job view at http://127.0.0.1:{port}/ui#token=<FTS_AUTH_TOKEN>" in said and TOKEN not in said


# ---- browser tests ----------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def chromium():
    if not CHROMIUM.exists():
        if os.environ.get("CI"):
            pytest.fail(f"no Chromium at {CHROMIUM}; .ci/run installs Debian's chromium")
        pytest.skip(f"no Chromium at {CHROMIUM} (apt-get install chromium)")
    from playwright.sync_api import sync_playwright  # the browser tier's own dependency

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        yield browser
        browser.close()


def npm_build(script: str, out: Path) -> Path:
    if not (REPO / "node_modules" / ".bin" / "vite").exists():
        if os.environ.get("CI"):
            pytest.fail("vite is not installed; .ci/run runs `npm install` first")
        pytest.skip("run `npm install` to build the pages")
    done = subprocess.run(["npm", "run", "--silent", script, "--", "--outDir", str(out), "--emptyOutDir"], cwd=REPO,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    return out


@pytest.fixture(scope="module")
def host_page(tmp_path_factory) -> Path:
    return npm_build("build:test-host", tmp_path_factory.mktemp("test-host")) / "index.html"


@pytest.fixture
def shots(tmp_path) -> Path:
    folder = Path(os.environ.get("FTS_UI_SHOTS") or tmp_path / "shots")
    folder.mkdir(parents=True, exist_ok=True)
    return folder


@pytest.mark.browser
def test_the_committed_page_is_built_from_the_ui_sources(tmp_path):
    built = npm_build("build:ui", tmp_path / "ui") / "job.html"
    assert built.read_text() == page(), "fts_mcp/ui/job.html is stale: run `npm run build:ui` and commit it"


class HostServer(http.server.ThreadingHTTPServer):
    """The test host's web server: its page at /, and /mcp relayed to the fts-mcp server with the bearer token, as a
    web host's backend holds the connection (the browser never talks to the MCP server itself)."""

    def __init__(self, page: Path, upstream: int, token: str | None):
        self.page, self.upstream, self.token = page.read_bytes(), upstream, token
        super().__init__(("127.0.0.1", 0), functools.partial(_HostHandler))

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/"


class _HostHandler(http.server.BaseHTTPRequestHandler):
    RELAYED = ("content-type", "accept", "mcp-session-id", "mcp-protocol-version", "last-event-id", "mcp-method",
               "mcp-name")

    def log_message(self, *args) -> None:
        pass

    def do_GET(self) -> None:
        if self.path.startswith("/mcp"):
            self._relay()
            return
        self.send_response(200)
        self.send_header("Content-Type", "text/html; charset=utf-8")
        self.send_header("Content-Length", str(len(self.server.page)))
        self.end_headers()
        self.wfile.write(self.server.page)

    do_POST = do_DELETE = lambda self: self._relay()  # noqa: E731

    def _relay(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else None
        headers = {k: v for k, v in self.headers.items() if k.lower() in self.RELAYED}
        if self.server.token:
            headers["Authorization"] = f"Bearer {self.server.token}"
        upstream = http.client.HTTPConnection("127.0.0.1", self.server.upstream, timeout=120)
        try:
            upstream.request(self.command, "/mcp", body=body, headers=headers)
            answer = upstream.getresponse()
            self.send_response(answer.status)
            for key, value in answer.getheaders():
                if key.lower() in ("content-type", "mcp-session-id", "cache-control", "www-authenticate"):
                    self.send_header(key, value)
            self.send_header("Connection", "close")
            self.end_headers()
            while chunk := answer.read1(65536):  # server-sent events pass as they come
                self.wfile.write(chunk)
                self.wfile.flush()
        except (OSError, http.client.HTTPException):
            pass
        finally:
            upstream.close()
        self.close_connection = True


@contextmanager
def host_server(page: Path, upstream: int, token: str | None):
    server = HostServer(page, upstream, token)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()


def training(steps: int, **extra) -> dict:
    return {**FAST_TRAINING, "max_steps": steps, "logging_steps": 1, **extra}


def job_args(tiny_model: Path, steps: int, **extra) -> dict:
    return {"base_model": str(tiny_model), "dataset": str(SAMPLE_CHAT), "quantization": "none",
            "output_name": "codewords", "lora": {"r": 8, "dropout": 0.0}, "training": training(steps, **extra)}


def job_record(job_id: str) -> dict:
    """The job as the server sees it (through the core, as any tool reads it)."""
    from fts_mcp.config import Settings
    from fts_mcp.core import Core

    with Core(Settings.from_env()) as core:
        return core.jobs.get(job_id).model_dump(mode="json")


def metric_points(job_id: str) -> int:
    async def read() -> int:
        async with Client(mcp) as client:
            text = (await client.read_resource(f"fts://jobs/{job_id}/metrics")).contents[0].text
        return sum(1 for p in json.loads(text)["points"] if "loss" in p)

    return outside_the_browser_loop(read)


def outside_the_browser_loop(fn, *args):
    """Run an async function to its end in a thread of its own (Playwright's sync API holds this thread's loop)."""
    with ThreadPoolExecutor(1) as pool:
        return pool.submit(anyio.run, fn, *args).result()


def shown_points(frame) -> int:
    return int(frame.locator("svg.chart").get_attribute("data-points") or 0)


def shot(page, folder: Path, name: str) -> Path:
    path = folder / name
    page.screenshot(path=str(path), full_page=True)
    assert path.stat().st_size > 10_000
    return path


@pytest.mark.browser
def test_the_app_in_a_host_follows_a_training_job_and_cancels_it(fts_home, tiny_model, chromium, host_page, shots):
    with fts_server("--token", TOKEN) as port, host_server(host_page, port, TOKEN) as host:
        page = chromium.new_page(viewport={"width": 1000, "height": 900})
        errors: list[str] = []
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.goto(host.url)
        page.wait_for_function("window.host || window.hostError", timeout=30_000)
        assert page.evaluate("window.hostError || null") is None
        # the host's MCP client (TypeScript SDK) saw the extension and each tool's link to the view
        assert page.evaluate("window.host.serverExtensions") == {EXTENSION: {}}
        assert page.evaluate("window.host.toolMeta.job_status") == {"ui": {"resourceUri": VIEW_URI}}

        job = page.evaluate("(args) => window.host.runTool('start_qlora_job', args)", job_args(tiny_model, 3000))
        frame = page.frame_locator("iframe")
        frame.locator("[data-state=running]").wait_for(timeout=120_000)
        wait_for(lambda: shown_points(frame) >= 5, 180, what="five logged steps on the loss curve")
        for stat in ("loss", "learning_rate", "tokens_per_second"):
            assert frame.locator(f"[data-stat={stat}] .value").inner_text() != "–", stat
        assert "micro-batch" in frame.locator(".plan").inner_text().lower()
        shot(page, shots, "app-training.png")

        frame.locator("[data-action=cancel]").click()
        frame.locator("[data-state=cancelled]").wait_for(timeout=120_000)
        record = job_record(job["job_id"])
        assert record["state"] == "cancelled" and record["resumable"]
        wait_for(lambda: shown_points(frame) == metric_points(job["job_id"]), 30, what="the curve to show every point")
        assert frame.locator("[data-action=resume]").is_visible()
        shot(page, shots, "app-cancelled.png")
        relayed = page.evaluate("window.host.relayed")
        page.close()
    calls = [(r["method"], (r["params"] or {}).get("name") or (r["params"] or {}).get("uri")) for r in relayed]
    assert ("tools/call", "job_status") in calls and ("tools/call", "cancel_job") in calls  # through the host
    assert ("resources/read", f"fts://jobs/{job['job_id']}/metrics") in calls
    assert not errors, errors


@pytest.mark.browser
def test_the_app_evaluates_and_deploys_a_finished_job(fts_home, tiny_model, chromium, host_page, shots):
    """A short run with a held-out share: eval loss on the curve; Evaluate starts the comparison with the base and the
    view follows it to base vs adapter side by side; Deploy publishes the adapter. This host is in dark mode."""
    with fts_server() as port, host_server(host_page, port, None) as host:
        page = chromium.new_page(viewport={"width": 1000, "height": 900}, color_scheme="dark")
        page.goto(host.url + "?theme=dark")
        page.wait_for_function("window.host || window.hostError", timeout=30_000)
        job = page.evaluate("(args) => window.host.runTool('start_qlora_job', args)", job_args(
            tiny_model, 24, eval_fraction=0.25, checkpoint_every_steps=6))
        assert job["state"] in ("queued", "running"), job
        frame = page.frame_locator("iframe")
        frame.locator("[data-state=succeeded]").wait_for(timeout=240_000)
        assert frame.locator("html").get_attribute("data-theme") == "dark"  # the host's theme, applied
        assert int(frame.locator("svg.chart").get_attribute("data-eval-points")) >= 3
        shot(page, shots, "app-finished.png")

        frame.locator("[data-action=evaluate]").click()
        frame.locator("[data-testid=eval-table]").wait_for(timeout=240_000)
        assert frame.locator("[data-state=succeeded]").inner_text() == "Succeeded"  # the eval job, followed
        assert frame.locator(".verdict").get_attribute("data-better") in ("true", "false")
        assert frame.locator(".sample").count() >= 1
        shot(page, shots, "app-evaluation.png")

        frame.locator("[data-action=back]").click()
        frame.locator("[data-action=deploy]").wait_for(timeout=30_000)
        frame.locator("[data-field=name]").fill("codewords")
        frame.locator("[data-action=deploy]").click()
        frame.locator(".notice.ok").wait_for(timeout=60_000)
        assert "codewords@v1" in frame.locator(".notice.ok").inner_text()
        page.close()


async def _start_over_http(port: int, args: dict) -> dict:
    async with httpx2.AsyncClient(headers={"Authorization": f"Bearer {TOKEN}"}, timeout=60) as http:
        async with Client(streamable_http_client(f"http://127.0.0.1:{port}/mcp", http_client=http)) as client:
            return (await client.call_tool("start_qlora_job", args)).structured_content


@pytest.mark.browser
def test_the_page_at_ui_lists_jobs_follows_one_and_cancels_it(fts_home, tiny_model, chromium, shots, tmp_path):
    log = tmp_path / "server.log"
    with fts_server("--token", TOKEN, log=log) as port:
        job = outside_the_browser_loop(_start_over_http, port, job_args(tiny_model, 3000))
        context = chromium.new_context(viewport={"width": 1100, "height": 900})
        page = context.new_page()
        errors: list[str] = []
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.goto(f"http://127.0.0.1:{port}/ui#token={TOKEN}")
        row = page.locator(f"tr[data-job={job['job_id']}]")
        row.wait_for(timeout=30_000)
        assert TOKEN not in page.url  # moved into sessionStorage at once
        shot(page, shots, "browser-jobs.png")
        row.click()
        page.locator("[data-state=running]").wait_for(timeout=120_000)
        wait_for(lambda: shown_points(page) >= 5, 180, what="five logged steps on the loss curve")
        assert page.url.endswith(f"#job={job['job_id']}")
        shot(page, shots, "browser-training.png")
        page.locator("[data-action=cancel]").click()
        page.locator("[data-state=cancelled]").wait_for(timeout=120_000)
        assert job_record(job["job_id"])["state"] == "cancelled"
        page.reload()  # the token stays for this tab, the address keeps the job
        page.locator("[data-state=cancelled]").wait_for(timeout=30_000)

        stranger = chromium.new_context().new_page()  # no token: the page asks for it
        stranger.goto(f"http://127.0.0.1:{port}/ui")
        stranger.locator("[data-field=token]").fill(TOKEN)
        stranger.locator("form.token button").click()
        stranger.locator(f"tr[data-job={job['job_id']}]").wait_for(timeout=30_000)
        stranger.context.close()
        context.close()
    assert not errors, errors
    assert TOKEN not in log.read_text()



@pytest.mark.browser
def test_a_preference_job_shows_what_people_watch_and_its_evaluation_on_pairs(fts_home, tiny_model, chromium, shots,
                                                                              tmp_path):
    """A DPO job (method "dpo"): the view shows preference accuracy and reward margin, on the training and held-out
    pairs; Evaluate compares base and adapter on the pairs (how often each prefers the chosen answer)."""
    from tests.test_e2e_preference import codeword_pairs

    args = {"base_model": str(tiny_model), "dataset": str(codeword_pairs(tmp_path)), "method": "dpo",
            "quantization": "none", "lora": {"r": 16, "dropout": 0.0},
            "training": training(24, eval_fraction=0.25, checkpoint_every_steps=8, beta=0.5)}
    with fts_server("--token", TOKEN) as port:
        job = outside_the_browser_loop(_start_over_http, port, args)
        page = chromium.new_context(viewport={"width": 1100, "height": 900}).new_page()
        errors: list[str] = []
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.goto(f"http://127.0.0.1:{port}/ui#token={TOKEN}")
        page.locator(f"tr[data-job={job['job_id']}]").click(timeout=30_000)
        page.locator("[data-state=succeeded]").wait_for(timeout=240_000)
        for stat in ("preference_accuracy", "reward_margin", "eval_preference_accuracy"):
            assert page.locator(f"[data-stat={stat}] .value").inner_text() != "–", stat
        assert page.locator("[data-stat=preference_accuracy] .value").inner_text().endswith("%")
        shot(page, shots, "browser-preference.png")

        page.locator("[data-action=evaluate]").click()
        page.locator("[data-testid=eval-table]").wait_for(timeout=240_000)
        table = page.locator("[data-testid=eval-table]").inner_text()
        assert "Prefers the chosen answer" in table and "Log-likelihood margin" in table, table
        assert page.locator(".sample").count() >= 1 and "favours" in page.locator(".sample").first.inner_text()
        shot(page, shots, "browser-preference-eval.png")
        page.context.close()
    assert not errors, errors
