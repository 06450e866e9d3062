"""The `generate` recipe: load the base (as the adapter was trained on it: NF4 or 16-bit) and an adapter once,
answer one prompt, exit. For trying an adapter without a running edge runtime."""

from __future__ import annotations

from peft import PeftModel

from fts_mcp.edge.spec import GenerateJobSpec
from fts_mcp.jobs.context import JobContext
from fts_mcp.jobs.records import Artifacts
from fts_mcp.models import loading
from fts_mcp.models.prompts import encode_chat_prompt, encode_prompt


def run(spec: GenerateJobSpec, ctx: JobContext) -> Artifacts:
    ctx.phase("loading_model")
    tokenizer = loading.load_tokenizer(spec.base_model, trust_remote_code=spec.trust_remote_code)
    model = loading.load_model(spec.base_model, trust_remote_code=spec.trust_remote_code,
                               quantization=spec.quantization)
    if spec.adapter_dir:
        model = PeftModel.from_pretrained(model, spec.adapter_dir)
    model.eval()
    ids = encode_chat_prompt(tokenizer, spec.messages) if spec.messages else encode_prompt(tokenizer, spec.prompt)
    ctx.phase("generating")
    text, finish, _ = loading.generate(model, tokenizer, ids, max_tokens=spec.max_tokens,
                                       temperature=spec.temperature)
    return Artifacts(text=text, finish_reason=finish)
