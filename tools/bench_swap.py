"""Adapter swap latency: loading an adapter into one of the edge runtime's device slots vs. PEFT's own
`load_adapter` and `hotswap_adapter`.

    python tools/bench_swap.py                                  # tiny shape, CPU (default)
    python tools/bench_swap.py --shape llama-3.1-8b --rank 16   # on a GPU

Alternates between adapters (random r-rank, all linear layers, stored in bf16 in a temporary edge store) and
prints p50 / p99 in ms: cold (store -> device: read, sha256 check once, pad, copy) and warm (host cache ->
device), with PEFT's `load_adapter` (from disk, new modules), `set_adapter` (already loaded) and
`hotswap_adapter` (from disk, in place) measured in the same run on the same model.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tools.bench_train import SHAPES, build_model  # noqa: E402


def percentiles(samples: list[float]) -> str:
    ordered = sorted(samples)
    p99 = ordered[min(len(ordered) - 1, round(0.99 * (len(ordered) - 1)))]
    return f"p50 {statistics.median(ordered):8.2f} ms   p99 {p99:8.2f} ms   (n={len(ordered)})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", choices=sorted(SHAPES), default="tiny")
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--adapters", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=25)
    args = parser.parse_args()

    import torch
    from peft import LoraConfig, PeftModel, get_peft_model
    from peft.utils.hotswap import hotswap_adapter
    from transformers import AutoModelForCausalLM

    from fts_mcp.adapters.sources import StoreSource
    from fts_mcp.adapters.store import AdapterStore
    from fts_mcp.edge.engine import Engine

    cuda = torch.cuda.is_available()
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        base = root / "base"
        build_model(base, args.shape)
        store = AdapterStore(root / "store")
        for i in range(args.adapters):
            model = AutoModelForCausalLM.from_pretrained(base, device_map="meta")
            peft = get_peft_model(model, LoraConfig(r=args.rank, lora_alpha=2 * args.rank, target_modules="all-linear"))
            peft.to_empty(device="cpu")
            with torch.no_grad():
                for name, param in peft.named_parameters():
                    if "lora_" in name:
                        param.normal_(0, 0.02)
            peft.save_pretrained(root / f"src{i}")
            store.publish(root / f"src{i}", f"a{i}")
            del model, peft
        names = [f"a{i}" for i in range(args.adapters)]
        folders = [store.root / n / "v1" for n in names]

        engine = Engine(str(base), StoreSource(str(store.root), root / "cache"), max_rank=args.rank,
                        max_cached_bytes=1 << 40)
        def into_slot(name: str, engine: Engine = engine) -> float:
            """ms to bring an adapter into a device slot: from the host cache (warm) or the store (cold)."""
            _, load = engine.resolve(name)
            t = time.perf_counter()
            engine.bank.load(1, load().factors)
            sync()
            return (time.perf_counter() - t) * 1000

        cold, warm = [], []
        for r in range(args.rounds):
            for name in names:
                if r > 0:
                    engine.cache.clear()  # cold: from the store every time
                cold.append(into_slot(name))
        for _ in range(args.rounds):
            for name in names:
                warm.append(into_slot(name))
        del engine

        dtype = torch.bfloat16 if cuda else torch.float32
        model = AutoModelForCausalLM.from_pretrained(base, dtype=dtype, device_map={"": "cuda:0" if cuda else "cpu"})
        peft = PeftModel.from_pretrained(model, folders[0], adapter_name="a0")
        load, select, hot = [], [], []
        for r in range(args.rounds):
            for i, folder in enumerate(folders):
                name = f"r{r}_{i}"
                t = time.perf_counter()
                peft.load_adapter(folder, adapter_name=name)
                peft.set_adapter(name)
                sync()
                load.append((time.perf_counter() - t) * 1000)
                peft.set_adapter("a0")
                peft.delete_adapter(name)
        for i, folder in enumerate(folders[1:], start=1):
            peft.load_adapter(folder, adapter_name=f"a{i}")
        for _ in range(args.rounds):
            for i in range(args.adapters):
                t = time.perf_counter()
                peft.set_adapter(f"a{i}")
                sync()
                select.append((time.perf_counter() - t) * 1000)
        hot_model = PeftModel.from_pretrained(
            AutoModelForCausalLM.from_pretrained(base, dtype=dtype, device_map={"": "cuda:0" if cuda else "cpu"}),
            folders[0])
        for _ in range(args.rounds):
            for folder in folders:
                t = time.perf_counter()
                hotswap_adapter(hot_model, str(folder), adapter_name="default")
                sync()
                hot.append((time.perf_counter() - t) * 1000)

    print(f"shape {args.shape}, r={args.rank}, all linear layers, {args.adapters} adapters alternating, "
          f"{'CUDA' if cuda else 'CPU'}")
    print(f"fts-mcp cold (store -> device)     {percentiles(cold)}")
    print(f"fts-mcp warm (host cache -> device) {percentiles(warm)}")
    print(f"PEFT load_adapter + set_adapter    {percentiles(load)}")
    print(f"PEFT set_adapter (already loaded)  {percentiles(select)}")
    print(f"PEFT hotswap_adapter (from disk)   {percentiles(hot)}")
    print(f"ratio cold / load_adapter {statistics.median(cold) / statistics.median(load):.2f}, "
          f"cold / hotswap_adapter {statistics.median(cold) / statistics.median(hot):.2f}, "
          f"warm / set_adapter {statistics.median(warm) / statistics.median(select):.2f}")


if __name__ == "__main__":
    main()
