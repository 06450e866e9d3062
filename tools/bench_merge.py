"""Merge time and peak memory: fts-mcp's merge job recipe vs. a plain reload-in-bf16 + merge_and_unload.

    python tools/bench_merge.py                          # tiny shape, CPU (default)
    python tools/bench_merge.py --shape llama-3.1-8b     # on a GPU (or a 24+ GB host): random weights

Both variants merge the same random-weight base and random r=16 all-linear adapter, each in its own process
(so peak memory is not shared). The project's path also verifies logits and writes the merged model
atomically; the baseline only reloads and merges. Prints seconds, peak memory and project/baseline ratios.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tools.bench_train import SHAPES, build_model, peak_memory_bytes  # noqa: E402


def build_adapter(model_dir: Path, out: Path, r: int) -> None:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16, device_map="meta")
    config = LoraConfig(r=r, lora_alpha=2 * r, target_modules="all-linear", task_type="CAUSAL_LM")
    peft = get_peft_model(model, config)
    peft.to_empty(device="cpu")
    with torch.no_grad():
        for name, param in peft.named_parameters():
            if "lora_" in name:
                param.normal_(0, 0.02)
    peft.save_pretrained(out)


def run_baseline(model_dir: Path, adapter: Path) -> dict:
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    device = "cuda:0" if torch.cuda.is_available() else "cpu"
    t0 = time.perf_counter()
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16, device_map={"": device})
    loaded = time.perf_counter()
    PeftModel.from_pretrained(base, adapter).merge_and_unload()
    if device != "cpu":
        torch.cuda.synchronize()
    done = time.perf_counter()
    return {"load_s": loaded - t0, "merge_s": done - loaded, "total_s": done - t0, "peak_bytes": peak_memory_bytes()}


def run_project(model_dir: Path, adapter: Path) -> dict:
    from fts_mcp.adapters.merge import run
    from fts_mcp.adapters.spec import MergeJobSpec
    from fts_mcp.core import Core
    from fts_mcp.jobs.context import recording_context

    with tempfile.TemporaryDirectory() as home:
        os.environ.update(FTS_HOME=home, FTS_ROOTS=f"{home}{os.pathsep}{model_dir.parent}", FTS_GPUS="none")
        core = Core()
        core.jobs.runner.tick = lambda: None  # run the recipe in this process, not in a worker
        job = core.merging.merge(str(adapter), base_model=str(model_dir), dtype="bfloat16", output_name="bench")
        ctx, _ = recording_context(Path(home), job.job_id)
        t0 = time.perf_counter()
        artifacts = run(MergeJobSpec(**job.spec), ctx)
        total = time.perf_counter() - t0
        core.close()
    return {"total_s": total, "peak_bytes": peak_memory_bytes(),
            "max_abs_logit_diff": artifacts.verification.max_abs_logit_diff}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", choices=sorted(SHAPES), default="tiny")
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--variant", choices=["project", "baseline"], help=argparse.SUPPRESS)
    parser.add_argument("--model-dir", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--adapter", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.variant:
        runner = run_project if args.variant == "project" else run_baseline
        print(json.dumps(runner(args.model_dir, args.adapter)))
        return
    with tempfile.TemporaryDirectory() as tmp:
        model_dir, adapter = Path(tmp) / args.shape, Path(tmp) / "adapter"
        t = time.perf_counter()
        build_model(model_dir, args.shape)
        build_adapter(model_dir, adapter, args.rank)
        print(f"built random {args.shape} weights and an r={args.rank} adapter in {time.perf_counter() - t:.1f}s",
              file=sys.stderr)
        results = {}
        for variant in ("baseline", "project"):
            out = subprocess.run([sys.executable, __file__, "--variant", variant, "--model-dir", str(model_dir),
                                  "--adapter", str(adapter)], capture_output=True, text=True, check=True).stdout
            results[variant] = json.loads(out.strip().splitlines()[-1])
    base, proj = results["baseline"], results["project"]
    print(f"shape {args.shape}, adapter r={args.rank} on all linear layers, bf16")
    print(f"baseline  reload {base['load_s']:.2f}s + merge_and_unload {base['merge_s']:.2f}s = {base['total_s']:.2f}s, "
          f"peak {base['peak_bytes'] / 2**30:.2f} GiB")
    print(f"fts-mcp   load + verify + merge + save {proj['total_s']:.2f}s, peak {proj['peak_bytes'] / 2**30:.2f} GiB, "
          f"max |logit diff| {proj['max_abs_logit_diff']:.3g}")
    print(f"ratio fts-mcp/baseline: time {proj['total_s'] / base['total_s']:.2f}, "
          f"peak memory {proj['peak_bytes'] / base['peak_bytes']:.2f}")


if __name__ == "__main__":
    main()
