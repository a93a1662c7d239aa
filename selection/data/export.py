"""Selected examples written back in the format their source used (alpaca, sharegpt, prompt/completion, messages)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

SHAREGPT_SPEAKER = {"system": "system", "user": "human", "assistant": "gpt"}


def _single_turn(messages: Sequence[Mapping[str, str]], fmt: str) -> tuple[str | None, str, str]:
    roles = [m["role"] for m in messages]
    if roles not in (["user", "assistant"], ["system", "user", "assistant"]):
        raise ValueError(f"a {fmt} record has exactly one user and one assistant turn; got roles {roles}")
    system = messages[0]["content"] if roles[0] == "system" else None
    return system, messages[-2]["content"], messages[-1]["content"]


def to_source_format(messages: Sequence[Mapping[str, str]], fmt: str) -> dict[str, Any]:
    """The canonical conversation rendered in `fmt`, the format it was read as.

    Alpaca's `input` was appended to the instruction at ingestion, so it comes back inside
    `instruction` (with `input` empty): the conversation, and so the example id, is unchanged.
    """
    if fmt == "messages":
        return {"messages": [dict(m) for m in messages]}
    if fmt == "sharegpt":
        return {"conversations": [{"from": SHAREGPT_SPEAKER[m["role"]], "value": m["content"]} for m in messages]}
    if fmt == "alpaca":
        system, instruction, output = _single_turn(messages, fmt)
        record = {"instruction": instruction, "input": "", "output": output}
        return {**record, "system": system} if system else record
    if fmt == "prompt_completion":
        system, prompt, completion = _single_turn(messages, fmt)
        record = {"prompt": prompt, "completion": completion}
        return {**record, "system": system} if system else record
    raise ValueError(f"unknown source format {fmt!r}; expected messages, sharegpt, alpaca or prompt_completion")
