"""Validation with a base model catches, by line, what its chat template cannot render."""

import json
import shutil
import signal
import subprocess

import pytest

from fts_mcp.config import Settings
from fts_mcp.core import Core
from fts_mcp.errors import ModelUnavailable
from tests.conftest import write_jsonl

RAISING_TEMPLATE = (
    "{% for m in messages %}{% if 'FORBIDDEN' in m['content'] %}"
    "{{ raise_exception('this template refuses the word FORBIDDEN') }}{% endif %}"
    "<|{{ m['role'] }}|>{{ m['content'] }}{% if m['role'] == 'assistant' %}{{ eos_token }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}")


def test_a_line_the_chat_template_rejects_is_reported_with_its_number(fts_home, tiny_model, tmp_path):
    model = tmp_path / "strict-model"
    shutil.copytree(tiny_model, model)
    (model / "chat_template.jinja").write_text(RAISING_TEMPLATE)
    config = model / "tokenizer_config.json"
    config.write_text(json.dumps({k: v for k, v in json.loads(config.read_text()).items() if k != "chat_template"}))
    lines = [{"messages": [{"role": "user", "content": f"question {i}"}, {"role": "assistant", "content": "answer"}]}
             for i in range(3)]
    lines[1]["messages"][1]["content"] = "a FORBIDDEN answer"
    data = write_jsonl(tmp_path / "chat.jsonl", lines)
    with Core(Settings.from_env()) as core:
        structural = core.training.validate_dataset(str(data))
        assert structural.ok  # the file itself is fine
        report = core.training.validate_dataset(str(data), base_model=str(model))
    assert not report.ok and report.error_count == 1
    assert report.errors[0].line == 2 and "refuses the word FORBIDDEN" in report.errors[0].message
    assert "Traceback" not in report.errors[0].message
    assert report.token_stats is not None and report.token_stats.total_tokens > 0  # the other lines still count


def model_with_template(tiny_model, folder, template: str):
    """The tiny model with `template` as its chat template (a model folder is outside input, as any dataset)."""
    shutil.copytree(tiny_model, folder)
    (folder / "chat_template.jinja").write_text(template)
    config = folder / "tokenizer_config.json"
    config.write_text(json.dumps({k: v for k, v in json.loads(config.read_text()).items() if k != "chat_template"}))
    return folder


def chats(contents: list[str]) -> list[dict]:
    return [{"messages": [{"role": "user", "content": c}, {"role": "assistant", "content": "answer"}]}
            for c in contents]


def test_a_template_that_renders_an_example_past_the_line_bound_is_refused_before_tokenizing(fts_home, tiny_model,
                                                                                             tmp_path):
    """One line rendered to 300 MB once took 207 s and 11 GB to tokenize: a rendered example may hold no more than
    a line of the dataset (8 MiB), and one that does is a line error naming the model's template."""
    model = model_with_template(tiny_model, tmp_path / "expanding-model", (
        "{% for m in messages %}<|{{ m['role'] }}|>{% if 'EXPAND' in m['content'] %}{{ m['content'] * 1000000 }}"
        "{% else %}{{ m['content'] }}{% endif %}{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}"))
    data = write_jsonl(tmp_path / "chat.jsonl", chats(["question", "EXPAND this", "another question"]))
    with Core(Settings.from_env()) as core:
        report = core.training.validate_dataset(str(data), base_model=str(model))
    assert not report.ok and [e.line for e in report.errors] == [2]
    assert str(model) in report.errors[0].message and "8 MiB" in report.errors[0].message
    assert report.token_stats.max < 100  # the other two lines were counted; the expanded one was never tokenized


def test_the_token_statistics_process_has_a_memory_cap(fts_home, tiny_model, tmp_path):
    """A template that asks for more memory than the cap gets a line error naming the model, not the host's RAM."""
    model = model_with_template(tiny_model, tmp_path / "hungry-model", (
        "{% for m in messages %}{% if 'HUNGRY' in m['content'] %}{{ m['content'] * 322122548 }}{% endif %}"
        "<|{{ m['role'] }}|>{{ m['content'] }}{% endfor %}"))  # 15 characters x 322,122,548: 4.5 GiB, over the cap
    data = write_jsonl(tmp_path / "chat.jsonl", chats(["question", "HUNGRY question"]))
    with Core(Settings.from_env()) as core:
        report = core.training.validate_dataset(str(data), base_model=str(model))
    assert not report.ok and [e.line for e in report.errors] == [2]
    assert str(model) in report.errors[0].message and "4 GiB" in report.errors[0].message


def test_a_token_statistics_process_that_dies_is_reported_by_how_it_ended(fts_home, tiny_model, tmp_path,
                                                                          monkeypatch):
    """A Rust tokenizer that hits the memory cap aborts instead of raising: the answer says so, naming the model."""
    data = write_jsonl(tmp_path / "chat.jsonl", chats(["question"]))
    aborted = subprocess.CompletedProcess([], -signal.SIGABRT, stdout="",
                                          stderr="memory allocation of 5000000000 bytes failed")
    monkeypatch.setattr(subprocess, "run", lambda *args, **kwargs: aborted)
    with Core(Settings.from_env()) as core, pytest.raises(ModelUnavailable) as failed:
        core.training.validate_dataset(str(data), base_model=str(tiny_model))
    assert "SIGABRT" in failed.value.message and str(tiny_model) in failed.value.message
    assert "memory allocation" in failed.value.message


PAIRS = [{"prompt": "Code word for apple:", "chosen": " zebra", "rejected": " copper kettle"},
         {"prompt": "Code word for river:", "chosen": " violin", "rejected": " zebra"}]


def test_the_method_and_the_datas_form_must_agree_naming_the_argument(fts_home, tiny_model, tmp_path):
    from fts_mcp.errors import InvalidArgument
    from tests.conftest import SAMPLE_CHAT

    pairs = write_jsonl(tmp_path / "pairs.jsonl", PAIRS)
    with Core(Settings.from_env()) as core:
        with pytest.raises(InvalidArgument) as sft_on_pairs:
            core.training.start(str(tiny_model), str(pairs))
        with pytest.raises(InvalidArgument) as dpo_on_chat:
            core.training.start(str(tiny_model), str(SAMPLE_CHAT), method="dpo")
        with pytest.raises(InvalidArgument) as unknown:
            core.training.start(str(tiny_model), str(pairs), method="ppo")
        assert not core.jobs.list(None, 10).jobs  # nothing was queued
    assert sft_on_pairs.value.param == "method" and "method='dpo'" in sft_on_pairs.value.message
    assert dpo_on_chat.value.param == "dataset" and "trains on preference lines" in dpo_on_chat.value.message
    assert unknown.value.param == "method" and "'sft'" in unknown.value.message


def test_token_statistics_of_pairs_count_the_longer_sequence_and_both_answers(fts_home, tiny_model, tmp_path):
    from transformers import AutoTokenizer

    from fts_mcp.models.prompts import encode_preference

    pairs = write_jsonl(tmp_path / "pairs.jsonl", PAIRS)
    with Core(Settings.from_env()) as core:
        report = core.training.validate_dataset(str(pairs), base_model=str(tiny_model))
    assert report.ok and report.format == "preference"
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    encoded = [encode_preference(tokenizer, p) for p in PAIRS]
    longest = [len(e["prompt_ids"]) + max(len(e["chosen_ids"]), len(e["rejected_ids"])) for e in encoded]
    stats = report.token_stats
    assert (stats.min, stats.max, stats.total_tokens) == (min(longest), max(longest), sum(longest))
    assert stats.trained_tokens == sum(len(e["chosen_ids"]) + len(e["rejected_ids"]) for e in encoded)
