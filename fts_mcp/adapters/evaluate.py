"""The evaluation recipe: the base model against the base with the adapter (or a merged model), side by side,
on held-out data. Answers the question an agent is asked: is the adapter better on my task, and did the model
forget anything?

For each side: loss and perplexity on the expected answers (completion tokens only), exact match of greedy
answers, a format check (valid JSON, or a regular expression) when the expected answers have one, perplexity on
general text shipped in resources/ (the forgetting probe), and a few sample answers. On preference pairs
(prompt, chosen, rejected) the loss is the chosen answer's, and each side also reports how often it finds the
chosen answer more likely than the rejected one (`preference_accuracy`, summed log-probabilities, as DPO compares
them) and the mean margin; that accuracy decides the verdict. A combined adapter (a
merge of several) is also scored against each of its parts alone on that part's own data. The verdict (better or
not) comes from the task figures alone; forgetting is advice beside it, never a reversal. `run(spec, ctx)` runs
in a job's work horse; models load through `fts_mcp.models.loading`.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Sequence
from importlib.resources import files
from pathlib import Path
from typing import Any, NamedTuple

import torch
from peft import PeftModel

from fts_mcp.adapters.spec import EvalJobSpec, EvalPart
from fts_mcp.datafiles import read_dataset
from fts_mcp.errors import DatasetInvalid
from fts_mcp.files import write_json_atomic
from fts_mcp.jobs.context import JobContext
from fts_mcp.jobs.records import Artifacts
from fts_mcp.models import loading
from fts_mcp.models.prompts import encode_chat_prompt, encode_prompt, encode_rows
from fts_mcp.models.refs import companion_files

PROBE_TEXT = "datasets/general_text.txt"
PROBE_TOKENS = 256
ANSWER_MARGIN = 16  # tokens generated past the longest expected answer (for the samples shown)
FORGETTING_TOLERANCE = 1.2  # general-text perplexity may rise by this factor before it is called forgetting
KEEP = 0.8  # a combined adapter keeps a part when it scores at least this share of the part's own exact match


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
        if data.format == "preference":  # scored on the chosen answer (loss) and on the pair (preference)
            ids = enc["prompt_ids"] + enc["chosen_ids"]
            out.append({"ids": ids, "mask": [0] * len(enc["prompt_ids"]) + [1] * len(enc["chosen_ids"]),
                        "prompt_ids": None, "expected": None, "pair": enc, "record": record})
            continue
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
def answer_logp(model: Any, prompt_ids: list[int], answer_ids: list[int]) -> float:
    """Log-likelihood of an answer after its prompt: its tokens' log-probabilities summed (what DPO compares)."""
    ids = torch.tensor([prompt_ids + answer_ids], device=model.device)
    logits = model(input_ids=ids, use_cache=False).logits[0, :-1].float()
    scored = torch.log_softmax(logits, dim=-1).gather(-1, ids[0, 1:, None])[:, 0]
    return float(scored[max(0, len(prompt_ids) - 1):].sum())


def preference(model: Any, batch: list[dict[str, Any]]) -> dict[str, Any]:
    """On preference pairs: how often the model finds the chosen answer more likely than the rejected one, and the
    mean log-likelihood margin (chosen minus rejected); the per-pair margins for the samples."""
    margins = [answer_logp(model, e["pair"]["prompt_ids"], e["pair"]["chosen_ids"])
               - answer_logp(model, e["pair"]["prompt_ids"], e["pair"]["rejected_ids"]) for e in batch if "pair" in e]
    if not margins:
        return {}
    return {"preference_accuracy": round(sum(m > 0 for m in margins) / len(margins), 4),
            "logp_margin": round(sum(margins) / len(margins), 4), "_margins": margins}


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


def answer_budget(spec: EvalJobSpec, tokenizer: Any, batch: list[dict[str, Any]]) -> int:
    """New tokens to generate: enough for the longest expected answer and its end, plus a margin for the samples
    (an answer longer than that cannot match anyway), never more than max_new_tokens."""
    expected = [len(tokenizer(e["expected"], add_special_tokens=False)["input_ids"]) for e in batch
                if e["expected"] is not None]
    return min(spec.max_new_tokens, max(expected) + ANSWER_MARGIN) if expected else spec.max_new_tokens


def same_answer(answer: str, expected: str) -> bool:
    """Exact match, where two JSON texts that parse to the same value also match (spacing and key order aside)."""
    answer, expected = answer.strip(), expected.strip()
    if answer == expected:
        return True
    if structured(expected):
        try:
            return json.loads(answer) == json.loads(expected)
        except ValueError:
            return False
    return False


def side(model: Any, tokenizer: Any, spec: EvalJobSpec, batch: list[dict[str, Any]], check_format: bool, *,
         probe: bool = True) -> dict[str, Any]:
    total, count = completion_loss(model, batch)
    asked = [e for e in batch if e["prompt_ids"] is not None]
    replies = iter(loading.greedy_batch(model, tokenizer, [e["prompt_ids"] for e in asked],
                                        max_tokens=answer_budget(spec, tokenizer, asked)))
    answers = [next(replies) if e["prompt_ids"] is not None else None for e in batch]
    scored = [(a, e["expected"]) for a, e in zip(answers, batch, strict=True) if a is not None]
    result: dict[str, Any] = {
        "loss": round(total / count, 4) if count else None,
        "perplexity": round(math.exp(total / count), 3) if count else None,
        "exact_match": round(sum(same_answer(a, x) for a, x in scored) / len(scored), 4) if scored else None,
        "format_ok": round(sum(format_ok(spec, a) for a, _ in scored) / len(scored), 4)
        if scored and check_format else None,
    }
    result |= preference(model, batch)
    if probe:
        result["general_text_perplexity"] = round(probe_perplexity(model, tokenizer), 3)
    return result | {"_answers": answers}


class Verdict(NamedTuple):
    """Better or not, and by which measure (`summary`); advice beside it never changes `better`."""

    better: bool
    summary: str
    forgetting: bool
    advice: list[str]


def compared(base: dict[str, Any], tuned: dict[str, Any]) -> tuple[bool, str]:
    """Better on the task or not, and how it was decided: preference accuracy (preference pairs) or exact match
    where it moved, else loss."""
    if base.get("preference_accuracy") is not None and tuned["preference_accuracy"] != base["preference_accuracy"]:
        return (tuned["preference_accuracy"] > base["preference_accuracy"],
                f"prefers the chosen answer {base['preference_accuracy']:.0%} -> {tuned['preference_accuracy']:.0%}")
    if base["exact_match"] is not None and tuned["exact_match"] != base["exact_match"]:
        return (tuned["exact_match"] > base["exact_match"],
                f"exact match {base['exact_match']:.0%} -> {tuned['exact_match']:.0%}")
    better = tuned["loss"] is not None and base["loss"] is not None and tuned["loss"] < base["loss"]
    unchanged = f"exact match unchanged at {base['exact_match']:.0%}; " if base["exact_match"] is not None else ""
    return better, f"{unchanged}loss {base['loss']} -> {tuned['loss']}"


def kept(alone: dict[str, Any], combined: dict[str, Any]) -> tuple[bool, str]:
    """Whether a combination keeps what a part does on the part's own data: at least KEEP x the part's exact
    match, or, where the part alone matches nothing, a loss at most ln(1/KEEP) above its own (perplexity at
    most 1/KEEP x)."""
    if alone["exact_match"] and combined["exact_match"] is not None:
        return (combined["exact_match"] + 1e-9 >= KEEP * alone["exact_match"],
                f"exact match {alone['exact_match']:.0%} alone -> {combined['exact_match']:.0%} combined")
    if alone["loss"] is None or combined["loss"] is None:
        return True, "nothing to compare: no answers scored"
    return (combined["loss"] <= alone["loss"] + math.log(1 / KEEP) + 1e-9,
            f"loss {alone['loss']} alone -> {combined['loss']} combined")


def verdict(base: dict[str, Any], tuned: dict[str, Any], parts: Sequence[dict[str, Any]] = (),
            skipped: Sequence[str] = ()) -> Verdict:
    """Better than the base on this data (and, for a combination, keeping every part scored on its own data), in
    words; forgetting and unscored parts are advice."""
    better, how = compared(base, tuned)
    lost = [p for p in parts if not p["kept"]]
    if lost:
        losses = "; ".join(f"{p['name']} on its own data ({p['how']})" for p in lost)
        summary = (f"not better: {'beats' if better else 'does not beat'} the base on this data ({how})"
                   f"{' but' if better else ' and'} lost {losses}")
        better = False
    else:
        summary = f"{'better' if better else 'not better'} than the base on this data ({how})"
        if parts:
            summary += "; kept each part on its own data (" + "; ".join(f"{p['name']}: {p['how']}" for p in parts) \
                + ")"
    advice = []
    before, after = base.get("general_text_perplexity"), tuned.get("general_text_perplexity")
    forgot = before is not None and after is not None and after > FORGETTING_TOLERANCE * before
    if forgot:
        advice.append(f"general-text perplexity rose {before} -> {after} (+{after / before - 1:.0%}): the adapter "
                      "forgot some general text; fewer epochs or a lower learning rate keep more")
    if skipped:
        advice.append(f"{len(skipped)} part(s) not scored on their own data: " + "; ".join(skipped))
    return Verdict(better, summary, forgot, advice)


def tokenizer_for(folder: Path, spec: EvalJobSpec, fallback: Any = None) -> Any:
    """The tokenizer saved beside an adapter or model (the chat template it was trained with), else the fallback,
    else the base's."""
    if any(f.name.startswith("tokenizer") for f in companion_files(folder)):
        return loading.load_tokenizer(str(folder), trust_remote_code=spec.trust_remote_code)
    return fallback if fallback is not None else loading.load_tokenizer(spec.base_model,
                                                                         trust_remote_code=spec.trust_remote_code)


def checks_format(spec: EvalJobSpec, batch: list[dict[str, Any]]) -> bool:
    expected = [e["expected"] for e in batch if e["expected"] is not None]
    return spec.answer_format == "json" or spec.regex is not None or \
        (bool(expected) and all(structured(x) for x in expected))


def score_part(model: PeftModel, spec: EvalJobSpec, part: EvalPart, index: int, tokenizer: Any) -> dict[str, Any]:
    """One part of a combination alone, then the combination (the PeftModel's `default` adapter), on the part's
    own data; the part is loaded beside the combination on the same base and removed after."""
    part_spec = spec.model_copy(update={"dataset": part.dataset, "split": part.split, "answer_format": None,
                                        "regex": None})
    tokenizer = tokenizer_for(Path(part.adapter_dir), spec, tokenizer)
    batch = examples(part_spec, tokenizer)
    check_format = checks_format(part_spec, batch)
    name = f"part{index}"
    model.load_adapter(part.adapter_dir, adapter_name=name)
    try:
        model.set_adapter(name, inference_mode=True)
        alone = side(model, tokenizer, part_spec, batch, check_format, probe=False)
    finally:
        model.set_adapter("default", inference_mode=True)
        model.delete_adapter(name)
    combined = side(model, tokenizer, part_spec, batch, check_format, probe=False)
    for scored in (alone, combined):
        scored.pop("_answers"), scored.pop("_margins", None)
    keeps, how = kept(alone, combined)
    return {"name": part.name, "dataset": part.dataset, "split": part.split.model_dump() if part.split else None,
            "data": "its training job's held-out split" if part.split else
            "its training data (its job kept no eval split): how well the task is remembered, not held out",
            "examples": len(batch), "alone": alone, "combined": combined, "kept": keeps, "how": how}


def pair_sample(record: dict[str, Any], base: float, tuned: float) -> dict[str, Any]:
    """A preference pair as the report shows it: the texts, and how much more likely each side finds chosen."""
    text = lambda value: value if isinstance(value, str) else value[-1]["content"]  # noqa: E731 - messages or text
    return {"prompt": text(record["prompt"])[:300], "chosen": text(record["chosen"])[:300],
            "rejected": text(record["rejected"])[:300], "base_logp_margin": round(base, 3),
            "adapter_logp_margin": round(tuned, 3)}


def run(spec: EvalJobSpec, ctx: JobContext) -> Artifacts:
    ctx.phase("loading_model")
    tokenizer = tokenizer_for(Path(spec.adapter_dir or spec.merged_dir), spec)
    batch = examples(spec, tokenizer)
    check_format = checks_format(spec, batch)
    base = loading.load_model(spec.base_model, trust_remote_code=spec.trust_remote_code,
                              quantization=spec.quantization).eval()
    ctx.phase("evaluating")
    parts = []
    if spec.adapter_dir:
        model = PeftModel.from_pretrained(base, spec.adapter_dir).eval()
        with model.disable_adapter():
            base_side = side(model, tokenizer, spec, batch, check_format)
        tuned_side = side(model, tokenizer, spec, batch, check_format)
        parts = [score_part(model, spec, part, i, tokenizer) for i, part in enumerate(spec.parts)]
    else:
        base_side = side(base, tokenizer, spec, batch, check_format)
        del base
        merged = loading.load_model(spec.merged_dir, trust_remote_code=spec.trust_remote_code).eval()
        tuned_side = side(merged, tokenizer, spec, batch, check_format)
    base_answers, tuned_answers = base_side.pop("_answers"), tuned_side.pop("_answers")
    found = verdict(base_side, tuned_side, parts, spec.parts_skipped)
    samples = [{"prompt": (e.get("prompt") or "")[:300], "expected": (e["expected"] or "")[:300],
                "base": (b or "")[:300], "adapter": (t or "")[:300]}
               for e, b, t in list(zip(batch, base_answers, tuned_answers, strict=True))[: spec.samples]
               if e["expected"] is not None]
    if "_margins" in base_side:  # preference pairs: each side's log-likelihood margin, chosen minus rejected
        samples = [pair_sample(e["record"], b, t) for e, b, t in
                   zip(batch, base_side.pop("_margins"), tuned_side.pop("_margins"), strict=False)][: spec.samples]
    report = {"examples": len(batch), "base": base_side, "adapter": tuned_side, "better": found.better,
              "forgetting": found.forgetting, "summary": found.summary, "advice": found.advice, "samples": samples,
              "dataset": spec.dataset, "split": spec.split.model_dump() if spec.split else None}
    if spec.parts or spec.parts_skipped:
        report |= {"parts": parts, "parts_skipped": spec.parts_skipped}
    write_json_atomic(ctx.workdir / "eval.json", report)
    brief = {k: report[k] for k in ("examples", "base", "adapter", "better", "forgetting", "summary", "advice")}
    brief["samples"] = [{k: v[:120] if isinstance(v, str) else v for k, v in sample.items()}  # fts://jobs/{id}/eval
                        for sample in samples[:2]]
    if "parts" in report:
        brief["parts"] = [{"name": p["name"], "alone": p["alone"]["exact_match"],
                           "combined": p["combined"]["exact_match"], "kept": p["kept"]} for p in parts]
    return Artifacts(metrics=str(ctx.workdir / "eval.json"), evaluation=brief)
