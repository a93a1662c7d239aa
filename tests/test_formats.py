"""Canonical conversations: every format, every reject reason, id stability."""

from __future__ import annotations

import hashlib
import json

import pytest

from selection.data.formats import (
    REASON_CODES,
    RecordRejected,
    canonical_json,
    canonicalize,
    detect_format,
    example_id,
    reason_code,
)

QA = [{"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "4."}]


def rejected(record: object, fmt: str = "auto", **kwargs: int) -> RecordRejected:
    with pytest.raises(RecordRejected) as info:
        canonicalize(record, fmt, **kwargs)
    assert info.value.reason.startswith(f"{info.value.code}: ")
    assert info.value.code in REASON_CODES
    return info.value


@pytest.mark.parametrize(
    "record, fmt",
    [
        ({"messages": QA, "id": "x", "dataset": "tulu"}, "messages"),
        ({"instruction": "What is 2+2?", "input": "", "output": "4."}, "alpaca"),
        ({"instruction": "What is 2+2?", "output": "4."}, "alpaca"),
        ({"conversations": [{"from": "human", "value": "What is 2+2?"}, {"from": "gpt", "value": "4."}]}, "sharegpt"),
        ({"prompt": "What is 2+2?", "completion": "4."}, "prompt_completion"),
        ({"prompt": [QA[0]], "completion": [QA[1]]}, "prompt_completion"),
    ],
)
def test_every_format_gives_the_same_canonical_conversation(record: dict, fmt: str) -> None:
    assert detect_format(record) == fmt
    assert canonicalize(record) == QA
    assert canonicalize(record, fmt) == QA


def test_alpaca_input_is_appended_after_a_blank_line() -> None:
    record = {"instruction": " Translate. ", "input": " Bonjour \n", "output": "Hello"}
    assert canonicalize(record, "alpaca")[0] == {"role": "user", "content": "Translate.\n\nBonjour"}


@pytest.mark.parametrize(
    "speaker, role",
    [
        ("human", "user"),
        ("user", "user"),
        ("gpt", "assistant"),
        ("assistant", "assistant"),
        ("chatgpt", "assistant"),
        ("bard", "assistant"),
        ("model", "assistant"),
        ("Human", "user"),
    ],
)
def test_sharegpt_roles(speaker: str, role: str) -> None:
    first = {"from": "human", "value": "q"}
    turns = [first, {"from": speaker, "value": "a"}, {"from": "gpt", "value": "b"}]
    assert canonicalize({"conversations": turns})[1]["role"] == role


def test_sharegpt_system_and_role_content_turns() -> None:
    turns = [{"from": "system", "value": "Be brief."}, {"role": "user", "content": "q"}, {"from": "gpt", "value": "a"}]
    assert [m["role"] for m in canonicalize({"conversations": turns})] == ["system", "user", "assistant"]


def test_content_is_stripped_and_empty_system_dropped() -> None:
    messages = [
        {"role": "system", "content": "  "},
        {"role": "user", "content": "\n What is 2+2?\r\n"},
        {"role": "assistant", "content": "\t4.  "},
    ]
    assert canonicalize({"messages": messages}) == QA


def test_null_columns_count_as_absent() -> None:
    # A Parquet row of a mixed-format file carries every column.
    row = {
        "messages": None,
        "conversations": None,
        "instruction": "What is 2+2?",
        "input": None,
        "output": "4.",
        "prompt": None,
        "completion": None,
    }
    assert canonicalize(row) == QA


def test_ultrachat_style_prompt_plus_messages_is_messages() -> None:
    assert detect_format({"prompt": "q", "prompt_id": "1", "messages": QA}) == "messages"


REJECT_CASES = [
    ([1, 2], "auto", "not_object", "array"),
    ("text", "messages", "not_object", "string"),
    ({"text": "hi"}, "auto", "unknown_schema", "['text']"),
    ({"messages": QA, "conversations": []}, "auto", "unknown_schema", "ambiguous"),
    ({"instruction": "x", "prompt": "y"}, "auto", "unknown_schema", "ambiguous"),
    ({"output": "x"}, "alpaca", "missing_field", "'instruction'"),
    ({"messages": QA}, "sharegpt", "missing_field", "'conversations'"),
    ({"messages": [{"content": "x"}]}, "auto", "missing_field", "messages[0] has no 'role'"),
    ({"messages": [{"role": "user"}]}, "auto", "missing_field", "messages[0] has no 'content'"),
    ({"conversations": [{"from": "human"}]}, "auto", "missing_field", "no 'value'"),
    ({"messages": "hi"}, "auto", "wrong_type", "field 'messages' is a string"),
    ({"messages": ["hi"]}, "auto", "wrong_type", "messages[0] is a string"),
    ({"messages": [{"role": "user", "content": 5}, QA[1]]}, "auto", "wrong_type", "messages[0].content is a number"),
    ({"messages": [{"role": 1, "content": "x"}]}, "auto", "wrong_type", "messages[0].role is a number"),
    ({"instruction": ["x"], "output": "y"}, "auto", "wrong_type", "field 'instruction'"),
    ({"instruction": "x", "input": 3, "output": "y"}, "auto", "wrong_type", "field 'input'"),
    ({"instruction": "x", "output": {"a": 1}}, "auto", "wrong_type", "field 'output' is a object"),
    ({"prompt": "x", "completion": 1.5}, "auto", "wrong_type", "field 'completion'"),
    ({"messages": [QA[0], {"role": "tool", "content": "x"}]}, "auto", "bad_role", "messages[1].role is 'tool'"),
    ({"conversations": [{"from": "narrator", "value": "x"}]}, "auto", "bad_role", "'narrator'"),
    (
        {"messages": [QA[0], {"role": "system", "content": "x"}, QA[1]]},
        "auto",
        "bad_order",
        "system turn at position 1",
    ),
    ({"messages": [QA[1], QA[0], QA[1]]}, "auto", "bad_order", "starts with an assistant turn"),
    ({"messages": [{"role": "user", "content": " "}, QA[1], QA[0], QA[1]]}, "auto", "empty_turn", "turn 0 (user)"),
    ({"messages": [{"role": "assistant", "content": "hi"}]}, "auto", "no_user_turn", ""),
    ({"messages": [{"role": "system", "content": "s"}]}, "auto", "no_user_turn", ""),
    ({"messages": []}, "auto", "no_user_turn", "0 turns"),
    ({"messages": [QA[0]]}, "auto", "missing_response", "ends with a user turn"),
    (
        {"messages": [QA[0], {"role": "assistant", "content": "  "}]},
        "auto",
        "missing_response",
        "final assistant turn is empty",
    ),
    ({"messages": QA + [QA[0], {"role": "assistant", "content": ""}]}, "auto", "missing_response", "final assistant"),
    (
        {"messages": [QA[0], {"role": "assistant", "content": ""}, {"role": "assistant", "content": ""}]},
        "auto",
        "missing_response",
        "last 2 turns are empty",
    ),
    ({"instruction": "x"}, "auto", "missing_response", "'output'"),
    ({"instruction": "x", "output": None}, "auto", "missing_response", "'output'"),
    ({"prompt": "x"}, "auto", "missing_response", "'completion'"),
    ({"prompt": "x", "completion": "   "}, "auto", "missing_response", "empty"),
]


@pytest.mark.parametrize("record, fmt, code, fragment", REJECT_CASES)
def test_reject_reasons(record: object, fmt: str, code: str, fragment: str) -> None:
    error = rejected(record, fmt)
    assert error.code == code, error.reason
    assert reason_code(error.reason) == code
    assert fragment in error.reason


def test_size_limit() -> None:
    record = {"prompt": "x" * 60, "completion": "y" * 50}
    assert canonicalize(record, max_chars=110)
    error = rejected(record, max_chars=109)
    assert error.code == "too_large" and "110" in error.reason and "109" in error.reason


def test_every_record_level_reason_code_is_covered() -> None:
    # malformed_json and invalid_utf8 come from the readers: tests/test_ingest.py covers them.
    covered = {case[2] for case in REJECT_CASES} | {"too_large"}
    assert covered == set(REASON_CODES) - {"malformed_json", "invalid_utf8"}


def test_unknown_format_name_is_an_error() -> None:
    with pytest.raises(ValueError, match="unknown format 'csv'"):
        canonicalize({"messages": QA}, "csv")


def test_example_id_is_documented_hash_of_canonical_json() -> None:
    text = json.dumps(QA, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    assert canonical_json(QA) == text
    assert example_id(QA) == hashlib.sha256(text.encode("utf-8")).hexdigest()[:32]
    assert len(example_id(QA)) == 32


def test_same_conversation_same_id_across_formats_and_whitespace() -> None:
    variants = [
        {"instruction": "What is 2+2?", "output": "4."},
        {"instruction": "  What is 2+2?\n", "input": "  ", "output": " 4.\r\n"},
        {"messages": [{"role": "system", "content": ""}, *QA]},
        {"conversations": [{"from": "human", "value": "What is 2+2?"}, {"from": "gpt", "value": "4."}]},
        {"prompt": "What is 2+2?", "completion": "4.   "},
    ]
    assert {example_id(canonicalize(v)) for v in variants} == {example_id(QA)}


def test_different_conversations_different_ids() -> None:
    other = [QA[0], {"role": "assistant", "content": "5."}]
    with_system = [{"role": "system", "content": "Be brief."}, *QA]
    assert len({example_id(QA), example_id(other), example_id(with_system)}) == 3


def test_unicode_is_kept_verbatim() -> None:
    messages = canonicalize({"prompt": "Ça va? 你好", "completion": "très bien 🙂"})
    assert "Ça va? 你好" in canonical_json(messages)
