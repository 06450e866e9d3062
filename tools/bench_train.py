"""Training throughput and peak memory: fts-mcp's training path vs. a plain transformers + PEFT + bitsandbytes loop.

    python tools/bench_train.py                                   # tiny shape, CPU (default)
    python tools/bench_train.py --shape llama-3.1-8b --batch 4    # on a GPU: random weights of the real shape

Both variants train the same random-weight model (QLoRA: NF4, double quant, r=16, alpha 32, all linear
layers, gradient checkpointing, torch AdamW) on the same random tokens, each in its own process so peak
memory is not shared. Prints tokens/s, peak memory and project/baseline ratios. Figures, not assertions.
"""

from __future__ import annotations

import argparse
import json
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


def random_rows(vocab: int, count: int, seq: int, seed: int = 0) -> list[dict]:
    import torch

    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (count, seq), generator=g)
    return [{"input_ids": row.tolist(), "completion_mask": [1] * seq} for row in ids]


def peak_memory_bytes() -> int:
    import torch

    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated()
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def run_project(folder: Path, args: argparse.Namespace) -> dict:
    from datasets import Dataset

    from fts_mcp.models.loading import compute_dtype, load_model, load_tokenizer
    from fts_mcp.training.recipe import make_trainer
    from fts_mcp.training.spec import LoraSpec, TrainingSpec, TrainJobSpec

    spec = TrainJobSpec(base_model=str(folder), dataset="-", dataset_format="text", dataset_examples=0,
                        output_name="bench", lora=LoraSpec(r=16, alpha=32, dropout=0.0), quantization="nf4",
                        training=TrainingSpec(max_steps=args.steps, micro_batch_size=args.batch,
                                              gradient_accumulation_steps=1, max_seq_len=args.seq,
                                              learning_rate=1e-4, warmup_ratio=0, logging_steps=args.steps,
                                              checkpoint_every_steps=10**6, gradient_checkpointing=True))
    dtype = compute_dtype()
    tokenizer = load_tokenizer(spec.base_model, trust_remote_code=False)
    model = load_model(spec.base_model, trust_remote_code=False, quantization="nf4", dtype=dtype)
    data = Dataset.from_list(random_rows(SHAPES[args.shape][5], args.steps * args.batch, args.seq))
    with tempfile.TemporaryDirectory() as checkpoints:
        trainer = make_trainer(spec, model, tokenizer, data, None, Path(checkpoints), dtype, callbacks=[])
        timer = StepTimer(args.warmup)
        trainer.add_callback(timer)
        trainer.train()
    return {"tokens_per_second": timer.tokens_per_second(args.batch * args.seq), "peak_bytes": peak_memory_bytes()}


class StepTimer:
    """Times optimizer steps after `warmup` steps (a TrainerCallback; also driven by the baseline loop)."""

    def __init__(self, warmup: int) -> None:
        self.warmup, self.steps, self.start = warmup, 0, None

    def on_step_end(self, *args, **kwargs) -> None:
        self.steps += 1
        if self.steps == self.warmup:
            self.start = time.perf_counter()

    def tokens_per_second(self, tokens_per_step: int) -> float:
        return (self.steps - self.warmup) * tokens_per_step / (time.perf_counter() - self.start)

    def __getattr__(self, name):  # every other TrainerCallback event is a no-op
        if name.startswith("on_"):
            return lambda *a, **k: None
        raise AttributeError(name)


def run_baseline(folder: Path, args: argparse.Namespace) -> dict:
    """The plain loop: from_pretrained(4-bit) -> prepare_model_for_kbit_training -> get_peft_model -> AdamW."""
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
    rows = random_rows(SHAPES[args.shape][5], args.steps * args.batch, args.seq)
    timer = StepTimer(args.warmup)
    model.train()
    for step in range(args.steps):
        batch = torch.tensor([r["input_ids"] for r in rows[step * args.batch:(step + 1) * args.batch]],
                             device=model.device)
        with torch.autocast("cuda", dtype=dtype, enabled=cuda):
            loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if cuda:
            torch.cuda.synchronize()
        timer.on_step_end()
    return {"tokens_per_second": timer.tokens_per_second(args.batch * args.seq), "peak_bytes": peak_memory_bytes()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", choices=sorted(SHAPES), default="tiny")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--model-dir", type=Path, help="reuse a folder built by an earlier run")
    parser.add_argument("--variant", choices=["project", "baseline"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.variant:
        runner = run_project if args.variant == "project" else run_baseline
        print(json.dumps(runner(args.model_dir, args)))
        return
    with tempfile.TemporaryDirectory() as tmp:
        folder = args.model_dir or Path(tmp) / args.shape
        if not (folder / "config.json").exists():
            t = time.perf_counter()
            build_model(folder, args.shape)
            print(f"built random {args.shape} weights in {time.perf_counter() - t:.1f}s", file=sys.stderr)
        results = {}
        for variant in ("baseline", "project"):
            cmd = [sys.executable, __file__, "--variant", variant, "--model-dir", str(folder), "--shape", args.shape,
                   "--batch", str(args.batch), "--seq", str(args.seq), "--steps", str(args.steps),
                   "--warmup", str(args.warmup)]
            out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
            results[variant] = json.loads(out.strip().splitlines()[-1])
    base, proj = results["baseline"], results["project"]
    print(f"shape {args.shape}, micro-batch {args.batch}, seq {args.seq}, {args.steps} steps ({args.warmup} warm-up)")
    print(f"{'':<10}{'tokens/s':>12}{'peak memory':>16}")
    for name, r in (("baseline", base), ("fts-mcp", proj)):
        print(f"{name:<10}{r['tokens_per_second']:>12,.0f}{r['peak_bytes'] / 2**30:>13.2f} GiB")
    print(f"ratio fts-mcp/baseline: tokens/s {proj['tokens_per_second'] / base['tokens_per_second']:.2f}, "
          f"peak memory {proj['peak_bytes'] / base['peak_bytes']:.2f}")


if __name__ == "__main__":
    main()
