"""The evaluation recipe: the base model against the base with the adapter (or a merged model), side by side,
on held-out data. Answers the question an agent is asked: is the adapter better on my task, and did the model
forget anything?

For each side: loss and perplexity on the expected answers (completion tokens only), exact match of greedy
answers, a format check (valid JSON, or a regular expression) when the expected answers have one, perplexity on
general text shipped in resources/ (the forgetting probe), and a few sample answers. `run(spec, ctx)` runs in a
job's work horse; models load through `fts_mcp.models.loading`.
"""

from __future__ import annotations

import json
import math
import re
from importlib.resources import files
from pathlib import Path
from typing import Any

import torch
from peft import PeftModel

from fts_mcp.adapters.spec import EvalJobSpec
from fts_mcp.datasets import read_dataset
from fts_mcp.errors import DatasetInvalid
from fts_mcp.io import write_json_atomic
from fts_mcp.jobs.context import JobContext
from fts_mcp.jobs.models import Artifacts
from fts_mcp.models import loading
from fts_mcp.models.refs import companion_files
from fts_mcp.training.data import encode_chat_prompt, encode_prompt, encode_rows

PROBE_TEXT = "datasets/general_text.txt"
PROBE_TOKENS = 256
FORGETTING_TOLERANCE = 1.2  # general-text perplexity may rise by this factor before it is called forgetting


def examples(spec: EvalJobSpec, tokenizer: Any) -> list[dict[str, Any]]:
    """Held-out examples: {ids, mask, prompt_ids, expected} (prompt_ids/expected only where an answer is
    defined: completion and chat forms)."""
    data = read_dataset(Path(spec.dataset))
    if data.errors:
        raise DatasetInvalid(f"{spec.dataset} has {data.error_count} invalid line(s)",
                             [(e.line, e.message) for e in data.errors], param="dataset")
    rows = data.rows
    if spec.split is not None:  # the training job's own eval split: same rows, same seed, same order
        from datasets import Dataset

        n_eval = math.floor(len(rows) * spec.split.fraction)
        index = Dataset.from_list([{"i": i} for i in range(len(rows))])
        held = index.train_test_split(test_size=n_eval, seed=spec.split.seed)["test"]["i"]
        rows = [rows[i] for i in held]
    rows = rows[: spec.max_examples]
    encoded, errors = encode_rows(tokenizer, data.format, rows)
    if errors:
        raise DatasetInvalid(f"{len(errors)} example(s) cannot be rendered for this model", errors, param="dataset")
    out = []
    for (_, record), enc in zip(rows, encoded, strict=True):
        example = {"ids": enc["input_ids"], "mask": enc["completion_mask"], "prompt_ids": None, "expected": None}
        if data.format == "completion":
            example.update(prompt_ids=encode_prompt(tokenizer, record["prompt"]), expected=record["completion"],
                           prompt=record["prompt"])
        elif data.format == "chat":
            messages = record["messages"]
            example.update(prompt_ids=encode_chat_prompt(tokenizer, messages[:-1]), expected=messages[-1]["content"],
                           prompt=messages[-2]["content"] if len(messages) > 1 else "")
        out.append(example)
    return out


@torch.no_grad()
def completion_loss(model: Any, batch: list[dict[str, Any]]) -> tuple[float, int]:
    """Summed negative log-likelihood of the completion tokens, and how many there were."""
    total, count = 0.0, 0
    for example in batch:
        ids = torch.tensor([example["ids"]], device=model.device)
        labels = ids.clone()
        labels[0, torch.tensor(example["mask"], device=model.device) == 0] = -100
        trained = int((labels[:, 1:] != -100).sum())
        if trained == 0:
            continue
        loss = model(input_ids=ids, labels=labels).loss.float().item()
        total, count = total + loss * trained, count + trained
    return total, count


@torch.no_grad()
def probe_perplexity(model: Any, tokenizer: Any) -> float:
    text = (files("fts_mcp.resources") / PROBE_TEXT).read_text(encoding="utf-8")
    chunks = [line for line in text.splitlines() if line.strip()]
    total, count = 0.0, 0
    for chunk in chunks:
        ids = tokenizer(chunk)["input_ids"][:PROBE_TOKENS]
        if len(ids) < 2:
            continue
        ids_t = torch.tensor([ids], device=model.device)
        loss = model(input_ids=ids_t, labels=ids_t).loss.float().item()
        total, count = total + loss * (len(ids) - 1), count + len(ids) - 1
    return math.exp(total / count) if count else float("nan")


def format_ok(spec: EvalJobSpec, text: str) -> bool:
    if spec.regex is not None:
        return re.fullmatch(spec.regex, text.strip(), flags=re.DOTALL) is not None
    try:
        json.loads(text)
    except ValueError:
        return False
    return True


def structured(text: str) -> bool:
    """Expected answers that are JSON objects or arrays make the format check automatic (a bare 42 or true is
    JSON too, but says nothing about format)."""
    try:
        return isinstance(json.loads(text), dict | list)
    except ValueError:
        return False


def side(model: Any, tokenizer: Any, spec: EvalJobSpec, batch: list[dict[str, Any]], check_format: bool
         ) -> dict[str, Any]:
    total, count = completion_loss(model, batch)
    answers = [loading.generate(model, tokenizer, e["prompt_ids"], max_tokens=spec.max_new_tokens)[0]
               if e["prompt_ids"] is not None else None for e in batch]
    scored = [(a, e["expected"]) for a, e in zip(answers, batch, strict=True) if a is not None]
    result: dict[str, Any] = {
        "loss": round(total / count, 4) if count else None,
        "perplexity": round(math.exp(total / count), 3) if count else None,
        "exact_match": round(sum(a.strip() == x.strip() for a, x in scored) / len(scored), 4) if scored else None,
        "format_ok": round(sum(format_ok(spec, a) for a, _ in scored) / len(scored), 4)
        if scored and check_format else None,
        "general_text_perplexity": round(probe_perplexity(model, tokenizer), 3),
    }
    return result | {"_answers": answers}


def verdict(base: dict[str, Any], tuned: dict[str, Any]) -> tuple[bool, bool, str]:
    """(better, forgot, in words)."""
    if base["exact_match"] is not None and tuned["exact_match"] != base["exact_match"]:
        better = tuned["exact_match"] > base["exact_match"]
        how = f"exact match {base['exact_match']:.0%} -> {tuned['exact_match']:.0%}"
    else:
        better = tuned["loss"] is not None and base["loss"] is not None and tuned["loss"] < base["loss"]
        how = f"loss {base['loss']} -> {tuned['loss']}"
    forgot = tuned["general_text_perplexity"] > FORGETTING_TOLERANCE * base["general_text_perplexity"]
    probe = (f"general-text perplexity {base['general_text_perplexity']} -> {tuned['general_text_perplexity']}"
             f"{' (forgetting: more than +20%)' if forgot else ''}")
    return better, forgot, f"{'better' if better else 'not better'} than the base on this data ({how}); {probe}"


def run(spec: EvalJobSpec, ctx: JobContext) -> Artifacts:
    ctx.phase("loading_model")
    tuned_folder = Path(spec.adapter_dir or spec.merged_dir)
    has_tokenizer = any(f.name.startswith("tokenizer") for f in companion_files(tuned_folder))
    tokenizer = loading.load_tokenizer(str(tuned_folder) if has_tokenizer else spec.base_model,
                                       trust_remote_code=spec.trust_remote_code)
    batch = examples(spec, tokenizer)
    expected = [e["expected"] for e in batch if e["expected"] is not None]
    check_format = spec.answer_format == "json" or spec.regex is not None or \
        (bool(expected) and all(structured(x) for x in expected))
    base = loading.load_model(spec.base_model, trust_remote_code=spec.trust_remote_code).eval()
    ctx.phase("evaluating")
    if spec.adapter_dir:
        model = PeftModel.from_pretrained(base, spec.adapter_dir).eval()
        with model.disable_adapter():
            base_side = side(model, tokenizer, spec, batch, check_format)
        tuned_side = side(model, tokenizer, spec, batch, check_format)
    else:
        base_side = side(base, tokenizer, spec, batch, check_format)
        del base
        merged = loading.load_model(spec.merged_dir, trust_remote_code=spec.trust_remote_code).eval()
        tuned_side = side(merged, tokenizer, spec, batch, check_format)
    base_answers, tuned_answers = base_side.pop("_answers"), tuned_side.pop("_answers")
    better, forgot, summary = verdict(base_side, tuned_side)
    samples = [{"prompt": (e.get("prompt") or "")[:300], "expected": (e["expected"] or "")[:300],
                "base": (b or "")[:300], "adapter": (t or "")[:300]}
               for e, b, t in list(zip(batch, base_answers, tuned_answers, strict=True))[: spec.samples]
               if e["expected"] is not None]
    report = {"examples": len(batch), "base": base_side, "adapter": tuned_side, "better": better, "forgetting": forgot,
              "summary": summary, "samples": samples, "dataset": spec.dataset,
              "split": spec.split.model_dump() if spec.split else None}
    write_json_atomic(ctx.workdir / "eval.json", report)
    brief = [{k: v[:120] for k, v in sample.items()} for sample in samples[:2]]  # the rest: fts://jobs/{id}/eval
    return Artifacts(metrics=str(ctx.workdir / "eval.json"),
                     evaluation={**{k: report[k] for k in ("examples", "base", "adapter", "better", "forgetting",
                                                           "summary")}, "samples": brief})
