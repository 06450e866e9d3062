"""A PEFT LoRA adapter as a GGUF LoRA file: what llama.cpp (`--lora`), llama-server, llama-cpp-python
(`lora_path=`) and Ollama (`ADAPTER ./adapter.gguf`) load on top of the base model's own GGUF file.

The file is what llama.cpp's `convert_lora_to_gguf.py` writes, built with the same `gguf` package (its tensor-name
tables and quantizers): `general.type = "adapter"`, `adapter.type = "lora"`, `adapter.lora.alpha`, the base's
`general.architecture`, and for each adapted weight `<base GGUF tensor name>.lora_a` (r x in) and `.lora_b`
(out x r), PEFT's own orientation. Two things the reference converter does too: Llama-family q/k projections are
stored in GGUF with their rows permuted for llama.cpp's RoPE layout, so their `lora_b` rows are permuted the same
way; with `q8_0`, a tensor whose rows are not a multiple of 32 values (a `lora_b` of rank 16) is written in F16.

llama.cpp scales a delta by `alpha / r`, r being that tensor's rank. Where PEFT scales otherwise (rsLoRA:
alpha / sqrt(r)) the written alpha is the one that gives PEFT's scale (alpha * sqrt(r)); a module whose scale still
differs (`alpha_pattern`, or rsLoRA with a `rank_pattern`) gets the remaining factor folded into its `lora_b`, so
llama.cpp computes PEFT's delta for every layer. What llama.cpp cannot apply is refused before anything is
written, with the reason: DoRA, trained embeddings or output head, `modules_to_save`, trained biases, and any
architecture this module has no checked name map for.

Pure torch + safetensors + gguf, for the command line (`fts-mcp export-gguf`) and the subprocess that
`deploy_adapter(gguf=...)` runs (`python -m fts_mcp.adapters.gguf_export`); never imported by the server.
"""

from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from fts_mcp.adapters.inspect import CONFIG, WEIGHTS, read_adapter_config
from fts_mcp.adapters.llamacpp import ARCHITECTURE_NAMES, GgufAdapter, OutType, check_config, refuse
from fts_mcp.errors import FtsError, InvalidArgument
from fts_mcp.files import create_beside, sha256_file
from fts_mcp.models.architecture import Architecture, from_config

QTYPES: dict[str, gguf.GGMLQuantizationType] = {
    "f32": gguf.GGMLQuantizationType.F32,
    "f16": gguf.GGMLQuantizationType.F16,
    "bf16": gguf.GGMLQuantizationType.BF16,
    "q8_0": gguf.GGMLQuantizationType.Q8_0,
}
# Hugging Face architecture -> (llama.cpp architecture, whether q/k rows are permuted for its RoPE layout), as
# convert_hf_to_gguf.py's LlamaModel (Llama, Mistral) and Qwen2Model / Qwen3Model convert them.
ARCHITECTURES: dict[str, tuple[gguf.MODEL_ARCH, bool]] = {
    "LlamaForCausalLM": (gguf.MODEL_ARCH.LLAMA, True),
    "MistralForCausalLM": (gguf.MODEL_ARCH.LLAMA, True),
    "Qwen2ForCausalLM": (gguf.MODEL_ARCH.QWEN2, False),
    "Qwen3ForCausalLM": (gguf.MODEL_ARCH.QWEN3, False),
}
assert tuple(ARCHITECTURES) == ARCHITECTURE_NAMES  # what the server's torch-free check accepts
LORA_TENSOR = re.compile(r"^(?:base_model\.model\.)?(?P<module>.+)\.lora_(?P<side>[AB])\.weight$")
def _pattern_key(patterns: dict[str, Any], module: str) -> str | None:
    """The `rank_pattern` / `alpha_pattern` key PEFT applies to a module (peft.utils.other.get_pattern_key)."""
    return next((key for key in patterns if re.match(rf"(.*\.)?({key})$", module)), None)


def _base_config(base: Path, *, param: str) -> dict[str, Any]:
    path = base / "config.json" if base.is_dir() else base
    try:
        config = json.loads(path.read_text())
    except FileNotFoundError as exc:
        raise InvalidArgument(f"{path} does not exist; expected the base model's folder (with config.json)",
                              param=param) from exc
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise InvalidArgument(f"{path} is not a readable config.json: {exc}", param=param) from exc
    if not isinstance(config, dict):
        raise InvalidArgument(f"{path} does not hold a JSON object", param=param)
    return config


def _architecture(config: dict[str, Any], *, param: str) -> tuple[str, gguf.MODEL_ARCH, bool]:
    """(Hugging Face name, llama.cpp architecture, q/k permuted) of a supported base, else refused."""
    names = config.get("architectures")
    name = names[0] if isinstance(names, list) and names and isinstance(names[0], str) else None
    if name not in ARCHITECTURES:
        raise refuse(f"the base's architecture {name!r} has no checked GGUF tensor-name map here; supported: "
                      f"{', '.join(ARCHITECTURES)}", param=param)
    arch, permuted = ARCHITECTURES[name]
    return name, arch, permuted


def _pairs(weights: dict[str, torch.Tensor], *, param: str) -> dict[str, dict[str, torch.Tensor]]:
    """HF module name -> {"A": r x in, "B": out x r}; any other tensor is refused, naming what it trains."""
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in weights.items():
        match = LORA_TENSOR.match(key)
        if match is None:
            if "lora_embedding" in key or "embed_tokens" in key or "lm_head" in key or "wte" in key:
                what = "trained embeddings or output head"
            elif key.endswith(".bias"):
                what = "a trained bias"
            elif "lora_magnitude_vector" in key:
                what = "a DoRA magnitude vector"
            else:
                what = "a tensor that is not a LoRA pair"
            raise refuse(f"it holds {what} ({key}); llama.cpp adapters hold lora_A / lora_B pairs of linear "
                          "layers only: merge the adapter and convert the merged model instead", param=param)
        pairs.setdefault(match["module"], {})[match["side"]] = tensor
    for module, pair in pairs.items():
        if set(pair) != {"A", "B"}:
            raise refuse(f"{module} has lora_{''.join(pair)} without its partner", param=param)
        a, b = pair["A"], pair["B"]
        if a.dim() != 2 or b.dim() != 2 or a.shape[0] != b.shape[1]:
            raise refuse(f"{module}: lora_A {tuple(a.shape)} and lora_B {tuple(b.shape)} are not a rank-r pair",
                          param=param)
    if not pairs:
        raise refuse(f"its {WEIGHTS} holds no lora_A / lora_B tensors", param=param)
    return pairs


def _permute_rows(b: torch.Tensor, heads: int) -> torch.Tensor:
    """convert_hf_to_gguf.py's LlamaModel.permute on the output rows: (heads, 2, d/2) -> (heads, d/2, 2)."""
    return b.reshape(heads, 2, b.shape[0] // heads // 2, b.shape[1]).swapaxes(1, 2).reshape(b.shape)


def _base_gguf_tensors(path: Path, architecture: str, *, param: str) -> dict[str, tuple[int, ...]]:
    """Tensor name -> numpy-order shape of a base GGUF file, refusing one of another architecture."""
    try:
        reader = gguf.GGUFReader(str(path))
        field = reader.fields["general.architecture"]
        arch = bytes(field.parts[field.data[0]]).decode()
    except (KeyError, ValueError, IndexError, OSError, UnicodeDecodeError) as exc:
        raise InvalidArgument(f"{path} is not a readable GGUF model file ({type(exc).__name__})", param=param) from exc
    if arch != architecture:
        raise refuse(f"{path.name} is a {arch!r} model and the adapter's base a {architecture!r} one", param=param)
    return {t.name: tuple(int(n) for n in reversed(t.shape.tolist())) for t in reader.tensors}


def export_gguf(adapter: Path, base: Path, out: Path, *, outtype: OutType = "f16", base_gguf: Path | None = None,
                name: str | None = None, param: str = "adapter", base_param: str = "base_model",
                base_name: str | None = None) -> GgufAdapter:
    """Write `adapter` (a PEFT LoRA folder) as a GGUF LoRA file at `out` (atomically: whole or not at all).

    `base` is the base model's Hugging Face folder (or its config.json): architecture, layer count and shapes come
    from it. `base_gguf`, when given, is the base's own GGUF file, and every tensor must exist there with the
    matching shape (what llama.cpp checks on load). Everything is checked before a byte is written. `base_name`: what
    messages call the base (default: `base`)."""
    if outtype not in QTYPES:
        raise InvalidArgument(f"outtype {outtype!r} is not one of {', '.join(QTYPES)}", param="outtype")
    config = read_adapter_config(adapter, param=param)
    raw = json.loads((adapter / CONFIG).read_text())
    check_config(raw, param=param)
    base_config = _base_config(base, param=base_param)
    _, arch, permuted = _architecture(base_config, param=base_param)
    shape: Architecture = from_config(base_config, source=base_name or str(base))
    names = gguf.get_tensor_name_map(arch, shape.layers)
    architecture = gguf.MODEL_ARCH_NAMES[arch]
    try:
        weights = load_file(str(adapter / WEIGHTS), device="cpu")
    except FileNotFoundError as exc:
        raise InvalidArgument(f"{adapter} has no {WEIGHTS}", param=param) from exc
    except (SafetensorError, OSError) as exc:
        raise InvalidArgument(f"{adapter / WEIGHTS} is corrupt: {exc}", param=param) from exc
    pairs = _pairs(weights, param=param)

    # One alpha for the file: the one that gives PEFT's scale at the config's rank (alpha * sqrt(r) for rsLoRA).
    alpha = config.alpha * math.sqrt(config.r) if config.use_rslora else config.alpha
    alpha_pattern = raw.get("alpha_pattern") or {}
    notes = [f"rsLoRA: adapter.lora.alpha = {config.alpha:g} * sqrt({config.r}) = {alpha:.6g}, so llama.cpp's "
             f"alpha / r equals PEFT's alpha / sqrt(r)"] if config.use_rslora else []
    expected = {module: (size_in, size_out) for module, size_in, size_out in shape.linear_shapes()}
    known = _base_gguf_tensors(base_gguf, architecture, param=base_param) if base_gguf is not None else None

    tensors: list[tuple[str, np.ndarray, gguf.GGMLQuantizationType]] = []
    folded, fallback = [], 0
    for module, pair in pairs.items():
        a, b = pair["A"].to(torch.float32), pair["B"].to(torch.float32)
        target = names.get_name(module + ".weight", try_suffixes=(".weight",))
        layer = re.search(r"layers\.(\d+)\.", module)
        if layer is not None and int(layer.group(1)) >= shape.layers:
            raise refuse(f"it adapts layer {layer.group(1)} ({module}) and the base has {shape.layers} layers: it "
                          "was trained for another base model", param=param)
        if target is None or not target.startswith("blk."):
            what = "the embeddings or the output head" if target is not None else "a module with no GGUF name"
            raise refuse(f"it adapts {what} ({module}); llama.cpp adapters here cover the blocks' linear layers "
                          "only", param=param)
        leaf = module.rsplit(".", 1)[-1]
        if leaf in expected and (a.shape[1], b.shape[0]) != expected[leaf]:
            raise refuse(f"{module} is {a.shape[1]} -> {b.shape[0]} and the base's is {expected[leaf][0]} -> "
                          f"{expected[leaf][1]}: it was trained for another base model", param=param)
        if known is not None:
            if target not in known:
                raise refuse(f"{base_gguf} has no tensor {target} for {module}", param=base_param)
            if known[target] != (b.shape[0], a.shape[1]):
                raise refuse(f"{target} in {base_gguf} is {known[target]}, the adapter's {module} is "
                              f"{(b.shape[0], a.shape[1])}: it was trained for another base model", param=base_param)
        rank = a.shape[0]
        key = _pattern_key(alpha_pattern, module)
        module_alpha = float(alpha_pattern[key]) if key is not None else config.alpha
        peft_scale = module_alpha / (math.sqrt(rank) if config.use_rslora else rank)
        factor = peft_scale * rank / alpha  # what llama.cpp's alpha / rank still misses
        if not math.isclose(factor, 1.0, rel_tol=1e-9):
            b = b * factor
            folded.append(module)
        if permuted and leaf in ("q_proj", "k_proj"):
            b = _permute_rows(b, shape.heads if leaf == "q_proj" else shape.kv_heads)
        for suffix, data in ((".lora_a", a), (".lora_b", b)):
            qtype = QTYPES[outtype]
            try:
                packed = gguf.quants.quantize(data.numpy(), qtype)
            except gguf.QuantError:  # q8_0 needs rows of 32 values: llama.cpp's converter falls back to F16
                qtype, fallback = gguf.GGMLQuantizationType.F16, fallback + 1
                packed = gguf.quants.quantize(data.numpy(), qtype)
            tensors.append((target + suffix, packed, qtype))
    if folded:
        notes.append(f"{len(folded)} module(s) scaled unlike alpha / r (alpha_pattern or rank_pattern): the factor is "
                     f"folded into their lora_b ({', '.join(folded[:3])}{', ...' if len(folded) > 3 else ''})")
    if fallback:
        notes.append(f"q8_0: {fallback} tensor(s) whose rows are not a multiple of 32 values written in F16, as "
                     "llama.cpp's converter does")

    fd, tmp = create_beside(out)
    os.close(fd)
    try:
        writer = gguf.GGUFWriter(tmp, architecture)
        try:
            writer.add_type(gguf.GGUFType.ADAPTER)
            writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
            writer.add_name(name or adapter.name)
            writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, alpha)
            writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
            for tensor_name, data, qtype in tensors:
                writer.add_tensor(tensor_name, data, raw_dtype=qtype)
            writer.write_header_to_file()
            writer.write_kv_data_to_file()
            writer.write_tensors_to_file()
        finally:
            writer.close()
        with tmp.open("rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, out)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    counts: dict[str, int] = {}
    for _, _, qtype in tensors:
        counts[qtype.name] = counts.get(qtype.name, 0) + 1
    return GgufAdapter(path=str(out), bytes=out.stat().st_size, sha256=sha256_file(out), tensors=len(tensors),
                       outtype=outtype, alpha=alpha, rank=config.r, architecture=architecture, tensor_types=counts,
                       notes=notes)


def main(argv: list[str] | None = None) -> int:
    """`python -m fts_mcp.adapters.gguf_export ADAPTER BASE OUT [--outtype f16] [--base-gguf F] [--name N] [--json]`:
    the export in its own process (the server's deploy runs it so). With --json the last line is the result, or
    {"error", "param"} for a refusal (exit status 2)."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m fts_mcp.adapters.gguf_export")
    parser.add_argument("adapter", type=Path)
    parser.add_argument("base", type=Path, help="the base's Hugging Face folder or its config.json")
    parser.add_argument("out", type=Path)
    parser.add_argument("--outtype", default="f16", choices=list(QTYPES))
    parser.add_argument("--base-gguf", type=Path)
    parser.add_argument("--name")
    parser.add_argument("--base-name", help="what messages call the base (default: BASE)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    try:
        done = export_gguf(args.adapter, args.base, args.out, outtype=args.outtype, base_gguf=args.base_gguf,
                           name=args.name, base_name=args.base_name)
    except FtsError as exc:  # a refusal, or a base whose config cannot be read
        print(json.dumps({"error": exc.message, "param": exc.param}) if args.json else str(exc))
        return 2
    print(done.model_dump_json() if args.json else f"{done.path}  {done.bytes:,} bytes  sha256 {done.sha256}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
