import pytest
from transformers import AutoTokenizer

from fts_mcp.models.prompts import DEFAULT_CHAT_TEMPLATE, encode_chat_prompt, encode_prompt, encode_record


@pytest.fixture(scope="module")
def tokenizer(tiny_model):
    return AutoTokenizer.from_pretrained(tiny_model)


def trained_text(tokenizer, encoded) -> str:
    ids = [i for i, m in zip(encoded["input_ids"], encoded["completion_mask"], strict=True) if m]
    return tokenizer.decode(ids)


def test_chat_loss_is_on_every_assistant_turn_only(tokenizer):
    messages = [{"role": "system", "content": "S"}, {"role": "user", "content": "Q1"},
                {"role": "assistant", "content": "A1"}, {"role": "user", "content": "Q2"},
                {"role": "assistant", "content": "A2"}]
    encoded = encode_record(tokenizer, "chat", {"messages": messages})
    assert trained_text(tokenizer, encoded) == "A1</s>A2</s>"
    full = tokenizer.decode(encoded["input_ids"])
    assert full == tokenizer.apply_chat_template(messages, tokenize=False)


def test_chat_prompt_for_generation_matches_training_prefix(tokenizer):
    messages = [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "A"}]
    encoded = encode_record(tokenizer, "chat", {"messages": messages})
    prompt = encode_chat_prompt(tokenizer, messages[:1])
    assert encoded["input_ids"][: len(prompt)] == prompt
    assert encoded["completion_mask"][: len(prompt)] == [0] * len(prompt)


def test_completion_loss_covers_completion_and_eos(tokenizer):
    encoded = encode_record(tokenizer, "completion", {"prompt": "Code word for apple:", "completion": " zebra"})
    assert trained_text(tokenizer, encoded) == " zebra</s>"
    prompt = encode_prompt(tokenizer, "Code word for apple:")
    assert encoded["input_ids"][: len(prompt)] == prompt


def test_text_trains_on_everything(tokenizer):
    encoded = encode_record(tokenizer, "text", {"text": "hello"})
    assert all(encoded["completion_mask"]) and tokenizer.decode(encoded["input_ids"]) == "hello</s>"


def test_model_without_template_gets_the_default(tiny_model, tmp_path):
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    tokenizer.chat_template = None
    encoded = encode_record(tokenizer, "chat", {"messages": [{"role": "user", "content": "Q"},
                                                             {"role": "assistant", "content": "A"}]})
    assert tokenizer.chat_template == DEFAULT_CHAT_TEMPLATE
    assert trained_text(tokenizer, encoded).startswith("A</s>")
