"""The edge runtime in a subprocess: two adapters trained to answer differently, served from one base model.

Every answer is compared with a PeftModel reference (the same base and stored adapter, greedy) computed here.
"""

import hashlib
import json
import os
import subprocess
import sys
import threading
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import SimpleNamespace

import pytest

from fts_mcp.config import Settings
from fts_mcp.core import Core
from fts_mcp.training.spec import LoraSpec, TrainingSpec
from tests.conftest import FAST_TRAINING, SAMPLE_COMPLETION, make_adapter, wait_for, write_jsonl
from tests.test_transports import free_port

pytestmark = pytest.mark.slow
PROMPTS = ["Code word for apple:", "Code word for river:", "Code word for tiger:", "Code word for bridge:"]


def post(url: str, body: dict) -> tuple[int, dict | str]:
    request = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            raw = response.read().decode()
            return response.status, json.loads(raw) if raw.startswith("{") else raw
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read().decode())


def get(url: str) -> str:
    with urllib.request.urlopen(url, timeout=30) as response:
        return response.read().decode()


def reference(base: Path, adapter: Path | None, prompt: str, max_tokens: int = 12) -> str:
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from fts_mcp.models.prompts import encode_prompt

    tokenizer = AutoTokenizer.from_pretrained(base)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    if adapter is not None:
        model = PeftModel.from_pretrained(model, adapter)
    ids = encode_prompt(tokenizer, prompt)
    with torch.no_grad():
        out = model.eval().generate(torch.tensor([ids]), max_new_tokens=max_tokens, do_sample=False,
                                    pad_token_id=tokenizer.pad_token_id)
    new = out[0][len(ids):].tolist()
    eos = tokenizer.eos_token_id
    return tokenizer.decode(new[: new.index(eos)] if eos in new else new, skip_special_tokens=True)


@pytest.fixture(scope="module")
def edge(tmp_path_factory, tiny_model):
    root = tmp_path_factory.mktemp("edge")
    home = root / "home"
    with pytest.MonkeyPatch.context() as env:
        roots = [str(root), str(tiny_model.parent), str(SAMPLE_COMPLETION.parent)]
        # The store lives outside FTS_HOME (FTS_STORE): deploy publishes there and the runtime, started without
        # --store, serves from there, as every command does.
        for key, value in {"FTS_HOME": str(home), "FTS_ROOTS": os.pathsep.join(roots), "FTS_GPUS": "none",
                           "FTS_STORE": str(root / "shared-store"), "HF_HUB_OFFLINE": "1",
                           "FTS_CPU_SLOTS": "2"}.items():  # the two training jobs start side by side
            env.setenv(key, value)
        service = Core(Settings.from_env())
        records = [json.loads(line) for line in SAMPLE_COMPLETION.read_text().splitlines()]
        backward = write_jsonl(root / "backward.jsonl", [{"prompt": r["prompt"], "completion": r["completion"][::-1]}
                                                         for r in records])
        training = TrainingSpec(**{**FAST_TRAINING, "max_steps": 60})
        jobs = {name: service.training.start(str(tiny_model), str(data), lora=LoraSpec(r=8, dropout=0.0),
                                             quantization="none", training=training, output_name=name)
                for name, data in (("forward", SAMPLE_COMPLETION), ("backward", backward))}
        for job in jobs.values():
            done = wait_for(lambda j=job: (x := service.jobs.get(j.job_id)).state.terminal and x, 180, 0.5)
            assert done.state == "succeeded", done.log_tail
        edge = service.edge
        deployed = {name: edge.deploy(job.job_id, name) for name, job in jobs.items()}
        assert all(Path(d.uri).parent.parent == root / "shared-store" for d in deployed.values())
        port = free_port()
        runtime = subprocess.Popen([sys.executable, "-m", "fts_mcp", "edge", "serve", "--base", str(tiny_model),
                                    "--port", str(port), "--max-rank", "16", "--max-cached", "50MB"],
                                   stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=dict(os.environ))
        url = f"http://127.0.0.1:{port}"

        def healthy():
            if runtime.poll() is not None:
                raise AssertionError(runtime.stderr.read().decode())
            try:
                return get(f"{url}/health")
            except OSError:
                return None

        wait_for(healthy, 90, 0.3, "the edge runtime")
        refs = {name: {p: reference(tiny_model, Path(d.uri), p) for p in PROMPTS} for name, d in deployed.items()}
        refs["base"] = {p: reference(tiny_model, None, p) for p in PROMPTS}
        try:
            yield SimpleNamespace(url=url, home=home, service=service, edge=edge, jobs=jobs, refs=refs,
                                  deployed=deployed, base=tiny_model, root=root)
        finally:
            runtime.terminate()
            runtime.communicate(timeout=30)
            service.close()


def complete(edge, model: str, prompt: str) -> str:
    status, body = post(f"{edge.url}/v1/completions", {"model": model, "prompt": prompt, "max_tokens": 12})
    assert status == 200, body
    return body["choices"][0]["text"]


def test_the_two_adapters_answer_differently(edge):
    assert all(edge.refs["forward"][p] != edge.refs["backward"][p] for p in PROMPTS)


def test_alternating_requests_each_get_their_own_adapter(edge):
    for _ in range(2):
        for model in ("forward", "backward@v1", "base", "backward:latest", "forward"):
            name = model.split("@")[0].split(":")[0]
            for prompt in PROMPTS[:2]:
                assert complete(edge, model, prompt) == edge.refs[name][prompt], (model, prompt)


def test_concurrent_requests_never_get_another_requests_adapter(edge):
    jobs = [(model, prompt) for model in ("forward", "backward", "base") for prompt in PROMPTS] * 2
    with ThreadPoolExecutor(max_workers=8) as pool:
        answers = list(pool.map(lambda mp: complete(edge, *mp), jobs))
    for (model, prompt), answer in zip(jobs, answers, strict=True):
        assert answer == edge.refs[model][prompt], (model, prompt)


def test_chat_models_and_unknown_model(edge):
    status, body = post(f"{edge.url}/v1/chat/completions", {"model": "forward", "max_tokens": 8,
                                                            "messages": [{"role": "user", "content": "hi"}]})
    assert status == 200 and body["choices"][0]["message"]["role"] == "assistant"
    listed = {m["id"] for m in json.loads(get(f"{edge.url}/v1/models"))["data"]}
    assert {"forward", "forward@v1", "backward:latest", str(edge.base)} <= listed
    status, body = post(f"{edge.url}/v1/completions", {"model": "sideways", "prompt": "x"})
    assert status == 404 and "forward" in body["error"]["message"] and body["error"]["param"] == "model"


def test_vllm_style_load_and_unload(edge):
    folder = Path(edge.deployed["backward"].uri)
    status, text = post(f"{edge.url}/v1/load_lora_adapter", {"lora_name": "mirror", "lora_path": str(folder)})
    assert status == 200 and "added successfully" in text
    assert complete(edge, "mirror", PROMPTS[0]) == edge.refs["backward"][PROMPTS[0]]
    status, _ = post(f"{edge.url}/v1/unload_lora_adapter", {"lora_name": "mirror"})
    assert status == 200
    assert post(f"{edge.url}/v1/completions", {"model": "mirror", "prompt": "x"})[0] == 404


def test_corrupt_adapter_is_refused_and_serving_continues(edge):
    folder = make_adapter(edge.base, edge.root / "fragile-src", r=4, seed=9)
    manifest, _ = edge.edge.store.publish(folder, "fragile")
    weights = edge.edge.store.root / "fragile" / manifest.version / "adapter_model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    status, body = post(f"{edge.url}/v1/completions", {"model": "fragile", "prompt": "x"})
    assert status == 502 and "sha256" in body["error"]["message"]
    assert complete(edge, "forward", PROMPTS[1]) == edge.refs["forward"][PROMPTS[1]]


def metric_values(edge) -> dict[tuple[str, tuple], float]:
    from prometheus_client.parser import text_string_to_metric_families

    return {(sample.name, tuple(sorted(sample.labels.items()))): sample.value
            for family in text_string_to_metric_families(get(f"{edge.url}/metrics")) for sample in family.samples}


def test_metrics_count_what_was_served_and_never_go_down(edge):
    before = metric_values(edge)
    for model in ("forward", "backward", "forward"):  # alternating: both stay in device slots
        complete(edge, model, PROMPTS[0])
    after = metric_values(edge)

    def delta(name, **labels):
        key = (name, tuple(sorted(labels.items())))
        return after.get(key, 0) - before.get(key, 0)

    assert delta("fts_edge_requests_total", adapter="forward@v1") == 2
    assert delta("fts_edge_requests_total", adapter="backward@v1") == 1
    assert delta("fts_edge_completion_tokens_total", adapter="forward@v1") > 0
    # each request found its adapter in a slot, or copied it into one (from the host cache, or the store first)
    assert delta("fts_edge_slot_hits_total") + delta("fts_edge_slot_loads_total") == 3
    assert delta("fts_edge_slot_hits_total") >= 1  # the second "forward" at least: it was never evicted
    assert delta("fts_edge_swap_seconds_count") == delta("fts_edge_slot_loads_total")
    assert delta("fts_edge_cache_hits_total") + delta("fts_edge_cache_misses_total") == \
        delta("fts_edge_slot_loads_total")
    assert after[("fts_edge_cached_adapters", ())] >= 2
    assert delta("fts_edge_batch_size_count") > 0 and delta("fts_edge_time_to_first_token_seconds_count") == 3
    counters = [k for k in before if k[0].endswith(("_total", "_count", "_sum", "_bucket"))]
    assert counters and all(after[k] >= before[k] for k in counters)  # Prometheus reads a drop as a reset


def test_dns_rebinding_is_refused_like_the_mcp_transport(edge):
    import httpx

    body = {"model": "forward", "prompt": PROMPTS[0], "max_tokens": 2}
    assert httpx.post(f"{edge.url}/v1/completions", json=body, headers={"Host": "evil.example"}).status_code == 421
    assert httpx.post(f"{edge.url}/v1/completions", json=body,
                      headers={"Origin": "http://evil.example"}).status_code == 403
    assert httpx.post(f"{edge.url}/v1/load_lora_adapter", json={"lora_name": "x", "lora_path": "forward"},
                      headers={"Origin": "http://evil.example"}).status_code == 403
    assert httpx.post(f"{edge.url}/v1/completions", json=body).status_code == 200


def test_load_lora_adapter_reads_only_the_store_and_the_roots(edge, tmp_path_factory):
    outside = make_adapter(edge.base, tmp_path_factory.mktemp("outside") / "adapter", r=4, seed=11)
    for path in (str(outside), "/etc", "../../etc/passwd", "Bad Name!"):
        status, body = post(f"{edge.url}/v1/load_lora_adapter", {"lora_name": "x", "lora_path": path})
        assert status == 400 and body["error"]["param"] == "lora_path", (path, body)
    assert post(f"{edge.url}/v1/completions", {"model": "x", "prompt": "x"})[0] == 404


def test_store_served_over_http(edge):
    """Any static HTTP server can be the store: files are fetched, sha256-checked and cached."""
    from fts_mcp.adapters.sources import StoreSource
    from fts_mcp.edge.engine import Engine

    class Quiet(SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), partial(Quiet, directory=str(edge.edge.store.root)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        source = StoreSource(f"http://127.0.0.1:{server.server_address[1]}", edge.root / "http-cache")
        engine = Engine(str(edge.base), source, max_rank=16)
        answer = engine.generate("backward", prompt=PROMPTS[2], max_tokens=12)["text"]
        assert answer == edge.refs["backward"][PROMPTS[2]]
        assert (edge.root / "http-cache" / "backward" / "v1" / "adapter_model.safetensors").is_file()
    finally:
        server.shutdown()
        server.server_close()


@pytest.mark.anyio
async def test_deploy_and_generate_through_mcp(edge):
    from mcp import Client

    from fts_mcp.server import mcp

    async with Client(mcp) as client:
        deployed = await client.call_tool("deploy_adapter", {"adapter": edge.jobs["forward"].job_id, "name": "fwd",
                                                             "alias": "prod", "runtime_url": edge.url})
        assert not deployed.is_error, deployed.content[0].text
        d = deployed.structured_content
        assert d["model"] == "fwd:prod" and d["version"] == "v1"  # the alias asked for, echoed: it follows the alias
        assert d["loaded"] and d["swap_ms"] >= 0 and d["created"]
        stored = Path(d["uri"]) / "adapter_model.safetensors"
        assert d["sha256"] == hashlib.sha256(stored.read_bytes()).hexdigest() and "curl" in d["curl"]
        assert d["base_model"] and d["next"][0]["tool"] == "generate"
        via_runtime = (await client.call_tool("generate", {"model": "fwd@v1", "prompt": PROMPTS[3],
                                                           "max_tokens": 12, "runtime_url": edge.url}))
        assert via_runtime.structured_content["text"] == edge.refs["forward"][PROMPTS[3]]
        one_shot = (await client.call_tool("generate", {"model": "fwd:prod", "prompt": PROMPTS[3], "max_tokens": 12}))
        assert not one_shot.is_error, one_shot.content[0].text
        assert one_shot.structured_content["text"] == edge.refs["forward"][PROMPTS[3]]
        assert one_shot.structured_content["via"] == "job"
        listed = (await client.call_tool("list_adapters", {})).structured_content["adapters"]
        assert {"forward", "backward", "fwd"} <= {a["name"] for a in listed}
        bad = await client.call_tool("deploy_adapter", {"adapter": edge.jobs["forward"].job_id, "name": "fwd",
                                                        "version": "v1", "runtime_url": "ftp://x"})
        assert bad.is_error and "runtime_url" in bad.content[0].text


def test_merge_takes_a_store_reference(edge):
    job = edge.service.merging.merge("forward@v1", dtype="float32", output_name="forward-merged")
    done = wait_for(lambda: (j := edge.service.jobs.get(job.job_id)).state.terminal and j, 120, 0.3)
    assert done.state == "succeeded", (done.error, done.log_tail)
    assert done.artifacts.verification.passed
    assert done.spec["adapters"][0]["trained_quantization"] == "none"  # found through the manifest's source job


def test_an_adapter_trained_on_another_base_is_served_with_a_warning(edge, tmp_path):
    """The runtime serves the 16-bit base; an adapter recorded as trained on the NF4 base is answered, and both
    /v1/models and the answer say its answers may differ from its evaluation. Adapters trained on this base, and
    the base itself, carry no warning."""
    import shutil

    from fts_mcp.models.base import TrainingBase, read_training_base, write_training_base

    assert read_training_base(Path(edge.deployed["forward"].uri)).quantization == "none"  # recorded by training
    folder = tmp_path / "qlora"
    shutil.copytree(edge.deployed["forward"].uri, folder)
    write_training_base(folder, TrainingBase(quantization="nf4", compute_dtype="float32"))
    edge.service.edge.store.publish(folder, "forward-qlora")
    cards = {m["id"]: m for m in json.loads(get(f"{edge.url}/v1/models"))["data"]}
    assert "NF4" in cards["forward-qlora"]["warning"] and "--quantize nf4" in cards["forward-qlora"]["warning"]
    assert "warning" not in cards["forward"] and not any("warning" in cards[m] for m in cards if "qlora" not in m)
    status, body = post(f"{edge.url}/v1/completions", {"model": "forward-qlora", "prompt": PROMPTS[0],
                                                        "max_tokens": 12})
    assert status == 200 and "NF4" in body["fts"]["warning"]
    assert body["choices"][0]["text"] == edge.refs["forward"][PROMPTS[0]]  # served all the same
    status, body = post(f"{edge.url}/v1/completions", {"model": "forward", "prompt": PROMPTS[0], "max_tokens": 12})
    assert "warning" not in body["fts"]
