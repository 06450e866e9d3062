"""Serving many adapters at once: the edge runtime's continuous batching vs. one request at a time vs. a plain PEFT
loop, in one run.

    python tools/bench_serve.py                                  # tiny shape, CPU: 8 clients over 4 adapters
    python tools/bench_serve.py --shape llama-3.1-8b --tokens 128  # on a GPU: random weights of the real shape

Concurrent clients (default 8) each send `--requests` completions one after another, spread over several adapters
(default 4) with every fifth request for the base model; fixed prompts, and exactly `--tokens` new tokens each
(end of text ignored, so every variant does the same work). Variants, each on the same base and adapters and
each in its own process (two engines in one process share its CPU thread pools and slow each other down):

* runtime: the engine as `fts-mcp edge serve` runs it (device slots, continuous batching);
* base only: the same engine with every request for the base model (what adapters cost on top of it);
* one at a time: the same engine with `max_batch=1` (the runtime before batching);
* PEFT loop: a PeftModel with every adapter loaded; one worker takes requests in arrival order and runs
  `set_adapter` + `generate` for each.

Prints requests/s, output tokens/s, p50/p99 time to first token and latency, and the runtime's ratios. Figures,
not assertions.
"""

from __future__ import annotations

import argparse
import json
import queue
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tools.bench_train import SHAPES, build_model  # noqa: E402

PROMPTS = ["Code word for apple:", "Translate to French: good morning", "Summarise: the cat sat on the mat.",
           "Q: what is two plus two?\nA:"]


def make_adapters(base: Path, root: Path, count: int, rank: int) -> list[Path]:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    folders = []
    for i in range(count):
        torch.manual_seed(i + 1)
        model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
        peft = get_peft_model(model, LoraConfig(r=rank, lora_alpha=2 * rank, target_modules="all-linear",
                                                lora_dropout=0.0, task_type="CAUSAL_LM"))
        with torch.no_grad():
            for name, param in peft.named_parameters():
                if "lora_B" in name:
                    param.normal_(0, 0.02)
        folder = root / f"adapter{i}"
        peft.save_pretrained(folder)
        folders.append(folder)
        del model, peft
    return folders


def plan(args: argparse.Namespace, base_only: bool = False) -> list[list[tuple[str, str]]]:
    """Per client, its requests: (model, prompt). Every fifth request goes to the base (all of them: base_only)."""
    out = []
    for client in range(args.clients):
        asks = []
        for i in range(args.requests):
            n = client * args.requests + i
            model = "base" if base_only or n % 5 == 4 else f"adapter{n % args.adapters}"
            asks.append((model, PROMPTS[n % len(PROMPTS)]))
        out.append(asks)
    return out


def drive(asks: list[list[tuple[str, str]]], one) -> dict:
    """Run every client on its own thread; `one(model, prompt)` returns (ttft, latency, tokens)."""
    results: list[tuple[float, float, int]] = []
    lock = threading.Lock()

    def client(mine):
        for model, prompt in mine:
            outcome = one(model, prompt)
            with lock:
                results.append(outcome)

    started = time.perf_counter()
    threads = [threading.Thread(target=client, args=(mine,)) for mine in asks]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - started
    ttft, latency, tokens = zip(*results, strict=True)
    return {"requests_per_second": len(results) / wall, "tokens_per_second": sum(tokens) / wall,
            "ttft_p50": statistics.median(ttft), "ttft_p99": quantile(ttft, 0.99),
            "latency_p50": statistics.median(latency), "latency_p99": quantile(latency, 0.99)}


def quantile(values, q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def run_engine(base: Path, store_root: Path, args: argparse.Namespace, max_batch: int,
               base_only: bool = False) -> dict:
    from fts_mcp.adapters.sources import StoreSource
    from fts_mcp.edge.engine import Engine

    engine = Engine(str(base), StoreSource(store_root / "store", store_root / "cache"), max_rank=args.rank,
                    max_loras=args.adapters, max_batch=max_batch)
    try:
        return drive_engine(engine, args, base_only)
    finally:
        engine.close()


def drive_engine(engine, args: argparse.Namespace, base_only: bool) -> dict:

    def one(model: str, prompt: str) -> tuple[float, float, int]:
        ids = engine.prompt_ids(prompt, None, args.tokens)
        ticket = engine.submit(model, ids, max_tokens=args.tokens, ignore_eos=True)
        ticket.wait()
        tokens = engine.outcome(ticket)["usage"]["completion_tokens"]  # raises what the request hit
        return ticket.first_token_at - ticket.arrived, time.monotonic() - ticket.arrived, tokens

    for i in range(args.adapters):  # warm: every adapter read once and the kernels run
        engine.generate(f"adapter{i}", prompt="hi", max_tokens=2)
    return drive(plan(args, base_only), one)


def run_peft(base: Path, adapters: list[Path], args: argparse.Namespace) -> dict:
    import torch
    from peft import PeftModel
    from transformers import AutoTokenizer, LogitsProcessor, LogitsProcessorList

    from fts_mcp.models.loading import compute_dtype, load_model
    from fts_mcp.models.prompts import encode_prompt

    tokenizer = AutoTokenizer.from_pretrained(base)
    model = load_model(str(base), trust_remote_code=False, dtype=compute_dtype())
    model = PeftModel.from_pretrained(model, adapters[0], adapter_name="adapter0")
    for i, folder in enumerate(adapters[1:], start=1):
        model.load_adapter(folder, adapter_name=f"adapter{i}")
    model.eval()
    work: queue.Queue = queue.Queue()

    class FirstToken(LogitsProcessor):
        def __init__(self) -> None:
            self.at = None

        def __call__(self, input_ids, scores):
            self.at = self.at or time.monotonic()
            return scores

    def worker():
        while True:
            model_name, prompt, arrived, done = work.get()
            ids = torch.tensor([encode_prompt(tokenizer, prompt)], device=model.device)
            first = FirstToken()
            with torch.no_grad():
                if model_name == "base":
                    with model.disable_adapter():
                        out = model.generate(input_ids=ids, max_new_tokens=args.tokens, min_new_tokens=args.tokens,
                                             do_sample=False, pad_token_id=tokenizer.pad_token_id,
                                             logits_processor=LogitsProcessorList([first]))
                else:
                    model.set_adapter(model_name)
                    out = model.generate(input_ids=ids, max_new_tokens=args.tokens, min_new_tokens=args.tokens,
                                         do_sample=False, pad_token_id=tokenizer.pad_token_id,
                                         logits_processor=LogitsProcessorList([first]))
            done.put((first.at - arrived, time.monotonic() - arrived, out.shape[1] - ids.shape[1]))

    threading.Thread(target=worker, daemon=True).start()

    def one(model_name: str, prompt: str) -> tuple[float, float, int]:
        done: queue.Queue = queue.Queue()
        work.put((model_name, prompt, time.monotonic(), done))
        return done.get()

    one("adapter0", "hi")
    return drive(plan(args), one)


VARIANTS = ("runtime", "base only", "one at a time", "PEFT loop")


def run_variant(name: str, root: Path, args: argparse.Namespace) -> dict:
    base = root / args.shape
    if name == "PEFT loop":
        return run_peft(base, [root / f"adapter{i}" for i in range(args.adapters)], args)
    return run_engine(base, root, args, max_batch=1 if name == "one at a time" else args.clients * 2,
                      base_only=name == "base only")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", choices=sorted(SHAPES), default="tiny")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--adapters", type=int, default=4)
    parser.add_argument("--requests", type=int, default=8, help="requests per client")
    parser.add_argument("--tokens", type=int, default=64, help="new tokens per request")
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--variant", choices=VARIANTS, help=argparse.SUPPRESS)
    parser.add_argument("--root", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.variant:  # one variant in this process: engines and thread pools never share a process
        print(json.dumps(run_variant(args.variant, args.root, args)))
        return

    from fts_mcp.adapters.store import AdapterStore

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        base = root / args.shape
        build_model(base, args.shape)
        adapters = make_adapters(base, root, args.adapters, args.rank)
        store = AdapterStore(root / "store")
        for i, folder in enumerate(adapters):
            store.publish(folder, f"adapter{i}", dtype="float32")
        results = {}
        for name in VARIANTS:
            cmd = [sys.executable, __file__, "--variant", name, "--root", str(root), "--shape", args.shape,
                   "--clients", str(args.clients), "--adapters", str(args.adapters), "--requests",
                   str(args.requests), "--tokens", str(args.tokens), "--rank", str(args.rank)]
            out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
            results[name] = json.loads(out.strip().splitlines()[-1])
    print(f"shape {args.shape}: {args.clients} clients x {args.requests} requests over {args.adapters} adapters + "
          f"base, {args.tokens} new tokens each, rank {args.rank}; each variant in its own process")
    print(f"{'variant':<15}{'req/s':>8}{'tokens/s':>10}{'TTFT p50':>10}{'p99':>8}{'latency p50':>13}{'p99':>8}")
    for name, r in results.items():
        print(f"{name:<15}{r['requests_per_second']:>8.2f}{r['tokens_per_second']:>10.1f}{r['ttft_p50']:>9.3f}s"
              f"{r['ttft_p99']:>7.3f}s{r['latency_p50']:>12.3f}s{r['latency_p99']:>7.3f}s")
    batched = results["runtime"]["tokens_per_second"]
    print(f"runtime tokens/s vs one at a time: {batched / results['one at a time']['tokens_per_second']:.2f}x, "
          f"vs PEFT loop: {batched / results['PEFT loop']['tokens_per_second']:.2f}x, "
          f"vs the base model alone: {batched / results['base only']['tokens_per_second']:.2f}x")


if __name__ == "__main__":
    main()
