"""Training throughput and peak memory: fts-mcp's training path vs. a plain transformers + PEFT + bitsandbytes loop.

    python tools/bench_train.py                                           # tiny shape, CPU: both length mixes
    python tools/bench_train.py --shape llama-3.1-8b --lengths realistic  # on a GPU: random weights, real shape
    python tools/bench_train.py --workers 2                               # data parallel: scaling vs 1 worker
    python tools/bench_train.py --shape smollm2-135m [--data task.jsonl]  # the real model, a real task (CPU ok)

Both variants train the same random-weight model (QLoRA: NF4, double quant, r=16, alpha 32, all linear layers,
AdamW) on the same random tokens, each in its own process so peak memory is not shared, for two length mixes:

* fixed: every example is `--seq` tokens (no padding anywhere);
* realistic: lognormal lengths with median `--median` and a long tail, cut at `--seq`, as instruction data has.

The plain loop is the common recipe: examples shuffled, each micro-batch padded to its longest example, gradient
checkpointing on, the model's own cross-entropy. fts-mcp runs its training path with its defaults (padding-free
batches, checkpointing from the memory estimate, chunked loss), at the same micro-batch. Prints *useful* tokens/s
(non-padding tokens trained per second), the share of computed tokens that are padding, peak memory, and the
ratios. With `--workers N` it instead runs fts-mcp's path with 1 and with N data-parallel ranks (gloo on the CPU,
one GPU each otherwise; each rank holds `--batch` examples) and prints tokens/s and the scaling efficiency
(tokens/s with N / (N x tokens/s with 1)). Figures, not assertions.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SHAPES = {  # hidden, layers, heads, kv heads, intermediate, vocab
    "tiny": (64, 2, 4, 4, 128, 384),
    "llama-3.2-1b": (2048, 16, 32, 8, 8192, 128_256),
    "llama-3.1-8b": (4096, 32, 32, 8, 14_336, 128_256),
}
LENGTHS = ("fixed", "realistic")
REAL = "smollm2-135m"  # SmolLM2-135M-Instruct from the package index, trained on a real task


def build_model(folder: Path, shape: str) -> None:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    hidden, layers, heads, kv, inter, vocab = SHAPES[shape]
    config = LlamaConfig(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                         num_key_value_heads=kv, intermediate_size=inter, vocab_size=vocab,
                         max_position_embeddings=8192, tie_word_embeddings=shape == "tiny", pad_token_id=0,
                         eos_token_id=1, bos_token_id=None)
    dtype = torch.bfloat16 if torch.cuda.is_available() else torch.float32
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        model = LlamaForCausalLM(config).to(dtype)
    model.save_pretrained(folder)
    from transformers import ByT5Tokenizer

    ByT5Tokenizer().save_pretrained(folder)


def lengths(kind: str, count: int, seq: int, median: int, seed: int = 0) -> list[int]:
    """Example lengths: all `seq`, or lognormal (sigma 1: a long tail) around `median`, cut to [16, seq]."""
    if kind == "fixed":
        return [seq] * count
    rng = random.Random(seed)
    return [max(16, min(seq, round(rng.lognormvariate(math.log(median), 1.0)))) for _ in range(count)]


def random_rows(vocab: int, sizes: list[int], seed: int = 0) -> list[dict]:
    import torch

    g = torch.Generator().manual_seed(seed)
    return [{"input_ids": torch.randint(3, vocab, (n,), generator=g).tolist(), "completion_mask": [1] * n}
            for n in sizes]


def peak_memory_bytes() -> int:
    import torch

    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated()
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def dataset_rows(args: argparse.Namespace) -> list[dict]:
    sizes = lengths(args.lengths, args.steps * args.batch, args.seq, args.median)
    return random_rows(SHAPES[args.shape][5], sizes)


class TokenCount:
    """Wraps a collator: counts computed (row) tokens and useful (non-padding) tokens of every batch."""

    def __init__(self, collate) -> None:
        self.collate, self.computed, self.useful = collate, 0, 0

    def __call__(self, examples):
        batch = self.collate(examples)
        self.computed += batch["input_ids"].numel()
        self.useful += sum(len(e["input_ids"]) for e in examples)
        return batch


def run_project(folder: Path, args: argparse.Namespace) -> dict:
    from datasets import Dataset

    from fts_mcp.models.loading import compute_dtype, load_model, load_tokenizer
    from fts_mcp.training.recipe import make_trainer
    from fts_mcp.training.spec import LoraSpec, TrainingSpec, TrainJobSpec
    from fts_mcp.training.speed import plan

    checkpointing = {"auto": "auto", "on": True, "off": False}[args.checkpointing]
    spec = TrainJobSpec(base_model=str(folder), dataset="-", dataset_format="text", dataset_examples=0,
                        output_name="bench", lora=LoraSpec(r=16, alpha=32, dropout=0.0), quantization="nf4",
                        training=TrainingSpec(max_steps=args.steps, micro_batch_size=args.batch,
                                              gradient_accumulation_steps=1, max_seq_len=args.seq,
                                              learning_rate=1e-4, warmup_ratio=0, logging_steps=args.steps,
                                              checkpoint_every_steps=10**6, gradient_checkpointing=checkpointing))
    dtype = compute_dtype()
    tokenizer = load_tokenizer(spec.base_model, trust_remote_code=False)
    model = load_model(spec.base_model, trust_remote_code=False, quantization="nf4", dtype=dtype)
    speed = plan(spec, model, budget_gb=args.budget_gb)
    data = Dataset.from_list(dataset_rows(args))
    with tempfile.TemporaryDirectory() as checkpoints:
        trainer = make_trainer(spec, speed, model, tokenizer, data, None, Path(checkpoints), dtype, callbacks=[])
        trainer.data_collator = counter = TokenCount(trainer.data_collator)
        timer = StepTimer(args.warmup)
        trainer.add_callback(timer)
        trainer.train()
    return {"useful_tokens_per_second": timer.tokens_per_second(), "peak_bytes": peak_memory_bytes(),
            "padding_share": 1 - counter.useful / counter.computed, "plan": speed.summary()}


class StepTimer:
    """Times optimizer steps after `warmup` steps, counting the useful tokens trained in them (a TrainerCallback
    reading the trainer's token count; the baseline loop passes its own)."""

    def __init__(self, warmup: int) -> None:
        self.warmup, self.steps, self.start, self.tokens = warmup, 0, None, 0

    def on_step_end(self, args=None, state=None, control=None, *, tokens: int | None = None, **kwargs) -> None:
        from fts_mcp.training.recipe import all_ranks

        self.steps += 1
        seen = all_ranks(state.num_input_tokens_seen, args) if state is not None else self.tokens + (tokens or 0)
        if self.steps == self.warmup:
            self.start, self.at_start = time.perf_counter(), seen
        self.tokens = seen
        self.end = time.perf_counter()

    def tokens_per_second(self) -> float:
        return (self.tokens - self.at_start) / (self.end - self.start)

    def __getattr__(self, name):  # every other TrainerCallback event is a no-op
        if name.startswith("on_"):
            return lambda *a, **k: None
        raise AttributeError(name)


def run_baseline(folder: Path, args: argparse.Namespace) -> dict:
    """The plain loop: from_pretrained(4-bit) -> prepare_model_for_kbit_training -> get_peft_model -> AdamW, over
    shuffled examples, each micro-batch padded to its longest."""
    import torch
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    cuda = torch.cuda.is_available()
    dtype = torch.bfloat16 if cuda else torch.float32
    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                               bnb_4bit_compute_dtype=dtype, bnb_4bit_quant_storage=dtype)
    model = AutoModelForCausalLM.from_pretrained(folder, quantization_config=quant, dtype=dtype,
                                                 device_map={"": "cuda:0" if cuda else "cpu"})
    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=True,
                                            gradient_checkpointing_kwargs={"use_reentrant": False})
    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear",
                                             task_type="CAUSAL_LM"))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    rows = dataset_rows(args)
    random.Random(42).shuffle(rows)
    timer = StepTimer(args.warmup)
    computed = useful = 0
    model.train()
    for step in range(args.steps):
        examples = [r["input_ids"] for r in rows[step * args.batch:(step + 1) * args.batch]]
        longest = max(map(len, examples))
        ids = torch.tensor([e + [0] * (longest - len(e)) for e in examples], device=model.device)
        mask = torch.tensor([[1] * len(e) + [0] * (longest - len(e)) for e in examples], device=model.device)
        with torch.autocast("cuda", dtype=dtype, enabled=cuda):
            loss = model(input_ids=ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100)).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if cuda:
            torch.cuda.synchronize()
        tokens = sum(map(len, examples))
        computed, useful = computed + ids.numel(), useful + tokens
        timer.on_step_end(tokens=tokens)
    return {"useful_tokens_per_second": timer.tokens_per_second(), "peak_bytes": peak_memory_bytes(),
            "padding_share": 1 - useful / computed, "plan": "padded micro-batches, checkpointing on, full loss"}


def measure(folder: Path, args: argparse.Namespace, lengths_kind: str) -> dict[str, dict]:
    results = {}
    for variant in ("baseline", "project"):
        cmd = [sys.executable, __file__, "--variant", variant, "--model-dir", str(folder), "--shape", args.shape,
               "--batch", str(args.batch), "--seq", str(args.seq), "--steps", str(args.steps),
               "--warmup", str(args.warmup), "--lengths", lengths_kind, "--median", str(args.median),
               "--checkpointing", args.checkpointing] + (["--budget-gb", str(args.budget_gb)] if args.budget_gb else [])
        out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
        results[variant] = json.loads(out.strip().splitlines()[-1])
    return results


def measure_workers(folder: Path, args: argparse.Namespace, workers: int) -> dict:
    """fts-mcp's path on `workers` ranks (as a `workers: N` job runs them); rank 0's figures."""
    import os
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    import shutil

    gpus = shutil.which("nvidia-smi") is not None
    procs = []
    for rank in range(workers):
        env = {**os.environ, "RANK": str(rank), "LOCAL_RANK": "0" if gpus else str(rank),
               "WORLD_SIZE": str(workers), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
               "OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 1) // workers))}
        if gpus:
            env["CUDA_VISIBLE_DEVICES"] = str(rank)  # one GPU per rank, as a `workers: N` job runs them
        cmd = [sys.executable, __file__, "--variant", "project", "--model-dir", str(folder), "--shape", args.shape,
               "--batch", str(args.batch), "--seq", str(args.seq), "--steps", str(args.steps), "--warmup",
               str(args.warmup), "--lengths", args.lengths if args.lengths != "both" else "realistic",
               "--median", str(args.median), "--checkpointing", args.checkpointing]
        procs.append(subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True))
    outputs = [p.communicate()[0] for p in procs]
    if any(p.returncode for p in procs):
        raise SystemExit(f"a rank failed: exit codes {[p.returncode for p in procs]}")
    return json.loads(outputs[0].strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", choices=[*sorted(SHAPES), REAL], default="tiny",
                        help=f"{REAL}: the real model on a real task (tools/bench_real.py)")
    parser.add_argument("--data", type=Path, help=f"{REAL}: a chat JSONL task (default: the shipped orders task)")
    parser.add_argument("--gguf", type=Path, help=f"{REAL}: another GGUF base file")
    parser.add_argument("--batch", type=int, default=8, help="micro-batch (examples per step), both variants")
    parser.add_argument("--seq", type=int, default=None, help="max sequence length (tiny: 1024; others: 2048)")
    parser.add_argument("--median", type=int, default=None, help="median realistic length (default seq/6)")
    parser.add_argument("--lengths", choices=[*LENGTHS, "both"], default="both")
    parser.add_argument("--checkpointing", choices=["auto", "on", "off"], default="auto",
                        help="fts-mcp's gradient checkpointing (the plain loop always checkpoints)")
    parser.add_argument("--budget-gb", type=float, help="memory fts-mcp's automatic choices may use (default: the "
                        "device's free memory), e.g. the plain loop's peak")
    parser.add_argument("--workers", type=int, default=1, help="N > 1: data-parallel scaling vs 1 worker")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--model-dir", type=Path, help="reuse a folder built by an earlier run")
    parser.add_argument("--variant", choices=["project", "baseline"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.shape == REAL:
        import bench_real  # tools/ is this script's own folder

        bench_real.measure(args.data or bench_real.DEFAULT_DATA, args.gguf)
        return
    args.seq = args.seq or (1024 if args.shape == "tiny" else 2048)
    args.median = args.median or max(16, args.seq // 6)
    if args.variant:
        runner = run_project if args.variant == "project" else run_baseline
        print(json.dumps(runner(args.model_dir, args)))
        return
    kinds = LENGTHS if args.lengths == "both" else (args.lengths,)
    if args.workers > 1:
        with tempfile.TemporaryDirectory() as tmp:
            folder = args.model_dir or Path(tmp) / args.shape
            if not (folder / "config.json").exists():
                build_model(folder, args.shape)
            one, many = measure_workers(folder, args, 1), measure_workers(folder, args, args.workers)
        efficiency = many["useful_tokens_per_second"] / (args.workers * one["useful_tokens_per_second"])
        print(f"shape {args.shape}, {args.batch} examples per rank per step, max length {args.seq} "
              f"({'realistic' if args.lengths == 'both' else args.lengths} lengths), {args.steps} steps")
        print(f"1 worker : {one['useful_tokens_per_second']:>10,.0f} useful tokens/s")
        print(f"{args.workers} workers: {many['useful_tokens_per_second']:>10,.0f} useful tokens/s   "
              f"scaling efficiency {efficiency:.2f} (1.00 = linear)")
        return
    with tempfile.TemporaryDirectory() as tmp:
        folder = args.model_dir or Path(tmp) / args.shape
        if not (folder / "config.json").exists():
            t = time.perf_counter()
            build_model(folder, args.shape)
            print(f"built random {args.shape} weights in {time.perf_counter() - t:.1f}s", file=sys.stderr)
        results = {kind: measure(folder, args, kind) for kind in kinds}
    print(f"shape {args.shape}, micro-batch {args.batch}, max length {args.seq} (realistic: lognormal, median "
          f"{args.median}), {args.steps} steps ({args.warmup} warm-up)")
    print(f"{'lengths':<11}{'variant':<10}{'useful tokens/s':>17}{'padding':>10}{'peak memory':>14}  plan")
    for kind, pair in results.items():
        for name, key in (("baseline", "baseline"), ("fts-mcp", "project")):
            r = pair[key]
            print(f"{kind:<11}{name:<10}{r['useful_tokens_per_second']:>17,.0f}{r['padding_share']:>9.0%}"
                  f"{r['peak_bytes'] / 2**30:>10.2f} GiB  {r['plan']}")
    for kind, pair in results.items():
        base, proj = pair["baseline"], pair["project"]
        speedup = proj["useful_tokens_per_second"] / base["useful_tokens_per_second"]
        print(f"{kind}: fts-mcp/baseline useful tokens/s {speedup:.2f}x, "
              f"peak memory {proj['peak_bytes'] / base['peak_bytes']:.2f}x")


if __name__ == "__main__":
    main()
