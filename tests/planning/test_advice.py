import pytest
from pydantic import ValidationError

from fts_mcp.planning.advice import Criteria, recommend

CASES = [
    # (criteria, recommendation, text that must appear in the summary or conflicts)
    ({}, "neither_yet", "answer more criteria"),
    ({"output_format": True, "labelled_examples": 2000}, "fine_tune", "behaviour"),
    ({"reasoning_style": True, "labelled_examples": 800, "example_quality": "high"}, "fine_tune", "behaviour"),
    ({"knowledge_changes": "daily"}, "rag", "knowledge"),
    ({"factual_accuracy_with_sources": True, "labelled_examples": 5000}, "rag", "cited"),
    ({"budget": "tight"}, "neither_yet", "a budget alone does not choose"),  # a tie-breaker, not a vote
    ({"maximum_quality": True, "labelled_examples": 5000}, "both", "Both"),
    ({"knowledge_changes": "weekly", "output_format": True, "labelled_examples": 3000}, "both", "use both"),
    ({"budget": "tight", "output_format": True, "labelled_examples": 3000}, "fine_tune", "costs little"),
    ({"budget": "tight", "output_format": True, "labelled_examples": 300, "knowledge_changes": "never"}, "fine_tune",
     "nothing needs retrieving"),
    ({"budget": "tight", "output_format": True, "knowledge_changes": "weekly", "labelled_examples": 3000}, "both",
     "start with RAG"),
    ({"output_format": True, "labelled_examples": 30}, "neither_yet", "too few examples"),
    ({"output_format": True, "labelled_examples": 250, "example_quality": "low"}, "neither_yet", "Not yet"),
    ({"output_format": True, "knowledge_changes": "daily", "labelled_examples": 20}, "rag", "fine-tune later"),
    ({"latency_sensitive": True, "deployment": "edge", "labelled_examples": 1500}, "fine_tune", "behaviour"),
]


@pytest.mark.parametrize("given, expected, phrase", CASES, ids=[f"{c[1]}:{sorted(c[0])}" for c in CASES])
def test_recommendation_table(given, expected, phrase):
    advice = recommend(Criteria(**given))
    assert advice.recommendation == expected
    assert phrase in advice.summary + " ".join(advice.conflicts)
    assert len(advice.criteria) == len(Criteria.model_fields)  # one verdict per criterion, unknown included
    assert {v.criterion for v in advice.criteria if v.verdict == "unknown"} == set(Criteria.model_fields) - set(given)
    assert advice.next_steps and 0.2 <= advice.confidence <= 0.95


def test_conflicts_say_which_side_dominates():
    advice = recommend(Criteria(output_format=True, knowledge_changes="daily", labelled_examples=20))
    assert any("data dominates" in c for c in advice.conflicts)
    assert any("favour RAG" in c for c in advice.conflicts)


def test_more_known_criteria_raise_confidence():
    few = recommend(Criteria(output_format=True, labelled_examples=2000))
    many = recommend(Criteria(output_format=True, labelled_examples=2000, knowledge_changes="never", budget="ample",
                              reasoning_style=True, latency_sensitive=True))
    assert many.confidence > few.confidence


def test_data_guidance_and_cost_range():
    advice = recommend(Criteria(output_format=True, labelled_examples=2000))
    assert advice.data.minimum_for_style == (100, 500) and advice.data.robust_task_learning == (1000, 10000)
    assert advice.data.diminishing_returns_past == 50_000
    assert any("QLoRA on one A100-80GB" in step and "$" in step for step in advice.next_steps)
    assert "returns diminish" in recommend(Criteria(labelled_examples=80_000)).data.assessment


@pytest.mark.parametrize("bad, field", [({"labelled_examples": -1}, "labelled_examples"),
                                         ({"budget": "huge"}, "budget"),
                                         ({"knowledge_changes": "hourly"}, "knowledge_changes"),
                                         ({"vibes": True}, "vibes")])
def test_bad_criteria_name_the_field(bad, field):
    with pytest.raises(ValidationError) as info:
        Criteria(**bad)
    assert field in str(info.value)
