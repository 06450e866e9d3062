import json

import pytest

from fts_mcp.datafiles import require_valid, validate_dataset
from fts_mcp.errors import DatasetInvalid
from tests.conftest import SAMPLE_CHAT, SAMPLE_COMPLETION, write_jsonl

GOOD_CHAT = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}


@pytest.mark.parametrize("path, fmt", [(SAMPLE_CHAT, "chat"), (SAMPLE_COMPLETION, "completion")])
def test_shipped_samples_are_valid(path, fmt):
    report = validate_dataset(path)
    assert (report.ok, report.format, report.examples) == (True, fmt, 16)
    assert any("only 16 examples" in w for w in report.warnings)


def test_text_form_and_blank_lines(tmp_path):
    report = validate_dataset(write_jsonl(tmp_path / "t.jsonl", [{"text": "a"}, "", {"text": "b"}]))
    assert (report.ok, report.format, report.examples) == (True, "text", 2)


BAD_LINES = [
    ('{"messages": [', "invalid JSON"),
    ("[1, 2]", "expected a JSON object"),
    ({"input": "x", "output": "y"}, "expected a 'messages', 'prompt'+'completion' or 'text' field"),
    ({"messages": []}, "non-empty list"),
    ({"messages": [{"role": "wizard", "content": "x"}, {"role": "assistant", "content": "y"}]},
     "messages[0].role is 'wizard'"),
    ({"messages": [{"role": "user", "content": ""}, {"role": "assistant", "content": "y"}]},
     "messages[0].content is empty"),
    ({"messages": [{"role": "user", "content": 5}, {"role": "assistant", "content": "y"}]},
     "messages[0].content must be a string"),
    ({"messages": [{"role": "user", "content": "q"}]}, "no assistant message"),
    ({"messages": [{"role": "assistant", "content": "a"}, {"role": "user", "content": "q"}]},
     "last message must be from the assistant"),
    ({"messages": ["hi"]}, "messages[0] must be an object"),
    ({"prompt": "p", "completion": ""}, "'completion' is empty"),
    ({"prompt": 3, "completion": "c"}, "'prompt' must be a string"),
    ({"prompt": "p"}, "'completion' must be a string"),
    ({"text": ["a"]}, "'text' must be a string"),
    ({"text": "   "}, "'text' is empty"),
]


GOOD_OF_FORM = {"prompt": {"prompt": "p", "completion": "c"}, "completion": {"prompt": "p", "completion": "c"},
                "text": {"text": "t"}}


def good_line_like(bad) -> dict:
    """A valid line in the same form as `bad`, so the only error is the one under test."""
    keys = bad.keys() if isinstance(bad, dict) else ()
    return next((GOOD_OF_FORM[k] for k in keys if k in GOOD_OF_FORM), GOOD_CHAT)


@pytest.mark.parametrize("bad, message", BAD_LINES, ids=[m for _, m in BAD_LINES])
def test_bad_line_is_reported_with_its_line_number(tmp_path, bad, message):
    report = validate_dataset(write_jsonl(tmp_path / "d.jsonl", [good_line_like(bad), bad, good_line_like(bad)]))
    assert not report.ok and report.examples == 2 and report.error_count == 1
    assert report.errors[0].line == 2
    assert message in report.errors[0].message


def test_mixed_forms_are_refused(tmp_path):
    report = validate_dataset(write_jsonl(tmp_path / "m.jsonl", [GOOD_CHAT, {"text": "x"}]))
    assert not report.ok and report.errors[0].line == 2 and "one form per file" in report.errors[0].message


def test_invalid_utf8_and_empty_file(tmp_path):
    raw = tmp_path / "bin.jsonl"
    raw.write_bytes(json.dumps(GOOD_CHAT).encode() + b"\n\xff\xfe\n")
    report = validate_dataset(raw)
    assert report.errors[0].line == 2 and "UTF-8" in report.errors[0].message
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n\n")
    assert validate_dataset(empty).errors[0].message == "the file has no examples"


def test_require_valid_raises_with_all_line_errors(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [GOOD_CHAT, "{", "nope", GOOD_CHAT])
    with pytest.raises(DatasetInvalid) as info:
        require_valid(path)
    assert [line for line, _ in info.value.errors] == [2, 3]
    assert info.value.param == "dataset" and "line 2" in info.value.message


def test_duplicates_and_size_warnings(tmp_path):
    report = validate_dataset(write_jsonl(tmp_path / "dup.jsonl", [GOOD_CHAT] * 3))
    assert any("2 duplicate examples" in w for w in report.warnings)


@pytest.mark.parametrize("line, column", [
    ('{"messages": [{"role": "user", "content": "a long question that goes on"}', 74),  # cut off at the end
    ('{"text": "fine"} trailing', 18),  # extra data after the object
    ('{"text": "a",, "b": 1}', 14),
])
def test_invalid_json_names_the_column_of_the_error(tmp_path, line, column):
    report = validate_dataset(write_jsonl(tmp_path / "d.jsonl", [{"text": "ok"}, line]))
    (error,) = report.errors
    assert error.line == 2 and f"(column {column})" in error.message, error.message


def chat(*roles: str) -> dict:
    return {"messages": [{"role": r, "content": f"{r} says"} for r in roles]}


@pytest.mark.parametrize("line, words", [
    (chat("assistant", "user", "assistant"), "messages[0].role is 'assistant' where 'user' was expected: a "
                                             "conversation starts with the user"),
    (chat("system", "assistant"), "messages[1].role is 'assistant' where 'user' was expected"),
    (chat("user", "user", "assistant"), "messages[1].role is 'user' where 'assistant' was expected: user and "
                                        "assistant turns must alternate"),
    (chat("user", "system", "assistant"), "a system message may only come first"),
    ('{"text": "bad \\ud800 half"}', "lone surrogate (U+D800)"),
    ('{"prompt": "p", "completion": "x\\udfff"}', "lone surrogate (U+DFFF)"),
    ('{"text": "x", "n": ' + "9" * 5000 + "}", "invalid JSON: Exceeds the limit"),
    ('{"text": "x", "n": ' + "[" * 5000 + "]" * 5000 + "}", "nested deeper than the parser allows"),
])
def test_what_training_would_trip_on_is_caught_with_its_line(tmp_path, line, words):
    first = GOOD_CHAT if "messages" in str(line) else {"prompt": "p", "completion": "c"} if "prompt" in str(line) \
        else {"text": "fine"}
    report = validate_dataset(write_jsonl(tmp_path / "d.jsonl", [first, line]))
    assert not report.ok and report.errors[0].line == 2, report.errors
    assert words in report.errors[0].message, report.errors[0].message


def test_a_system_message_then_alternating_turns_is_fine(tmp_path):
    report = validate_dataset(write_jsonl(tmp_path / "d.jsonl", [chat("system", "user", "assistant", "user",
                                                                      "assistant")]))
    assert report.ok, report.errors


def test_memory_stays_bounded_whatever_the_line(tmp_path, monkeypatch):
    """A 64 MiB single-line file is refused by line length, holding at most one bounded chunk in memory."""
    import tracemalloc

    import fts_mcp.datafiles as datasets

    monkeypatch.setattr(datasets, "MAX_LINE_BYTES", 1 << 20)
    path = tmp_path / "huge.jsonl"
    with path.open("wb") as fh:
        fh.write(b'{"text": "')
        for _ in range(64):
            fh.write(b"a" * (1 << 20))
        fh.write(b'"}\n{"text": "after"}\n')
    tracemalloc.start()
    report = validate_dataset(path)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 8 << 20, f"peak {peak / 2**20:.1f} MiB"
    assert report.errors[0].line == 1 and "longer than 1 MiB" in report.errors[0].message
    assert report.examples == 1  # the line after it is still read


def test_a_file_over_the_size_limit_is_refused_before_reading(tmp_path, monkeypatch):
    import fts_mcp.datafiles as datasets

    monkeypatch.setattr(datasets, "MAX_FILE_BYTES", 100)
    report = validate_dataset(write_jsonl(tmp_path / "d.jsonl", [{"text": "x" * 200}]))
    assert not report.ok and report.errors[0].line == 0 and "GiB a dataset may be" in report.errors[0].message


# ---- preference pairs (method "dpo") ---------------------------------------------------------------------------

PAIR = {"prompt": "Capital of France?", "chosen": "Paris.", "rejected": "I think it might be Lyon."}
CHAT_PAIR = {"prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Capital of France?"}],
             "chosen": [{"role": "assistant", "content": "Paris."}],
             "rejected": [{"role": "assistant", "content": "I think it might be Lyon."}]}


@pytest.mark.parametrize("pair", [PAIR, CHAT_PAIR], ids=["plain", "conversational"])
def test_preference_pairs_in_either_form_are_their_own_format(tmp_path, pair):
    other = pair | {"rejected": "Marseille." if isinstance(pair["prompt"], str) else
                    [{"role": "assistant", "content": "Marseille."}]}
    report = validate_dataset(write_jsonl(tmp_path / "p.jsonl", [pair, other]))
    assert (report.ok, report.format, report.examples) == (True, "preference", 2), report.errors


BAD_PAIRS = [
    ({"prompt": "q", "rejected": "no"}, "missing 'chosen'"),
    ({"prompt": "q", "chosen": "yes"}, "missing 'rejected'"),
    ({"chosen": "yes", "rejected": "no"}, "missing 'prompt'"),
    (PAIR | {"rejected": PAIR["chosen"] + "  "}, "'chosen' and 'rejected' are the same answer"),
    (PAIR | {"chosen": " "}, "'chosen' is empty"),
    (PAIR | {"rejected": [{"role": "assistant", "content": "no"}]}, "'rejected' must be a string like 'prompt'"),
    (CHAT_PAIR | {"rejected": CHAT_PAIR["chosen"]}, "'chosen' and 'rejected' are the same answer"),
    (CHAT_PAIR | {"chosen": "Paris."}, "'chosen' must be a list with one assistant message"),
    (CHAT_PAIR | {"chosen": [{"role": "user", "content": "Paris."}]}, "exactly one message, from the assistant"),
    (CHAT_PAIR | {"prompt": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]},
     "'prompt' must end with a user message"),
    (CHAT_PAIR | {"prompt": [{"role": "user", "content": "q"}, {"role": "user", "content": "q2"}]},
     "prompt[1].role is 'user' where 'assistant' was expected"),
    (CHAT_PAIR | {"prompt": []}, "'prompt' must be a non-empty list"),
]


@pytest.mark.parametrize("bad, message", BAD_PAIRS, ids=[m for _, m in BAD_PAIRS])
def test_a_bad_preference_pair_is_reported_with_its_line(tmp_path, bad, message):
    good = CHAT_PAIR if isinstance(bad.get("prompt"), list) else PAIR
    report = validate_dataset(write_jsonl(tmp_path / "p.jsonl", [good, bad, good]))
    assert not report.ok and report.examples == 2 and report.error_count == 1, report.errors
    assert report.errors[0].line == 2 and message in report.errors[0].message, report.errors[0].message


def test_plain_and_conversational_pairs_do_not_mix_in_one_file(tmp_path):
    report = validate_dataset(write_jsonl(tmp_path / "p.jsonl", [PAIR, CHAT_PAIR, PAIR]))
    assert not report.ok and report.error_count == 1 and report.errors[0].line == 2
    assert "conversational (message lists) form but the file started in plain text form" in report.errors[0].message
    mixed = validate_dataset(write_jsonl(tmp_path / "m.jsonl", [PAIR, {"prompt": "p", "completion": "c"}]))
    assert not mixed.ok and "one form per file" in mixed.errors[0].message
