"""Adapters for llama.cpp and Ollama, from the server's side: which base an export is checked against, what a GGUF
LoRA cannot carry (checked from the config files, before any conversion), the export itself in a short-lived
subprocess (`fts_mcp.adapters.gguf_export` loads torch, the server never does), and the lines that use the file:
an Ollama Modelfile (`FROM` the base, `ADAPTER` the file) and a `llama-server --lora` command. Pure Python.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel

from fts_mcp.adapters.inspect import CONFIG
from fts_mcp.config import Settings
from fts_mcp.errors import FtsError, InvalidArgument
from fts_mcp.models import gguf
from fts_mcp.models.architecture import read_config
from fts_mcp.models.base import TrainingBase
from fts_mcp.models.refs import hub_offline

OutType = Literal["f32", "f16", "bf16", "q8_0"]
OUT_TYPES: tuple[str, ...] = ("f32", "f16", "bf16", "q8_0")
GGUF_FILE = "adapter.gguf"  # the GGUF LoRA's name in a store version
EXPORT_SECONDS = 600
# Hugging Face architectures with a checked GGUF tensor-name map (gguf_export.ARCHITECTURES says how each maps).
ARCHITECTURE_NAMES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM")
# Keys of adapter_config.json that ask for something a GGUF LoRA cannot carry, with the reason given.
UNSUPPORTED = {
    "use_dora": "DoRA (use_dora) rescales each weight by a learned magnitude that llama.cpp cannot apply; merge "
                "the adapter (merge_adapter) and convert the merged model instead",
    "modules_to_save": "it trains whole modules ({value}) besides LoRA pairs (modules_to_save); llama.cpp adapters "
                       "hold LoRA pairs only: merge the adapter and convert the merged model instead",
    "trainable_token_indices": "it trains embedding rows (trainable_token_indices), which a GGUF LoRA cannot carry",
    "target_parameters": "it adapts raw parameters (target_parameters), which llama.cpp's LoRA loader does not map",
    "alora_invocation_tokens": "it is an activated LoRA (alora_invocation_tokens), which this exporter does not write",
    "use_qalora": "it is a QA-LoRA adapter (use_qalora), whose pooled inputs llama.cpp cannot apply",
    "layer_replication": "it replicates layers (layer_replication), which the base GGUF file does not have",
    "lora_bias": "it trains a bias on lora_B (lora_bias), which llama.cpp adapters cannot carry",
    "fan_in_fan_out": "its weights are stored transposed (fan_in_fan_out, GPT-2 style Conv1D layers), which this "
                      "exporter does not convert",
}
# PEFT initialisations that rewrite the base weights (the adapter only fits the rewritten base), until saved with
# path_initial_model_for_weight_conversion, which turns them into a plain LoRA of the original base.
BASE_CHANGING_INITS = {"pissa", "olora", "loftq", "corda"}


class GgufAdapter(BaseModel):
    """The written file: where, how big, its sha256, and what llama.cpp will read from it."""

    path: str
    bytes: int
    sha256: str
    tensors: int  # lora_a + lora_b tensors (two per adapted weight)
    outtype: OutType
    alpha: float  # adapter.lora.alpha as written: llama.cpp scales each delta by alpha / r
    rank: int
    architecture: str  # general.architecture, the base's
    tensor_types: dict[str, int]  # GGML type name -> tensor count (q8_0 keeps rows not a multiple of 32 in F16)
    notes: list[str]  # what was adjusted on the way (rsLoRA alpha, folded scales, F16 fallbacks)


class GgufBase(BaseModel):
    """The base an export is written for: its config (architecture, layers, shapes), where that lives, and, when the
    base came from a `.gguf` file, that file (every tensor is checked against it, and llama.cpp and Ollama load it)."""

    config: dict
    folder: str  # its Hugging Face folder (for a hub id: the local cache's snapshot)
    gguf_file: str | None = None


def refuse(reason: str, *, param: str) -> InvalidArgument:
    return InvalidArgument(f"cannot export this adapter for llama.cpp: {reason}", param=param)


def check_outtype(value: str, *, param: str = "gguf") -> OutType:
    if value not in OUT_TYPES:
        raise InvalidArgument(f"{value!r} is not a GGUF type; use one of {', '.join(OUT_TYPES)} (f16: half the "
                              "size of f32, no loss that changes answers; q8_0: smaller still)", param=param)
    return value  # type: ignore[return-value]


def check_config(raw: dict[str, Any], *, param: str) -> None:
    """Refuse, naming the reason, an adapter_config.json asking for what a GGUF LoRA cannot carry."""
    for key, reason in UNSUPPORTED.items():
        value = raw.get(key)
        if value:
            raise refuse(reason.format(value=value), param=param)
    if raw.get("bias", "none") != "none":
        raise refuse(f"it trains biases (bias={raw['bias']!r}); llama.cpp adapters hold LoRA pairs only", param=param)
    init = raw.get("init_lora_weights")
    if isinstance(init, str) and init.split("_niter_")[0] in BASE_CHANGING_INITS:
        raise refuse(f"it was initialised with {init!r}, which changes the base weights it runs on; save it with "
                     "PEFT's path_initial_model_for_weight_conversion (a plain LoRA of the original base) first",
                     param=param)
    for key in ("rank_pattern", "alpha_pattern"):
        pattern = raw.get(key) or {}
        if not isinstance(pattern, dict):
            raise refuse(f"its {key} is not a mapping of module patterns to numbers", param=param)
        for module, value in pattern.items():
            try:
                re.compile(module)
                float(value)
            except (re.error, TypeError, ValueError) as exc:
                raise refuse(f"its {key} entry {module!r}: {value!r} is not a module pattern and a number",
                             param=param) from exc


def check_exportable(adapter: Path, base: GgufBase, *, param: str = "adapter") -> None:
    """What can be refused without torch, before anything is converted or published: the adapter's config and the
    base's architecture. (The tensors themselves are checked by the export.)"""
    try:
        raw = json.loads((adapter / CONFIG).read_text())
    except (OSError, ValueError) as exc:
        raise InvalidArgument(f"{adapter / CONFIG} cannot be read: {exc}", param=param) from exc
    if not isinstance(raw, dict):
        raise InvalidArgument(f"{adapter / CONFIG} does not hold a JSON object", param=param)
    check_config(raw, param=param)
    names = base.config.get("architectures")
    name = names[0] if isinstance(names, list) and names and isinstance(names[0], str) else None
    if name not in ARCHITECTURE_NAMES:
        raise refuse(f"its base ({base.folder}) is a {name!r}, which has no checked GGUF tensor-name map here; "
                     f"supported: {', '.join(ARCHITECTURE_NAMES)}", param=param)


def base_for(base_model: str | None, settings: Settings, *, param: str = "adapter") -> GgufBase:
    """The base an adapter trained on `base_model` is exported for. A folder converted from a `.gguf` file (the
    way fts-mcp trains on one) names that file, when it is still there as it was, so the adapter is checked against,
    and used with, the very file."""
    if not base_model:
        raise InvalidArgument("the adapter names no base model (its job or adapter_config.json would); export it "
                              "with the CLI's --base-model", param=param)
    try:
        config, where = read_config(base_model, settings.roots, offline=hub_offline(settings.env))
    except FtsError as exc:  # about the base the adapter names, which the caller did not pass as an argument
        raise InvalidArgument(f"its base model {base_model!r}: {exc.message}", param=param) from exc
    folder = Path(where).parent
    came_from = gguf.origin(folder) or {}
    source = came_from.get("source")
    same = isinstance(source, str) and Path(source).is_file() and Path(source).stat().st_size == came_from.get("bytes")
    return GgufBase(config=config, folder=str(folder), gguf_file=source if same else None)


def export(adapter: Path, base: GgufBase, out: Path, *, outtype: OutType, name: str, param: str = "adapter"
           ) -> GgufAdapter:
    """Write `adapter` as a GGUF LoRA at `out` (a new file in an existing folder) in a subprocess. A refusal
    (DoRA, trained embeddings, an architecture with no checked name map, shapes of another base) comes back as
    InvalidArgument naming the reason; nothing is written then."""
    check_exportable(adapter, base, param=param)
    if out.is_dir():
        raise InvalidArgument(f"{out} is a folder; give the file to write", param="out")
    if not out.parent.is_dir():
        raise InvalidArgument(f"{out.parent} does not exist; create it or write elsewhere", param="out")
    fd, config = tempfile.mkstemp(prefix=".base-config-", suffix=".json", dir=out.parent)
    with os.fdopen(fd, "w") as fh:
        json.dump(base.config, fh)
    command = [sys.executable, "-m", "fts_mcp.adapters.gguf_export", str(adapter), config, str(out),
               "--outtype", outtype, "--name", name, "--base-name", base.folder, "--json"]
    if base.gguf_file:
        command += ["--base-gguf", base.gguf_file]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=EXPORT_SECONDS, check=False)
    except subprocess.TimeoutExpired as exc:
        raise FtsError(f"exporting {adapter} to GGUF took over {EXPORT_SECONDS} s", param=param) from exc
    finally:
        Path(config).unlink(missing_ok=True)
    answer = None
    for line in reversed(done.stdout.splitlines()):
        try:
            answer = json.loads(line)
            break
        except ValueError:
            continue
    if done.returncode == 0 and isinstance(answer, dict) and "sha256" in answer:
        return GgufAdapter(**answer)
    if isinstance(answer, dict) and isinstance(answer.get("error"), str):
        raise InvalidArgument(answer["error"], param=param)  # what is wrong is the adapter, or the base it names
    ended = f"exited with status {done.returncode}" if done.returncode >= 0 else \
        f"was stopped by signal {-done.returncode}"
    raise FtsError(f"exporting {adapter} to GGUF failed: the process {ended}; {done.stderr.strip()[-400:]}",
                   param=param)


def notes_for(trained_on: TrainingBase | None) -> list[str]:
    """What a user of the GGUF file should know about how the adapter was trained."""
    if trained_on is not None and trained_on.quantization == "nf4":
        return ["trained on the NF4 (4-bit) base: llama.cpp adds it to the GGUF base's own weights, which are not "
                "NF4's, and on a real model that can lose much of what it learned; check its answers there, or "
                "train with quantization='none' for llama.cpp and Ollama"]
    return []


class GgufUse(BaseModel):
    modelfile: str  # an Ollama Modelfile: FROM the base, ADAPTER the file
    ollama: str  # the command that makes the Ollama model
    llama_server: str  # llama.cpp's server with the adapter applied (per-request scales: its /lora-adapters)
    notes: list[str]


def usage(file: Path, base: GgufBase, name: str) -> GgufUse:
    """How to run a GGUF adapter: with the base's own `.gguf` file when there is one; a Hugging Face base must be
    converted first (llama.cpp's convert_hf_to_gguf.py), which Ollama does itself from the folder."""
    notes = []
    if base.gguf_file:
        model, ollama_from = base.gguf_file, base.gguf_file
    else:
        model, ollama_from = "base.gguf", base.folder
        notes.append(f"llama.cpp needs the base as GGUF: python convert_hf_to_gguf.py {shlex.quote(base.folder)} "
                     "--outfile base.gguf (llama.cpp's script); Ollama imports the Hugging Face folder itself")
    return GgufUse(modelfile=f"FROM {ollama_from}\nADAPTER {file}\n", ollama=f"ollama create {name} -f Modelfile",
                   llama_server=f"llama-server -m {shlex.quote(model)} --lora {shlex.quote(str(file))}", notes=notes)
