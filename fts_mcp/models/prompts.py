"""Prompt encoding, one way for every step: a prompt or a conversation to token ids (through the model's chat
template), and a training record to token ids with its loss mask.

The loss mask marks what the model should learn to produce: assistant turns (chat form), the completion
(completion form), or everything (text form); a preference pair is its prompt and two answers, each encoded as
the completion or chat form encodes prompt + answer. Chat records go through the model's own chat template; a model
without one gets `DEFAULT_CHAT_TEMPLATE`. Training, evaluation, generation and the
edge runtime all encode through here, so a prompt is the same tokens everywhere. Needs a tokenizer, not torch.
"""

from __future__ import annotations

from typing import Any

from jinja2 import TemplateError  # chat templates are jinja2 (as transformers renders them)

from fts_mcp.errors import InvalidArgument

# A plain role-tagged template for base models that ship none; it marks the assistant's end with EOS.
DEFAULT_CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}"
    "{% if m['role'] == 'assistant' %}{{ eos_token }}{% endif %}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


def ensure_chat_template(tokenizer: Any) -> None:
    if not getattr(tokenizer, "chat_template", None):
        tokenizer.chat_template = DEFAULT_CHAT_TEMPLATE


def _leading(tokenizer: Any) -> list[int]:
    """The BOS id when this tokenizer starts sequences with one, else nothing."""
    bos = tokenizer.bos_token_id
    if bos is None:
        return []
    probe = tokenizer("a")["input_ids"]
    return [bos] if probe and probe[0] == bos else []


def _ids(tokenizer: Any, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def encode_prompt(tokenizer: Any, prompt: str) -> list[int]:
    """Token ids for a completion-form prompt, exactly as training saw it (for generation)."""
    return _leading(tokenizer) + _ids(tokenizer, prompt)


def encode_chat_prompt(tokenizer: Any, messages: list[dict[str, str]]) -> list[int]:
    ensure_chat_template(tokenizer)
    return _ids(tokenizer, tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True))


def _render(tokenizer: Any, messages: list[dict[str, str]], generation_prompt: bool = False) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)


def _encode_chat(tokenizer: Any, messages: list[dict[str, str]]) -> tuple[list[int], list[int]]:
    messages = [{"role": m["role"], "content": m["content"]} for m in messages]
    full = _render(tokenizer, messages)
    spans: list[tuple[int, int]] = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before = _render(tokenizer, messages[:i], generation_prompt=True)
        after = _render(tokenizer, messages[: i + 1])
        if not (after.startswith(before) and full.startswith(after)):
            raise InvalidArgument("the model's chat template does not render conversations incrementally, so the "
                                  "assistant turns cannot be located for the loss mask; use the completion form "
                                  "(prompt/completion) for this model", param="base_model")
        spans.append((len(before), len(after)))
    ids: list[int] = []
    mask: list[int] = []
    cursor = 0
    for start, end in spans:
        for text, trained in ((full[cursor:start], 0), (full[start:end], 1)):
            if text:
                piece = _ids(tokenizer, text)
                ids += piece
                mask += [trained] * len(piece)
        cursor = end
    if cursor < len(full):
        piece = _ids(tokenizer, full[cursor:])
        ids += piece
        mask += [0] * len(piece)
    return ids, mask


def encode_record(tokenizer: Any, fmt: str, record: dict[str, Any]) -> dict[str, list[int]]:
    """`{"input_ids", "completion_mask"}` for one record (the columns TRL's SFTTrainer takes pre-tokenized)."""
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    if fmt == "chat":
        ensure_chat_template(tokenizer)
        ids, mask = _encode_chat(tokenizer, record["messages"])
    elif fmt == "completion":
        prompt = encode_prompt(tokenizer, record["prompt"])
        completion = _ids(tokenizer, record["completion"]) + eos
        ids, mask = prompt + completion, [0] * len(prompt) + [1] * len(completion)
    else:
        ids = _leading(tokenizer) + _ids(tokenizer, record["text"]) + eos
        mask = [1] * len(ids)
    return {"input_ids": ids, "completion_mask": mask}


def _answer(tokenizer: Any, record: dict[str, Any], answer: str | list[dict[str, str]]) -> tuple[list[int], list[int]]:
    """(prompt ids, answer ids) of one answer to a preference pair's prompt, encoded as the completion form (plain
    text) or the chat form (messages) would encode prompt + answer; the answer is its trained tokens."""
    if isinstance(record["prompt"], str):
        encoded = encode_record(tokenizer, "completion", {"prompt": record["prompt"], "completion": answer})
    else:
        encoded = encode_record(tokenizer, "chat", {"messages": [*record["prompt"], *answer]})
    ids, mask = encoded["input_ids"], encoded["completion_mask"]
    first = mask.index(1) if 1 in mask else len(ids)
    last = len(mask) - mask[::-1].index(1) if 1 in mask else len(ids)
    return ids[:first], ids[first:last]


def encode_preference(tokenizer: Any, record: dict[str, Any]) -> dict[str, list[int]]:
    """`{"prompt_ids", "chosen_ids", "rejected_ids"}` for a preference pair (the columns TRL's DPOTrainer collates):
    each answer encoded after the prompt exactly as an SFT example of the same form would be."""
    prompt, chosen = _answer(tokenizer, record, record["chosen"])
    prompt_again, rejected = _answer(tokenizer, record, record["rejected"])
    if prompt != prompt_again:
        raise InvalidArgument("the chat template renders the prompt differently before each answer, so the two "
                              "answers do not share one prompt; use the plain-text form for this model",
                              param="base_model")
    return {"prompt_ids": prompt, "chosen_ids": chosen, "rejected_ids": rejected}


def encode_rows(tokenizer: Any, fmt: str, rows: list[tuple[int, dict]]) -> tuple[list[dict], list[tuple[int, str]]]:
    """Encode every (line, record); a record the chat template (or the tokenizer) cannot render becomes a
    (line, reason) error instead of failing the whole run without saying where."""
    encoded, errors = [], []
    for line, record in rows:
        try:
            encoded.append(encode_preference(tokenizer, record) if fmt == "preference" else
                           encode_record(tokenizer, fmt, record))
        except InvalidArgument as exc:
            errors.append((line, exc.message))
        except (TemplateError, ValueError, TypeError, KeyError, IndexError) as exc:
            errors.append((line, f"the chat template cannot render it: {type(exc).__name__}: {str(exc)[:300]}"))
    return encoded, errors
