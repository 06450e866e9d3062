"""`recommend_ft_vs_rag`: is fine-tuning the right tool? One verdict and reason per criterion, then a decision.

The framework: knowledge that changes often -> RAG; a specific output format -> fine-tune; domain jargon ->
either or both; factual accuracy with sources -> RAG; a custom reasoning style -> fine-tune; maximum quality ->
both. Budget is a tie-breaker, not a vote: it orders the work (RAG first when both are needed) and sizes the run,
but never recommends a method the task does not need. Fine-tuning needs data: 100-500 high-quality examples to teach a
style, 1K-10K for robust task learning, diminishing returns past ~50K; quality beats quantity.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from fts_mcp.datafiles import DIMINISHING_RETURNS, MIN_USEFUL_EXAMPLES, ROBUST_RANGE
from fts_mcp.planning.estimate import REFERENCE_SHAPES
from fts_mcp.planning.gpus import find_gpu
from fts_mcp.planning.memory import throughput

ASSUMED_TOKENS_PER_EXAMPLE = 512
ASSUMED_EPOCHS = 3

Verdict = Literal["fine_tune", "rag", "both", "either", "neutral", "unknown"]
Recommendation = Literal["fine_tune", "rag", "both", "neither_yet"]
STYLE_RANGE = (MIN_USEFUL_EXAMPLES, 500)
QUALITY_REASONS = {
    "low": "low-quality examples teach their mistakes: clean them first (they count for about a third)",
    "mixed": "mixed quality: filter the worst examples before training; quality beats quantity",
    "high": "high-quality examples make even a few hundred enough for a style",
}


class Criteria(BaseModel):
    """What is known about the use case. Every field is optional: null means unknown."""

    model_config = ConfigDict(extra="forbid")

    knowledge_changes: Literal["never", "yearly", "monthly", "weekly", "daily", "realtime"] | None = Field(
        None, description="how often the facts change")
    output_format: bool | None = Field(None, description="a set output format or schema")
    reasoning_style: bool | None = Field(None, description="a style to learn")
    domain_jargon: bool | None = Field(None, description="vocabulary general models lack")
    factual_accuracy_with_sources: bool | None = Field(
        None, description="exact facts with sources")
    budget: Literal["tight", "moderate", "ample"] | None = None
    maximum_quality: bool | None = Field(None, description="best quality is the aim")
    labelled_examples: int | None = Field(None, ge=0, le=1_000_000_000, description="labelled examples available")
    example_quality: Literal["low", "mixed", "high"] | None = None
    latency_sensitive: bool | None = Field(None, description="no time for a retrieval hop")
    deployment: Literal["cloud", "on_prem", "edge"] | None = None


class CriterionVerdict(BaseModel):
    criterion: str
    value: str | int | bool | None
    verdict: Verdict
    reason: str


class DataGuidance(BaseModel):
    minimum_for_style: tuple[int, int] = STYLE_RANGE
    robust_task_learning: tuple[int, int] = ROBUST_RANGE
    diminishing_returns_past: int = DIMINISHING_RETURNS
    assessment: str


class Advice(BaseModel):
    recommendation: Recommendation
    confidence: float = Field(ge=0, le=1)
    summary: str
    criteria: list[CriterionVerdict]
    conflicts: list[str] = Field(default_factory=list, description="criteria that pull in different directions")
    data: DataGuidance
    next_steps: list[str]


def _verdicts(c: Criteria) -> list[CriterionVerdict]:
    def v(name: str, value, verdict: Verdict, reason: str) -> CriterionVerdict:
        if value is None:
            return CriterionVerdict(criterion=name, value=None, verdict="unknown", reason="not given")
        return CriterionVerdict(criterion=name, value=value, verdict=verdict, reason=reason)

    changing = c.knowledge_changes in ("monthly", "weekly", "daily", "realtime")
    return [
        v("knowledge_changes", c.knowledge_changes, "rag" if changing else "neutral",
          "facts that change often belong in a retrievable index, not in weights that need retraining"
          if changing else "stable knowledge can live in the weights, but this alone is no reason to fine-tune"),
        v("output_format", c.output_format, "fine_tune" if c.output_format else "neutral",
          "a fixed output format or schema is behaviour, which fine-tuning teaches reliably"
          if c.output_format else "no special format to learn"),
        v("reasoning_style", c.reasoning_style, "fine_tune" if c.reasoning_style else "neutral",
          "a custom reasoning or writing style is learned from examples, not retrieved"
          if c.reasoning_style else "the base model's style is acceptable"),
        v("domain_jargon", c.domain_jargon, "either" if c.domain_jargon else "neutral",
          "jargon is helped both by retrieved definitions and by fine-tuning on in-domain text"
          if c.domain_jargon else "general vocabulary"),
        v("factual_accuracy_with_sources", c.factual_accuracy_with_sources,
          "rag" if c.factual_accuracy_with_sources else "neutral",
          "retrieval grounds answers in documents it can cite; fine-tuned facts cannot be traced or updated"
          if c.factual_accuracy_with_sources else "citations are not required"),
        v("budget", c.budget, "neutral",
          "a tie-breaker, not a vote: when both are needed start with the cheaper RAG; a QLoRA adapter on a small "
          "base costs little" if c.budget == "tight" else f"a {c.budget} budget allows a training run"),
        v("maximum_quality", c.maximum_quality, "both" if c.maximum_quality else "neutral",
          "the best results combine a fine-tuned model (behaviour) with retrieval (knowledge)"
          if c.maximum_quality else "good-enough quality is the aim"),
        v("labelled_examples", c.labelled_examples, _data_verdict(c), _data_reason(c)),
        v("example_quality", c.example_quality, "neutral", QUALITY_REASONS.get(c.example_quality or "", "")),
        v("latency_sensitive", c.latency_sensitive, "fine_tune" if c.latency_sensitive else "neutral",
          "a fine-tuned small model answers without a retrieval hop or long stuffed prompts"
          if c.latency_sensitive else "a retrieval hop is affordable"),
        v("deployment", c.deployment, "fine_tune" if c.deployment == "edge" else "neutral",
          "on the edge a small base with a LoRA adapter avoids shipping and querying an index"
          if c.deployment == "edge" else f"{c.deployment} deployment suits either"),
    ]


def _usable_examples(c: Criteria) -> int | None:
    if c.labelled_examples is None:
        return None
    return c.labelled_examples // 3 if c.example_quality == "low" else c.labelled_examples


def _data_verdict(c: Criteria) -> Verdict:
    n = _usable_examples(c)
    if n is None:
        return "unknown"
    return "neutral" if n < MIN_USEFUL_EXAMPLES else "fine_tune"


def _data_reason(c: Criteria) -> str:
    n, given = _usable_examples(c), c.labelled_examples
    if n is None:
        return "not given"
    low = " (low quality counts for about a third)" if c.example_quality == "low" else ""
    if n < MIN_USEFUL_EXAMPLES:
        return f"{given} examples{low} is below the ~{MIN_USEFUL_EXAMPLES} needed to teach even a style"
    if n < STYLE_RANGE[1]:
        return f"{given} examples{low}: enough for a style or format, thin for a task"
    if n < ROBUST_RANGE[0]:
        return f"{given} examples{low}: enough for style; robust task learning wants {ROBUST_RANGE[0]:,}+"
    if n > DIMINISHING_RETURNS:
        return f"{given:,} examples: plenty; past ~{DIMINISHING_RETURNS:,} returns diminish, prefer a clean subset"
    return f"{given:,} examples{low}: in the {ROBUST_RANGE[0]:,}-{ROBUST_RANGE[1]:,} range for robust task learning"


def _data_guidance(c: Criteria) -> DataGuidance:
    return DataGuidance(assessment=_data_reason(c) if c.labelled_examples is not None else
                        "unknown: count your labelled examples; quality matters more than quantity")


def recommend(c: Criteria) -> Advice:
    """Pure: the criteria in, a recommendation with a verdict and reason per criterion out."""
    verdicts = _verdicts(c)
    ft = [v for v in verdicts if v.verdict == "fine_tune" and v.criterion != "labelled_examples"]
    rag = [v for v in verdicts if v.verdict == "rag"]
    want_both = any(v.verdict == "both" for v in verdicts)
    usable = _usable_examples(c)
    too_little_data = usable is not None and usable < MIN_USEFUL_EXAMPLES
    conflicts: list[str] = []

    if ft and rag:
        conflicts.append(f"{', '.join(v.criterion for v in rag)} favour RAG while "
                         f"{', '.join(v.criterion for v in ft)} favour fine-tuning: they solve different problems "
                         "(knowledge vs behaviour), so use both")
    if ft and too_little_data:
        conflicts.append(f"{', '.join(v.criterion for v in ft)} call for fine-tuning, but there are too few "
                         "examples: data dominates, since a fine-tune on too little data memorises")

    if ft and too_little_data:
        recommendation: Recommendation = "rag" if rag else "neither_yet"
    elif want_both or (ft and rag):
        recommendation = "both" if not too_little_data else ("rag" if rag else "neither_yet")
    elif ft:
        recommendation = "fine_tune"
    elif rag:
        recommendation = "rag"
    else:
        recommendation = "neither_yet"

    known = sum(v.verdict != "unknown" for v in verdicts)
    confidence = 0.35 + 0.5 * known / len(verdicts) - (0.1 if conflicts else 0.0)
    if recommendation == "neither_yet" and not ft and not rag:
        confidence = min(confidence, 0.5)
    return Advice(recommendation=recommendation, confidence=round(max(0.2, min(0.95, confidence)), 2),
                  summary=_summary(recommendation, ft, rag, too_little_data, c), criteria=verdicts,
                  conflicts=conflicts, data=_data_guidance(c), next_steps=_next_steps(recommendation, c))


def _summary(rec: Recommendation, ft, rag, too_little_data: bool, c: Criteria) -> str:
    if rec == "neither_yet":
        if too_little_data:
            return (f"Not yet: {c.labelled_examples} examples cannot teach a model reliably. Prompt-engineer "
                    f"(few-shot) now and collect {MIN_USEFUL_EXAMPLES}-{STYLE_RANGE[1]} high-quality examples.")
        return ("Nothing here calls for fine-tuning or retrieval yet: try prompting first, or answer more criteria "
                "(what must change: a format or style, or knowledge?)" +
                ("; a budget alone does not choose a method." if c.budget is not None else "."))
    if rec == "rag" and ft and too_little_data:
        return "RAG now for the knowledge; fine-tune later, once enough examples exist for the behaviour."
    return {
        "fine_tune": "Fine-tune: what must change is behaviour (format, style, latency), which training teaches"
                     + ("; with a tight budget, QLoRA on a small base (0.5-3B) costs little and nothing needs "
                        "retrieving." if c.budget == "tight" else "."),
        "rag": "RAG: what matters is knowledge that changes or must be cited, which retrieval serves better.",
        "both": "Both: retrieval for knowledge that changes or must be cited, a fine-tune for behaviour"
                + ("; with a tight budget start with RAG and add a QLoRA adapter after" if c.budget == "tight"
                   else "."),
    }[rec]


def _cost_range(examples: int) -> str:
    """QLoRA time and cost for 8B and 13B shapes on one A100-80GB at its list price."""
    gpu = find_gpu("A100-80GB")
    tokens = examples * ASSUMED_TOKENS_PER_EXAMPLE * ASSUMED_EPOCHS
    runs = [throughput(REFERENCE_SHAPES[name], "qlora", gpu, 1, True, tokens, gpu.usd_per_hour, None)
            for name in ("Llama-3.1-8B", "Llama-2-13B")]
    return (f"Expected run: {examples:,} examples x ~{ASSUMED_TOKENS_PER_EXAMPLE} tokens x {ASSUMED_EPOCHS} epochs = "
            f"{tokens / 1e6:.1f}M tokens; QLoRA on one A100-80GB takes about {runs[0].hours:.1f}-{runs[1].hours:.1f} h "
            f"(8B-13B), ${runs[0].cost_usd:,.2f}-${runs[1].cost_usd:,.2f} at ${gpu.usd_per_hour}/h")


def _next_steps(rec: Recommendation, c: Criteria) -> list[str]:
    steps: list[str] = []
    if rec in ("fine_tune", "both"):
        steps += ["Start with QLoRA on a 7-13B instruct model: it trains on one 24-48 GB GPU "
                  "(estimate_resources gives the memory, time and cost for your data)",
                  "Put the examples in JSONL (chat or prompt/completion) and run validate_dataset; hold out 5-10% "
                  "(training.eval_fraction) to watch for overfitting",
                  "Launch with start_qlora_job (r=16, alpha=32, all-linear) and follow it with job_status"]
        if c.labelled_examples:
            steps.append(_cost_range(c.labelled_examples))
    if rec in ("rag", "both"):
        steps.append("Build a retrieval index over the source documents and cite the retrieved passages")
    if rec == "neither_yet":
        steps += [f"Collect {MIN_USEFUL_EXAMPLES}-{STYLE_RANGE[1]} high-quality examples (more for a task: "
                  f"{ROBUST_RANGE[0]:,}-{ROBUST_RANGE[1]:,}); quality matters more than quantity",
                  "Meanwhile, prompt-engineer with a few examples in the prompt and measure the gap"]
    if c.labelled_examples is None and rec != "rag":
        steps.append("Count the labelled examples you have: it decides whether fine-tuning is viable now")
    return steps
