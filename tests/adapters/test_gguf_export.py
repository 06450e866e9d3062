"""GGUF LoRA export: the file llama.cpp loads (names, shapes, types, metadata), the delta it computes equals PEFT's
(rsLoRA and rank/alpha patterns included, q/k rows in llama.cpp's RoPE layout), and refusals before any write.

The q/k check does not use the exporter's own permutation: transformers' GGUF reader (which un-permutes q/k when
it loads a GGUF model) brings the exported delta back to Hugging Face's layout, where PEFT's delta must match it."""

import json
import shutil
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, MistralConfig, Qwen2Config
from transformers.modeling_gguf_pytorch_utils import TENSOR_PROCESSORS, TensorProcessor

from fts_mcp.adapters.gguf_export import export_gguf
from fts_mcp.errors import InvalidArgument
from fts_mcp.files import sha256_file
from tests.conftest import make_adapter

# Hugging Face module (block-relative) -> llama.cpp tensor
MODULES = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
           "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
           "mlp.down_proj": "ffn_down"}
# outtype -> (GGML type of a lora_a with rows of 64 values, of a rank-4 lora_b, relative tolerance on read-back)
OUTTYPES = {"f32": ("F32", "F32", 0.0), "f16": ("F16", "F16", 1e-3), "bf16": ("BF16", "BF16", 8e-3),
            "q8_0": ("Q8_0", "F16", 1e-2)}


def read(path: Path) -> tuple[dict, dict[str, tuple[str, np.ndarray]]]:
    """(metadata, tensor name -> (GGML type, float32 values in numpy order)) of a GGUF file."""
    reader = gguf.GGUFReader(str(path))
    fields = {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.")}
    tensors = {t.name: (t.tensor_type.name, gguf.quants.dequantize(t.data, t.tensor_type).reshape(
        tuple(reversed(t.shape.tolist())))) for t in reader.tensors}
    return fields, tensors


def lora_adapter(model_dir: Path, out: Path, *, seed: int = 1, **config) -> Path:
    """A LoRA adapter with random, non-zero A and B on `model_dir` (any LoraConfig settings)."""
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    settings = {"r": 4, "lora_alpha": 8, "target_modules": "all-linear", "lora_dropout": 0.0,
                "task_type": "CAUSAL_LM"} | config
    peft = get_peft_model(model, LoraConfig(**settings))
    with torch.no_grad():
        for name, param in peft.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.05)
    peft.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def bases(tiny_model, tmp_path_factory) -> dict[str, Path]:
    """The tiny Llama, plus a Mistral and a Qwen2 of the same size with grouped KV heads (4 query, 2 KV)."""
    root = tmp_path_factory.mktemp("gguf-bases")
    shape = {"vocab_size": 300, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
             "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 256}
    found = {"llama": tiny_model}
    for name, config in (("mistral", MistralConfig(**shape)), ("qwen2", Qwen2Config(**shape))):
        torch.manual_seed(0)
        AutoModelForCausalLM.from_config(config).save_pretrained(root / name)
        found[name] = root / name
    return found


def gguf_names(base: Path) -> tuple[str, gguf.TensorNameMap]:
    config = json.loads((base / "config.json").read_text())
    arch = {"LlamaForCausalLM": gguf.MODEL_ARCH.LLAMA, "MistralForCausalLM": gguf.MODEL_ARCH.LLAMA,
            "Qwen2ForCausalLM": gguf.MODEL_ARCH.QWEN2}[config["architectures"][0]]
    return gguf.MODEL_ARCH_NAMES[arch], gguf.get_tensor_name_map(arch, config["num_hidden_layers"])


def no_leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


@pytest.mark.parametrize("outtype", list(OUTTYPES))
def test_each_outtype_reads_back_as_llama_cpp_expects(tiny_model, tmp_path, outtype):
    adapter = make_adapter(tiny_model, tmp_path / "adapter", r=4, seed=1)
    result = export_gguf(adapter, tiny_model, tmp_path / "adapter.gguf", outtype=outtype)

    fields, tensors = read(tmp_path / "adapter.gguf")
    assert fields["general.type"] == "adapter" and fields["adapter.type"] == "lora"
    assert fields["general.architecture"] == "llama" and fields["adapter.lora.alpha"] == 8.0
    expected = {f"blk.{i}.{gguf_name}.weight.lora_{side}" for i in range(2) for gguf_name in MODULES.values()
                for side in "ab"}
    assert set(tensors) == expected
    a_type, b_type, tol = OUTTYPES[outtype]
    peft = {k: v.numpy() for k, v in load_file(adapter / "adapter_model.safetensors").items()}
    for i in range(2):
        for hf_name, gguf_name in MODULES.items():
            prefix = f"base_model.model.model.layers.{i}.{hf_name}"
            a_type_got, a = tensors[f"blk.{i}.{gguf_name}.weight.lora_a"]
            b_type_got, b = tensors[f"blk.{i}.{gguf_name}.weight.lora_b"]
            want_a, want_b = peft[f"{prefix}.lora_A.weight"], peft[f"{prefix}.lora_B.weight"]
            assert (a_type_got, b_type_got) == (a_type, b_type)
            assert a.shape == want_a.shape and b.shape == want_b.shape  # (r, in) and (out, r): PEFT's orientation
            if gguf_name in ("attn_q", "attn_k"):  # rows in llama.cpp's RoPE layout: compare as sets of rows
                b, want_b = np.sort(b, axis=0), np.sort(want_b, axis=0)
            np.testing.assert_allclose(a, want_a, rtol=tol, atol=tol * np.abs(want_a).max())
            np.testing.assert_allclose(b, want_b, rtol=tol, atol=tol * np.abs(want_b).max())
    assert result.outtype == outtype and result.tensors == len(tensors) == 28 and result.alpha == 8.0
    assert result.bytes == (tmp_path / "adapter.gguf").stat().st_size
    assert result.sha256 == sha256_file(tmp_path / "adapter.gguf")
    assert result.architecture == "llama" and result.rank == 4
    assert sum(result.tensor_types.values()) == 28
    assert not no_leftovers(tmp_path)


VARIANTS = {
    "plain": {},
    "rslora": {"use_rslora": True, "r": 8, "lora_alpha": 16},
    "patterns": {"use_rslora": True, "rank_pattern": {"q_proj": 2, "layers.1.mlp.down_proj": 6},
                 "alpha_pattern": {"v_proj": 3, "up_proj": 32}},
}


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen2"])
def test_llama_cpp_delta_equals_peft_delta(bases, tmp_path, arch, variant):
    """For every adapted weight: alpha / r * B @ A as llama.cpp computes it from the file (r read from lora_b, as
    llama.cpp does), brought back to Hugging Face's layout by transformers' GGUF reader, equals PEFT's delta."""
    base = bases[arch]
    adapter = lora_adapter(base, tmp_path / "adapter", **VARIANTS[variant])
    result = export_gguf(adapter, base, tmp_path / "adapter.gguf", outtype="f32")
    fields, tensors = read(tmp_path / "adapter.gguf")
    alpha = fields["adapter.lora.alpha"]
    assert alpha == pytest.approx(result.alpha, rel=1e-6)
    if VARIANTS[variant].get("use_rslora"):
        assert "rsLoRA" in result.notes[0]
    arch_name, names = gguf_names(base)
    config = json.loads((base / "config.json").read_text())
    processor = TENSOR_PROCESSORS.get(arch_name, TensorProcessor)(config=config)

    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32), adapter)
    checked = 0
    for module_name, module in model.named_modules():
        if not hasattr(module, "get_delta_weight") or "default" not in getattr(module, "lora_A", {}):
            continue
        target = names.get_name(module_name.removeprefix("base_model.model.") + ".weight", try_suffixes=(".weight",))
        _, a = tensors[f"{target}.lora_a"]
        _, b = tensors[f"{target}.lora_b"]
        delta = alpha / b.shape[1] * (b.astype(np.float64) @ a.astype(np.float64))
        delta = processor.process(delta, target).weights  # transformers un-permutes llama's q/k rows here
        want = module.get_delta_weight("default").detach().double().numpy()
        np.testing.assert_allclose(delta, want, rtol=1e-5, atol=1e-7 * np.abs(want).max())
        checked += 1
    assert checked == 14
    if variant == "patterns":
        assert any("folded" in note for note in result.notes)


# PEFT warns that it saves the whole embedding / output layer of an adapter that targets one
SAVES_EMBEDDINGS = pytest.mark.filterwarnings("ignore:Setting `save_embedding_layers` to `True`:UserWarning")


@pytest.mark.parametrize("config, reason", [
    ({"use_dora": True}, "DoRA"),
    ({"modules_to_save": ["lm_head"]}, "modules_to_save"),
    ({"bias": "lora_only"}, "biases"),
    ({"init_lora_weights": "pissa"}, "changes the base weights"),
    ({"init_lora_weights": "olora"}, "changes the base weights"),
    pytest.param({"target_modules": ["q_proj", "embed_tokens"]}, "embeddings", marks=SAVES_EMBEDDINGS),
    pytest.param({"target_modules": ["q_proj", "lm_head"]}, "output head", marks=SAVES_EMBEDDINGS),
])
def test_what_llama_cpp_cannot_apply_is_refused_before_anything_is_written(tiny_model, tmp_path, config, reason):
    adapter = lora_adapter(tiny_model, tmp_path / "adapter", **config)
    with pytest.raises(InvalidArgument, match=reason) as refused:
        export_gguf(adapter, tiny_model, tmp_path / "out" / "adapter.gguf")
    assert refused.value.param == "adapter"
    assert not (tmp_path / "out").exists() or not list((tmp_path / "out").iterdir())


def test_an_architecture_without_a_checked_name_map_is_refused(tiny_model, tmp_path):
    adapter = make_adapter(tiny_model, tmp_path / "adapter", r=4, seed=1)
    base = tmp_path / "base"
    base.mkdir()
    config = json.loads((tiny_model / "config.json").read_text()) | {"architectures": ["GemmaForCausalLM"]}
    (base / "config.json").write_text(json.dumps(config))
    with pytest.raises(InvalidArgument, match="GemmaForCausalLM.*supported: LlamaForCausalLM") as refused:
        export_gguf(adapter, base, tmp_path / "adapter.gguf")
    assert refused.value.param == "base_model"
    assert not (tmp_path / "adapter.gguf").exists() and not no_leftovers(tmp_path)


def test_an_adapter_of_another_base_is_refused(tiny_model, bases, tmp_path):
    adapter = make_adapter(tiny_model, tmp_path / "adapter", r=4, seed=1)  # 4 KV heads; the Mistral has 2
    with pytest.raises(InvalidArgument, match="trained for another base"):
        export_gguf(adapter, bases["mistral"], tmp_path / "adapter.gguf")
    with pytest.raises(InvalidArgument, match="outtype"):
        export_gguf(adapter, tiny_model, tmp_path / "adapter.gguf", outtype="q4_0")
    assert not (tmp_path / "adapter.gguf").exists()


def fake_base_gguf(path: Path, arch: str, shapes: dict[str, tuple[int, int]]) -> Path:
    """A base 'model' GGUF holding only zero tensors of the given names and numpy shapes (enough for the check)."""
    writer = gguf.GGUFWriter(path, arch)
    for name, shape in shapes.items():
        writer.add_tensor(name, np.zeros(shape, np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_the_base_gguf_file_is_checked_as_llama_cpp_will(tiny_model, tmp_path):
    adapter = make_adapter(tiny_model, tmp_path / "adapter", r=4, seed=1)
    shapes = {f"blk.{i}.{n}.weight": (o, i_) for i in range(2) for n, (i_, o) in
              {"attn_q": (64, 64), "attn_k": (64, 64), "attn_v": (64, 64), "attn_output": (64, 64),
               "ffn_gate": (64, 128), "ffn_up": (64, 128), "ffn_down": (128, 64)}.items()}
    good = fake_base_gguf(tmp_path / "good.gguf", "llama", shapes)
    assert export_gguf(adapter, tiny_model, tmp_path / "a.gguf", base_gguf=good).tensors == 28
    for name, arch, broken, reason in [
        ("qwen.gguf", "qwen2", shapes, "'qwen2' model"),
        ("short.gguf", "llama", {k: v for k, v in shapes.items() if "ffn_down" not in k}, "no tensor blk.0.ffn_down"),
        ("wide.gguf", "llama", shapes | {"blk.1.attn_q.weight": (128, 64)}, "blk.1.attn_q.weight"),
    ]:
        with pytest.raises(InvalidArgument, match=reason):
            export_gguf(adapter, tiny_model, tmp_path / name.replace(".gguf", ".lora.gguf"),
                        base_gguf=fake_base_gguf(tmp_path / name, arch, broken))
        assert not (tmp_path / name.replace(".gguf", ".lora.gguf")).exists()


def test_the_file_is_replaced_whole_or_not_at_all(tiny_model, tmp_path, monkeypatch):
    adapter = make_adapter(tiny_model, tmp_path / "adapter", r=4, seed=1)
    out = tmp_path / "adapter.gguf"
    first = export_gguf(adapter, tiny_model, out, outtype="f32")

    def broken(self, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(gguf.GGUFWriter, "write_tensors_to_file", broken)
    with pytest.raises(OSError, match="disk full"):
        export_gguf(adapter, tiny_model, out, outtype="f16")
    assert sha256_file(out) == first.sha256 and not no_leftovers(tmp_path)
    monkeypatch.undo()
    again = export_gguf(adapter, tiny_model, out, outtype="f32")
    assert again.sha256 == first.sha256  # the same adapter gives the same bytes


def test_an_adapter_trained_on_some_layers_only_exports_those(tiny_model, tmp_path):
    adapter = lora_adapter(tiny_model, tmp_path / "adapter", target_modules=["q_proj", "v_proj"],
                           layers_to_transform=[1])
    result = export_gguf(adapter, tiny_model, tmp_path / "adapter.gguf")
    assert set(read(tmp_path / "adapter.gguf")[1]) == {"blk.1.attn_q.weight.lora_a", "blk.1.attn_q.weight.lora_b",
                                                       "blk.1.attn_v.weight.lora_a", "blk.1.attn_v.weight.lora_b"}
    assert result.tensors == 4
    shutil.rmtree(adapter)
