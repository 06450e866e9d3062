"""A `generate` job: load the base (16-bit) and an adapter once, answer one prompt, exit. For trying an adapter
without a running edge runtime."""

from __future__ import annotations

from typing import Any

import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

from fts_mcp.jobs.models import Artifacts, Job
from fts_mcp.jobs.store import JobStore
from fts_mcp.training.data import encode_chat_prompt, encode_prompt


def generate(job: Job, store: JobStore, stop: Any) -> Artifacts:
    spec = job.spec
    device = "cuda:0" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device != "cpu" else torch.float32
    store.update_progress(job.job_id, {"phase": "loading_model"}, event=None)
    tokenizer = AutoTokenizer.from_pretrained(spec["base_model"])
    model = AutoModelForCausalLM.from_pretrained(spec["base_model"], dtype=dtype, device_map={"": device})
    if spec.get("adapter_dir"):
        model = PeftModel.from_pretrained(model, spec["adapter_dir"])
    model.eval()
    ids = encode_chat_prompt(tokenizer, spec["messages"]) if spec.get("messages") else \
        encode_prompt(tokenizer, spec["prompt"])
    store.update_progress(job.job_id, {"phase": "generating"}, event=None)
    temperature = spec.get("temperature", 0.0)
    with torch.no_grad():
        out = model.generate(input_ids=torch.tensor([ids], device=device), max_new_tokens=spec["max_tokens"],
                             do_sample=temperature > 0, temperature=temperature or None,
                             pad_token_id=tokenizer.pad_token_id)
    new = out[0][len(ids):].tolist()
    eos = tokenizer.eos_token_id
    text = tokenizer.decode(new[: new.index(eos)] if eos in new else new, skip_special_tokens=True)
    return Artifacts(text=text, finish_reason="stop" if eos in new else "length")
