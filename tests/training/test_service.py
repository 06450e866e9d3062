"""Validation with a base model catches, by line, what its chat template cannot render."""

import json
import shutil

from fts_mcp.config import Settings
from fts_mcp.core import Core
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
