"""evaluate_adapter: an adapter trained to answer in a JSON format beats its base on held-out prompts it never
saw, and the report carries the forgetting probe and sample answers; the verdict and the next step follow the task
figures alone (forgetting is advice beside them); a combined adapter is scored against each of its parts on the
part's own data."""

import json
from pathlib import Path

import anyio
import pytest
from mcp import Client

from fts_mcp.adapters.evaluate import kept, verdict
from fts_mcp.answers import next_steps
from fts_mcp.config import Settings
from fts_mcp.core import Core
from fts_mcp.jobs.records import Artifacts, Job
from fts_mcp.jobs.states import JobState
from fts_mcp.server import mcp
from fts_mcp.training.spec import LoraSpec, TrainingSpec
from tests.conftest import FAST_TRAINING, make_adapter, wait_for, write_jsonl

WORDS = ["printer", "laptop", "router", "monitor", "keyboard", "screen", "battery", "mouse", "cable", "server",
         "phone", "tablet", "camera", "speaker", "charger", "drive"]
ANSWER = '{"team": "hardware"}'


@pytest.fixture
def anyio_backend():
    return "asyncio"


async def finished(client, job_id, timeout=240):
    with anyio.fail_after(timeout):
        while True:
            job = (await client.call_tool("job_status", {"job_id": job_id, "wait_seconds": 5})).structured_content
            if job["state"] in ("succeeded", "failed", "cancelled", "interrupted"):
                return job


@pytest.mark.anyio
@pytest.mark.slow
@pytest.mark.extended  # CI's second step (with the real model's evaluation); the verdict's rules are unit-tested below
async def test_a_trained_adapter_beats_its_base_on_held_out_data(fts_home, tiny_model, tmp_path):
    train = write_jsonl(tmp_path / "train.jsonl", [{"prompt": f"Ticket: my {w} is broken\nRoute:", "completion": ANSWER}
                                                   for w in WORDS[:12]])
    held_out = write_jsonl(tmp_path / "held_out.jsonl", [{"prompt": f"Ticket: my {w} is broken\nRoute:",
                                                          "completion": ANSWER} for w in WORDS[12:]])
    async with Client(mcp) as client:
        job = (await client.call_tool("start_qlora_job", {
            "base_model": str(tiny_model), "dataset": str(train), "quantization": "none",
            "lora": {"r": 8, "dropout": 0.0}, "training": {**FAST_TRAINING, "max_steps": 40}})).structured_content
        trained = await finished(client, job["job_id"])
        assert trained["state"] == "succeeded", trained
        assert trained["next"][0]["tool"] == "evaluate_adapter"
        started = await client.call_tool("evaluate_adapter", {"adapter": job["job_id"], "dataset": str(held_out)})
        assert not started.is_error, started.content[0].text
        done = await finished(client, started.structured_content["job_id"])
        assert done["state"] == "succeeded", done
        report = json.loads((await client.read_resource(f"fts://jobs/{done['job_id']}/eval")).contents[0].text)
        missing = await client.call_tool("evaluate_adapter", {"adapter": job["job_id"]})
        # the same comparison for a store reference and for the merged model
        await client.call_tool("deploy_adapter", {"adapter": job["job_id"], "name": "router"})
        merge = (await client.call_tool("merge_adapter", {"adapter": job["job_id"], "dtype": "float32"}))
        merged = await finished(client, merge.structured_content["job_id"])
        both = await client.call_tool("evaluate_adapter", {"adapter": "router@v1", "dataset": str(held_out),
                                                           "answer_format": "json", "regex": ".*"})
        others = []
        for args in ({"adapter": "router@v1"}, {"merged_model": merged["artifacts"]["output_dir"]}):
            started = await client.call_tool("evaluate_adapter", {**args, "dataset": str(held_out),
                                                                  "max_examples": 2})
            assert not started.is_error, started.content[0].text
            others.append(await finished(client, started.structured_content["job_id"]))
    evaluation = done["artifacts"]["evaluation"]
    assert evaluation["examples"] == 4 and report["examples"] == 4
    assert evaluation["adapter"]["exact_match"] == 1.0 > evaluation["base"]["exact_match"]
    assert evaluation["adapter"]["format_ok"] == 1.0  # the expected answers are JSON: checked as such
    assert evaluation["adapter"]["loss"] < evaluation["base"]["loss"] and evaluation["better"]
    assert evaluation["base"]["general_text_perplexity"] > 0 and evaluation["adapter"]["general_text_perplexity"] > 0
    assert evaluation["samples"] and evaluation["samples"][0]["adapter"].strip() == ANSWER
    # better and (on a random tiny model) perhaps worse on general text: the hint follows the verdict alone
    assert evaluation["summary"].startswith("better") and "forg" not in evaluation["summary"]
    assert done["next"][0]["tool"] == "deploy_adapter"
    assert done["next"][0]["arguments"]["adapter"] == job["job_id"]  # what the caller named
    assert ("forgot" in done["next"][0]["why"]) == evaluation["forgetting"] == bool(evaluation["advice"])
    assert missing.is_error and "dataset:" in missing.content[0].text  # no eval split kept: name the fix
    for other in others:
        assert other["state"] == "succeeded", other
        assert other["artifacts"]["evaluation"]["adapter"]["exact_match"] == 1.0
    assert others[0]["next"][0]["arguments"]["adapter"] == "router@v1"  # what the caller named, not a folder
    assert others[1]["next"][0]["tool"] == "generate"
    assert both.is_error and "regex" in both.content[0].text


# ---- the verdict: task figures decide; forgetting is advice ------------------------------------------------------

def figures(exact_match, loss, probe=None):
    return {"exact_match": exact_match, "loss": loss, "general_text_perplexity": probe}


def part(name, alone, combined):
    keeps, how = kept(figures(*alone), figures(*combined))
    return {"name": name, "kept": keeps, "how": how}


VERDICTS = [  # base, tuned, parts, skipped -> better, forgetting, words in the summary, words in the advice
    (figures(0.0, 3.0, 37.5), figures(0.6667, 0.4, 52.1), [], [],
     True, True, ["better than the base", "exact match 0% -> 67%"], ["37.5 -> 52.1 (+39%)", "forgot"]),
    (figures(0.0, 3.0, 37.5), figures(0.6667, 0.4, 40.0), [], [],
     True, False, ["better than the base", "0% -> 67%"], []),
    (figures(0.5, 1.0, 10.0), figures(0.25, 0.8, 30.0), [], [],
     False, True, ["not better", "50% -> 25%"], ["forgot"]),
    (figures(0.0, 3.0, 10.0), figures(0.0, 2.0, 10.0), [], [],
     True, False, ["better", "unchanged at 0%", "loss 3.0 -> 2.0"], []),
    (figures(None, 2.0, 10.0), figures(None, 2.5, 10.0), [], [], False, False, ["not better", "loss 2.0 -> 2.5"], []),
    # a combination that beats the base on the mixed data but lost a part on the part's own data is not better
    (figures(0.0, 3.0, 10.0), figures(0.5, 1.0, 10.0),
     [part("job-aaaaaaaaaaaa", (1.0, 0.1), (1.0, 0.1)), part("job-bbbbbbbbbbbb", (1.0, 0.1), (0.0, 2.0))], [],
     False, False, ["not better", "beats the base", "0% -> 50%", "lost job-bbbbbbbbbbbb",
                    "100% alone -> 0% combined"], []),
    (figures(0.0, 3.0, 10.0), figures(0.5, 1.0, 20.0),
     [part("job-aaaaaaaaaaaa", (1.0, 0.1), (0.9, 0.2))], ["adapters[1] (/x): no training job on record"],
     True, True, ["better", "kept each part", "job-aaaaaaaaaaaa: exact match 100% alone -> 90% combined"],
     ["forgot", "1 part(s) not scored", "adapters[1]"]),
]


@pytest.mark.parametrize("base, tuned, parts, skipped, better, forgetting, said, advised", VERDICTS)
def test_verdict_follows_the_task_figures_and_forgetting_is_advice(base, tuned, parts, skipped, better, forgetting,
                                                                   said, advised):
    found = verdict(base, tuned, parts, skipped)
    assert (found.better, found.forgetting) == (better, forgetting)
    assert all(words in found.summary for words in said), found.summary
    assert "forg" not in found.summary and "general-text" not in found.summary
    assert all(any(words in a for a in found.advice) for words in advised), found.advice
    assert bool(found.advice) == bool(advised)


@pytest.mark.parametrize("alone, combined, keeps", [
    ((1.0, 0.1), (0.8, 0.3), True),
    ((1.0, 0.1), (0.75, 0.3), False),
    ((0.75, 0.1), (0.6, 0.3), True),  # exactly 0.8x, whatever the float rounding
    ((0.0, 1.0), (0.0, 1.2), True),  # nothing matched alone: by loss, within ln(1/0.8)
    ((0.0, 1.0), (0.0, 1.3), False),
    ((None, 1.0), (None, 0.9), True),
])
def test_a_combination_keeps_a_part_at_four_fifths_of_its_score(alone, combined, keeps):
    assert kept(figures(*alone), figures(*combined))[0] is keeps


def eval_job(evaluation, **spec):
    return Job(job_id="job-0123456789ab", kind="eval", state=JobState.SUCCEEDED, created_at="2026-01-01T00:00:00Z",
               updated_at="2026-01-01T00:00:00Z", artifacts=Artifacts(evaluation=evaluation),
               spec={"base_model": "/m/base", "adapter_dir": "/a/adapter", "adapter_ref": "job-00000000000a",
                     "dataset": "/d.jsonl", **spec})


FORGOT = ["general-text perplexity rose 37.5 -> 52.1 (+39%): the adapter forgot some general text"]
NEXT = [  # evaluation, spec -> tools in order, words in the first why, words it must not have
    ({"better": True, "forgetting": True, "advice": FORGOT}, {},
     ["deploy_adapter", "merge_adapter"], ["beats the base", "forgot", "advice"], ["not better"]),
    ({"better": True, "forgetting": False, "advice": []}, {}, ["deploy_adapter", "merge_adapter"], ["beats"],
     ["forgot", "advice"]),
    ({"better": False, "forgetting": False, "advice": []}, {}, ["start_qlora_job"], ["not better"], ["forgot"]),
    ({"better": False, "forgetting": True, "advice": FORGOT}, {}, ["start_qlora_job"], ["not better", "forgot"], []),
    ({"better": False, "forgetting": False, "advice": [],
      "parts": [{"name": "job-aaaaaaaaaaaa", "kept": True}, {"name": "job-bbbbbbbbbbbb", "kept": False}]}, {},
     ["merge_adapter", "start_qlora_job"], ["lost job-bbbbbbbbbbbb"], ["job-aaaaaaaaaaaa", "forgot"]),
    ({"better": True, "forgetting": True, "advice": FORGOT}, {"merged_dir": "/m/merged", "adapter_dir": None},
     ["generate"], ["try the merged model"], []),
    ({"better": False, "forgetting": False, "advice": []}, {"merged_dir": "/m/merged", "adapter_dir": None},
     ["generate"], ["see how it answers"], []),
]


@pytest.mark.parametrize("evaluation, spec, tools, said, unsaid", NEXT)
def test_the_next_step_after_an_evaluation_follows_better(evaluation, spec, tools, said, unsaid):
    steps = next_steps(eval_job(evaluation, **spec))
    assert [s["tool"] for s in steps] == tools
    assert all(words in steps[0]["why"] for words in said), steps[0]["why"]
    assert not any(words in steps[0]["why"] for words in unsaid), steps[0]["why"]
    if tools[0] == "deploy_adapter":
        assert steps[0]["arguments"]["adapter"] == "job-00000000000a"  # what the caller named


# ---- a combined adapter against its parts ---------------------------------------------------------------------

COLOURS = ["apple", "grass", "frog", "leaf", "lime", "pea", "moss", "fern", "kiwi", "olive", "mint", "jade",
           "basil", "sage", "cactus", "algae", "clover", "ivy", "pickle", "emerald"]


@pytest.fixture
def service(fts_home):
    s = Core(Settings.from_env())
    yield s
    s.close()


def finish(service, job, timeout=240):
    done = wait_for(lambda: (j := service.jobs.get(job.job_id)).state.terminal and j, timeout, interval=0.3,
                    what=f"{job.kind} job {job.job_id}")
    assert done.state == "succeeded", (done.error, done.log_tail)
    return done


@pytest.mark.extended
def test_a_combined_adapter_is_scored_against_each_part_on_its_own_data(service, tiny_model, tmp_path):
    """Two adapters memorise different tasks (routing tickets to a JSON answer, with an eval split; naming a
    colour, without one). A combination that keeps only the first (weight 0 for the second) still beats the base
    on the first task, but lost the second on its own data: it is not better, and says which part it lost."""
    routes = write_jsonl(tmp_path / "routes.jsonl", [{"prompt": f"Ticket: my {w} is broken\nRoute:",
                                                      "completion": ANSWER} for w in WORDS])
    colours = write_jsonl(tmp_path / "colours.jsonl", [{"prompt": f"Colour of {w}?\nAnswer:", "completion": "green"}
                                                       for w in COLOURS])
    mixed = write_jsonl(tmp_path / "mixed.jsonl", [{"prompt": f"Ticket: my {w} is broken\nRoute:",
                                                    "completion": ANSWER} for w in ("fan", "disk", "hub")])
    lora = LoraSpec(r=8, dropout=0.0)
    route_job = finish(service, service.training.start(
        str(tiny_model), str(routes), quantization="none", lora=lora,
        training=TrainingSpec(**{**FAST_TRAINING, "max_steps": 40, "eval_fraction": 0.25})))
    colour_job = finish(service, service.training.start(
        str(tiny_model), str(colours), quantization="none", lora=lora,
        training=TrainingSpec(**{**FAST_TRAINING, "max_steps": 40})))
    stranger = make_adapter(tiny_model, tmp_path / "stranger", r=4, seed=5)  # a folder: no job on record
    merge = finish(service, service.merging.merge(
        adapters=[{"adapter": route_job.job_id, "weight": 1.0}, {"adapter": colour_job.job_id, "weight": 0.0},
                  {"adapter": str(stranger), "weight": 0.0}],
        base_model=str(tiny_model), combination="cat", output="adapter", output_name="routes-only", dtype="float32"))
    combined = merge.artifacts.output_dir

    job = service.evaluating.evaluate(combined, dataset=str(mixed))
    assert [p["name"] for p in job.spec["parts"]] == [route_job.job_id, colour_job.job_id]
    assert job.spec["parts"][0]["split"] == {"fraction": 0.25, "seed": 42} and job.spec["parts"][1]["split"] is None
    assert len(job.spec["parts_skipped"]) == 1 and "adapters[2]" in job.spec["parts_skipped"][0]
    done = finish(service, job)
    report = json.loads(Path(done.artifacts.metrics).read_text())
    route, colour = report["parts"]
    assert (route["examples"], colour["examples"]) == (4, len(COLOURS))  # the eval split; the whole training file
    assert "held-out" in route["data"] and "training data" in colour["data"]
    assert route["alone"]["exact_match"] == colour["alone"]["exact_match"] == 1.0  # each memorised its task
    assert route["combined"]["exact_match"] == 1.0 and route["kept"]
    assert colour["combined"]["exact_match"] < 0.8 and not colour["kept"]
    assert report["adapter"]["exact_match"] > report["base"]["exact_match"]  # it does beat the base ...
    assert not report["better"]  # ... but lost a part
    assert report["summary"].startswith("not better") and f"lost {colour_job.job_id}" in report["summary"]
    assert any("adapters[2]" in a for a in report["advice"])
    brief = done.artifacts.evaluation
    assert brief["parts"] == [{"name": route_job.job_id, "alone": 1.0, "combined": 1.0, "kept": True},
                              {"name": colour_job.job_id, "alone": 1.0, "combined": colour["combined"]["exact_match"],
                               "kept": False}]
    assert next_steps(done)[0]["tool"] == "merge_adapter"


# ---- preference pairs ----------------------------------------------------------------------------------------

def test_preference_accuracy_decides_the_verdict_on_pairs():
    base = {**figures(None, 2.0, 10.0), "preference_accuracy": 0.25}
    tuned = {**figures(None, 2.5, 10.0), "preference_accuracy": 0.75}  # under DPO the chosen loss may rise too
    found = verdict(base, tuned)
    assert found.better and "prefers the chosen answer 25% -> 75%" in found.summary
    assert not verdict(tuned, base).better


def independent_preference(model, tokenizer, pairs) -> list[float]:
    """Each pair's log-likelihood margin, chosen minus rejected, from the tokenizer and model directly (the tiny
    model's tokenizer starts nothing with a BOS; answers end with EOS, as in training)."""
    import torch

    margins = []
    for pair in pairs:
        prompt = tokenizer(pair["prompt"], add_special_tokens=False)["input_ids"]
        scores = []
        for answer in (pair["chosen"], pair["rejected"]):
            ids = prompt + tokenizer(answer, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
            with torch.no_grad():
                logits = model(input_ids=torch.tensor([ids])).logits[0]
            logps = torch.log_softmax(logits.float(), -1)
            scores.append(sum(float(logps[i - 1, ids[i]]) for i in range(len(prompt), len(ids))))
        margins.append(scores[0] - scores[1])
    return margins


def test_evaluating_on_pairs_reports_how_often_base_and_adapter_prefer_the_chosen_answer(tiny_model, tmp_path):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from fts_mcp.adapters import evaluate
    from fts_mcp.adapters.spec import EvalJobSpec
    from fts_mcp.jobs.context import recording_context

    pairs = [{"prompt": f"Colour of the {w}?", "chosen": f" {c}", "rejected": f" {d} {w}"}
             for w, c, d in zip(WORDS[:8], COLOURS * 2, reversed(COLOURS * 2), strict=False)]
    data = write_jsonl(tmp_path / "pairs.jsonl", pairs)
    adapter = make_adapter(tiny_model, tmp_path / "adapter", r=8, seed=3)
    spec = EvalJobSpec(base_model=str(tiny_model), adapter_dir=str(adapter), dataset=str(data), samples=2)
    workdir = tmp_path / "job"
    workdir.mkdir()
    ctx, _ = recording_context(workdir)
    report = evaluate.run(spec, ctx).evaluation

    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    base = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32).eval()
    expected_base = independent_preference(base, tokenizer, pairs)
    expected_tuned = independent_preference(PeftModel.from_pretrained(base, adapter).eval(), tokenizer, pairs)
    for side, margins in (("base", expected_base), ("adapter", expected_tuned)):
        assert report[side]["preference_accuracy"] == pytest.approx(sum(m > 0 for m in margins) / len(pairs))
        assert report[side]["logp_margin"] == pytest.approx(sum(margins) / len(pairs), abs=1e-3)
        assert report[side]["loss"] is not None and report[side]["exact_match"] is None  # nothing is generated
    assert expected_base != expected_tuned
    sample = report["samples"][0]
    assert sample["chosen"] == pairs[0]["chosen"] and sample["rejected"] == pairs[0]["rejected"]
    assert sample["base_logp_margin"] == pytest.approx(expected_base[0], abs=1e-2)
