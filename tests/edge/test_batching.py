"""Continuous batching across adapters, in process: many requests for different adapters (and the base, and
stacks of adapters) share forward passes, and every answer equals its own PEFT reference (greedy)."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

from fts_mcp.adapters.sources import StoreSource
from fts_mcp.adapters.store import AdapterStore
from fts_mcp.edge.engine import Engine
from fts_mcp.errors import InvalidArgument
from tests.conftest import make_adapter

PROMPTS = ["Code word for apple:", "hi", "a much longer prompt than the others, to pad the batch", "Code word for x:"]
TOKENS = 10


@pytest.fixture(scope="module")
def world(tiny_model, tmp_path_factory):
    root = tmp_path_factory.mktemp("batching")
    store = AdapterStore(root / "store")
    for name, r, seed in (("fa", 4, 1), ("fb", 8, 2), ("fc", 4, 3)):
        store.publish(make_adapter(tiny_model, root / name, r=r, seed=seed), name)
    return root, store


def engine_for(world, tiny_model, **options) -> Engine:
    root, _ = world
    return Engine(str(tiny_model), StoreSource(root / "store", root / "cache"), max_rank=16, **options)


@pytest.fixture(scope="module")
def references(world, tiny_model):
    """Greedy answers of transformers' generate with PEFT: each adapter alone, the base, a plain stack (both
    adapters active at once) and a weighted stack (PEFT's exact 'cat' combination)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from fts_mcp.models.prompts import encode_prompt

    _, store = world
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)

    def answers(model) -> dict[str, str]:
        out = {}
        for prompt in PROMPTS:
            ids = encode_prompt(tokenizer, prompt)
            with torch.no_grad():
                new = model.eval().generate(torch.tensor([ids]), max_new_tokens=TOKENS, do_sample=False,
                                            pad_token_id=tokenizer.pad_token_id)[0][len(ids):]
            out[prompt] = tokenizer.decode(new, skip_special_tokens=True)
        return out

    def base():
        return AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)

    refs = {"base": answers(base())}
    for name in ("fa", "fb", "fc"):
        refs[name] = answers(PeftModel.from_pretrained(base(), store.path(name, "v1")))
    both = PeftModel.from_pretrained(base(), store.path("fa", "v1"), adapter_name="fa")
    both.load_adapter(store.path("fb", "v1"), adapter_name="fb")
    both.base_model.set_adapter(["fa", "fb"])
    refs["fa+fb"] = answers(both)
    weighted = PeftModel.from_pretrained(base(), store.path("fa", "v1"), adapter_name="fa")
    weighted.load_adapter(store.path("fb", "v1"), adapter_name="fb")
    weighted.add_weighted_adapter(["fa", "fb"], [0.7, 0.3], "mix", combination_type="cat")
    weighted.set_adapter("mix")
    refs["0.7*fa+0.3*fb"] = answers(weighted)
    return refs


def test_the_adapters_answer_differently(references):
    answers = {name: tuple(by_prompt.values()) for name, by_prompt in references.items()}
    assert len(set(answers.values())) == len(answers)  # every model below is told apart by its answers


@pytest.mark.parametrize("options", [{"max_loras": 8}, {"max_loras": 1}, {"max_batch": 1}])
def test_concurrent_mixed_requests_each_get_their_own_adapter(world, tiny_model, references, options):
    """All at once, interleaved: adapters, the base and stacks in the same batch. With one device slot the
    requests for other adapters wait for it; with a batch of one they run one at a time; answers never change."""
    engine = engine_for(world, tiny_model, **options)
    asks = [(model, prompt) for prompt in PROMPTS for model in references] * 2
    with ThreadPoolExecutor(len(asks)) as pool:
        answers = list(pool.map(lambda ask: engine.generate(ask[0], prompt=ask[1], max_tokens=TOKENS)["text"], asks))
    wrong = [(model, prompt, got) for (model, prompt), got in zip(asks, answers, strict=True)
             if got != references[model][prompt]]
    assert not wrong
    if options.get("max_batch", 32) > 1:
        assert engine.metrics.batch.collect()[0].samples  # decode steps ran
        sizes = {s.labels.get("le"): s.value for s in engine.metrics.batch.collect()[0].samples
                 if s.name.endswith("_bucket")}
        assert sizes["1.0"] < sizes["+Inf"]  # some steps held several rows: requests really shared passes


def test_stacks_are_refused_with_the_reason(world, tiny_model, tmp_path):
    engine = engine_for(world, tiny_model, max_loras=2)
    with pytest.raises(InvalidArgument, match="not an adapter or weight") as bad:
        engine.generate("2**fa", prompt="hi", max_tokens=2)
    assert bad.value.param == "model"
    with pytest.raises(InvalidArgument, match="between -100 and 100"):
        engine.generate("1e9*fa+fb", prompt="hi", max_tokens=2)
    small = Engine(str(tiny_model), StoreSource(world[0] / "store", world[0] / "cache"), max_rank=8)
    with pytest.raises(InvalidArgument, match="ranks add up to 12"):  # 4 + 8 over --max-rank 8
        small.generate("fa+fb", prompt="hi", max_tokens=2)


def test_an_adapter_for_another_base_is_refused_and_the_others_still_serve(world, tiny_model, tmp_path):
    from tools.build_tiny_model import build

    other = build(tmp_path / "wider", hidden=96)
    _, store = world
    store.publish(make_adapter(other, tmp_path / "alien", r=4, seed=5), "alien")
    engine = engine_for(world, tiny_model)
    with pytest.raises(InvalidArgument, match="trained for another base"):
        engine.generate("fa+alien", prompt="hi", max_tokens=2)
    assert engine.generate("fa", prompt=PROMPTS[0], max_tokens=TOKENS)["text"] is not None


def test_an_alias_move_is_served_without_restart_and_running_requests_finish_on_theirs(world, tiny_model,
                                                                                       references):
    root, store = world
    store.set_alias("fa", "prod", "v1")
    engine = engine_for(world, tiny_model)
    assert engine.generate("fa:prod", prompt=PROMPTS[0], max_tokens=TOKENS)["text"] == references["fa"][PROMPTS[0]]
    started = threading.Event()
    slow = engine.submit("fa:prod", engine.prompt_ids(PROMPTS[0], None, TOKENS), max_tokens=TOKENS)
    started.set()
    fc_version, _ = store.publish(store.path("fc", "v1"), "fa")  # fa@v2 holds fc's weights
    store.set_alias("fa", "prod", fc_version.version)
    assert engine.generate("fa:prod", prompt=PROMPTS[0], max_tokens=TOKENS)["text"] == references["fc"][PROMPTS[0]]
    slow.wait(30)
    assert slow.key == "fa@v1" and engine.outcome(slow)["text"] == references["fa"][PROMPTS[0]]


def test_seeded_sampling_is_reproducible_and_n_choices_differ(world, tiny_model):
    engine = engine_for(world, tiny_model)
    ids = engine.prompt_ids("hi", None, 12)
    first = engine.submit("fa", ids, max_tokens=12, temperature=1.0, seed=7)
    again = engine.submit("fa", ids, max_tokens=12, temperature=1.0, seed=7)
    other = engine.submit("fa", ids, max_tokens=12, temperature=1.0, seed=8)
    for ticket in (first, again, other):
        ticket.wait(30)
    assert engine.outcome(first)["text"] == engine.outcome(again)["text"] != engine.outcome(other)["text"]


def test_slots_and_caches_are_counted(world, tiny_model):
    engine = engine_for(world, tiny_model, max_loras=1)
    for model in ("fa", "fa", "fb", "fa"):
        engine.generate(model, prompt="hi", max_tokens=2)
    assert engine.metrics.slot_loads._value.get() == 3  # fa, fb (evicting fa from the one slot), fa again
    assert engine.metrics.slot_hits._value.get() == 1
    assert engine.metrics.misses._value.get() == 2 and engine.metrics.hits._value.get() == 1  # host cache kept fa
    assert Path(engine.base_name).exists()


def test_an_alias_moved_on_an_http_store_is_served_once_the_index_is_read_again(world, tiny_model, references,
                                                                                  tmp_path):
    from dataclasses import replace
    from functools import partial
    from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer

    from fts_mcp.adapters.sources import FetchLimits

    root, store = world
    store.publish(store.path("fb", "v1"), "moving")  # moving@v1: fb's weights
    store.set_alias("moving", "prod", "v1")
    server = ThreadingHTTPServer(("127.0.0.1", 0), partial(SimpleHTTPRequestHandler, directory=str(store.root)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        engine = Engine(str(tiny_model), StoreSource(f"http://127.0.0.1:{server.server_port}", tmp_path / "cache",
                                                     limits=FetchLimits(index_ttl=600)), max_rank=16)
        ask = lambda: engine.generate("moving:prod", prompt=PROMPTS[0], max_tokens=TOKENS)["text"]  # noqa: E731
        assert ask() == references["fb"][PROMPTS[0]]
        moved, _ = store.publish(store.path("fc", "v1"), "moving")
        store.set_alias("moving", "prod", moved.version)
        assert ask() == references["fb"][PROMPTS[0]]  # the index read a moment ago still holds
        engine.source.limits = replace(engine.source.limits, index_ttl=0.0)  # ... until it is older than the TTL
        assert ask() == references["fc"][PROMPTS[0]]
    finally:
        server.shutdown()
        server.server_close()


def test_reloading_a_name_while_it_serves_never_mixes_the_two_adapters(world, tiny_model, references):
    """vLLM's load_lora_adapter under a name already in use: running requests finish on the old weights, new
    ones get the new weights, even though the old adapter still holds its device slot."""
    engine = engine_for(world, tiny_model, max_loras=2)
    engine.load_named("mine", "fa@v1")
    ids = engine.prompt_ids(PROMPTS[0], None, 200)
    running = engine.submit("mine", ids, max_tokens=200, ignore_eos=True)  # long enough to outlive the reload
    wait_until_started = time.monotonic() + 10
    while not running.tokens and time.monotonic() < wait_until_started:
        time.sleep(0.01)
    engine.load_named("mine", "fb@v1")
    assert engine.generate("mine", prompt=PROMPTS[0], max_tokens=TOKENS)["text"] == references["fb"][PROMPTS[0]]
    running.wait(60)
    old = engine.text_of(running.tokens[:TOKENS])
    assert not running.done or running.finish_reason == "length"
    assert references["fa"][PROMPTS[0]].startswith(old) or old.startswith(references["fa"][PROMPTS[0]])


def test_stacks_count_in_metrics_under_their_members_whatever_the_weights():
    from fts_mcp.edge.engine import metric_label

    labels = {metric_label(f"{w:g}*fa@v1+{1 - w:g}*fb@v2") for w in (0.1, 0.25, 0.7, 0.123)}
    assert labels == {"fa@v1+fb@v2"}  # a client varying weights cannot grow the series without bound
    assert metric_label("fa@v1") == "fa@v1" and metric_label("named#3") == "named#3"
