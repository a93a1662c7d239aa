"""Canonical conversations: turn any supported record format into one list of turns.

Canonical form: a list of ``{"role": ..., "content": ...}`` dicts where

- roles are ``system`` / ``user`` / ``assistant``; a system turn may only come first;
- content is a ``str`` with surrounding whitespace stripped and ``\\r\\n`` / ``\\r`` turned
  into ``\\n`` (so a file edited on Windows gets the same ids); empty system turns are
  dropped (an empty system prompt carries no information and would split ids);
- the first non-system turn is a user turn, no turn other than a dropped system one is
  empty, the conversation ends with a non-empty assistant turn (so there is at least one
  response to a user turn), and the total content is at most ``max_chars`` characters.

Records that cannot be brought into that form raise :class:`RecordRejected`, whose
``reason`` is ``"<code>: <detail>"`` with ``code`` one of :data:`REASON_CODES`, so rejects
can be grouped by code.

Supported record formats (``fmt``):

- ``messages``: Tulu / open-instruct, ``{"messages": [{"role", "content"}, ...]}``.
- ``alpaca``: ``{"instruction", "input" (optional), "output"}``; a non-empty ``input`` is
  appended to the instruction after a blank line.
- ``sharegpt``: ``{"conversations": [{"from", "value"}, ...]}`` (``{"role", "content"}``
  turns are accepted too); ``human``/``user`` -> user, ``gpt``/``assistant``/``chatgpt``/
  ``bard``/``model`` -> assistant, ``system`` -> system.
- ``prompt_completion``: ``{"prompt": str, "completion": str}``, or both as lists of
  ``{"role", "content"}`` turns (TRL's conversational prompt/completion layout).
- ``auto``: detected per record from its keys by :func:`detect_format`.

Keys whose value is ``None`` count as absent: Parquet / Arrow files that mix formats
carry every column on every row, with nulls in the columns a row does not use.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from typing import Any

FORMATS: tuple[str, ...] = ("messages", "alpaca", "sharegpt", "prompt_completion")
DEFAULT_MAX_CHARS = 200_000
ROLES = ("system", "user", "assistant")

# Stable reject codes (first token of every reason). The first two are produced by the
# readers in selection.data.ingest, the rest by canonicalize.
MALFORMED_JSON = "malformed_json"
INVALID_UTF8 = "invalid_utf8"
NOT_OBJECT = "not_object"
UNKNOWN_SCHEMA = "unknown_schema"
MISSING_FIELD = "missing_field"
WRONG_TYPE = "wrong_type"
BAD_ROLE = "bad_role"
BAD_ORDER = "bad_order"
EMPTY_TURN = "empty_turn"
NO_USER_TURN = "no_user_turn"
MISSING_RESPONSE = "missing_response"
TOO_LARGE = "too_large"
REASON_CODES: tuple[str, ...] = (
    MALFORMED_JSON,
    INVALID_UTF8,
    NOT_OBJECT,
    UNKNOWN_SCHEMA,
    MISSING_FIELD,
    WRONG_TYPE,
    BAD_ROLE,
    BAD_ORDER,
    EMPTY_TURN,
    NO_USER_TURN,
    MISSING_RESPONSE,
    TOO_LARGE,
)

SHAREGPT_ROLES: dict[str, str] = {
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "chatgpt": "assistant",
    "bard": "assistant",
    "model": "assistant",
    "system": "system",
}

# Keys that identify a format on their own, and weaker keys that identify it when no
# strong key is present (so an Alpaca record without "output" is rejected as a missing
# response rather than as an unknown schema). UltraChat-style records carry both
# "prompt" and "messages": "prompt" alone is weak, so they are read as messages.
_STRONG_KEYS: dict[str, tuple[str, ...]] = {
    "messages": ("messages",),
    "sharegpt": ("conversations",),
    "alpaca": ("instruction", "output"),
    "prompt_completion": ("prompt", "completion"),
}
_WEAK_KEYS: dict[str, str] = {"alpaca": "instruction", "prompt_completion": "prompt"}


class RecordRejected(ValueError):
    """A record that cannot be canonicalized; ``reason`` is ``"<code>: <detail>"``."""

    def __init__(self, code: str, detail: str) -> None:
        if code not in REASON_CODES:
            raise ValueError(f"unknown reject code {code!r}")
        self.code = code
        self.reason = f"{code}: {detail}"
        super().__init__(self.reason)


def reason_code(reason: str) -> str:
    """The stable code of a reject reason (the part before the first colon)."""
    return reason.split(":", 1)[0]


def _is_mapping(value: Any) -> bool:
    return type(value) is dict or isinstance(value, Mapping)  # exact-type check first: ABC checks are slow


def detect_format(record: Any) -> str:
    """Which format a record is in, from its (non-null) keys; rejects if none or several match."""
    if not _is_mapping(record):
        raise RecordRejected(NOT_OBJECT, f"record is a JSON {_json_type(record)}, expected an object")
    keys = {str(key) for key, value in record.items() if value is not None}
    strong = [fmt for fmt, needed in _STRONG_KEYS.items() if all(key in keys for key in needed)]
    if len(strong) == 1:
        return strong[0]
    if not strong:
        weak = [fmt for fmt, key in _WEAK_KEYS.items() if key in keys]
        if len(weak) == 1:
            return weak[0]
        if not weak:
            raise RecordRejected(UNKNOWN_SCHEMA, f"keys {sorted(keys)}")
        strong = weak
    raise RecordRejected(UNKNOWN_SCHEMA, f"keys {sorted(keys)} are ambiguous between formats {strong}")


def canonicalize(record: Any, fmt: str = "auto", max_chars: int = DEFAULT_MAX_CHARS) -> list[dict[str, str]]:
    """The canonical conversation of ``record`` in format ``fmt``; raises :class:`RecordRejected`."""
    if fmt != "auto" and fmt not in FORMATS:
        raise ValueError(f"unknown format {fmt!r}; expected 'auto' or one of {list(FORMATS)}")
    if not _is_mapping(record):
        raise RecordRejected(NOT_OBJECT, f"record is a JSON {_json_type(record)}, expected an object")
    if fmt == "auto":
        fmt = detect_format(record)
    turns = _TURN_EXTRACTORS[fmt](record)
    return _validate(turns, max_chars)


def canonical_json(messages: list[dict[str, str]]) -> str:
    """The text that ``example_id`` hashes (and that the pool stores as ``messages``)."""
    return json.dumps(messages, sort_keys=True, ensure_ascii=False, separators=(",", ":"))


def example_id(messages: list[dict[str, str]]) -> str:
    """Stable content id of a canonical conversation.

    ``sha256(canonical_json(messages).encode("utf-8")).hexdigest()[:32]``, where the JSON
    has sorted keys, no ASCII escaping and no spaces. It depends only on the canonical
    turns, so the same conversation has the same id whatever file or format it came from.
    """
    return example_id_of_json(canonical_json(messages))


def example_id_of_json(messages_json: str) -> str:
    """``example_id`` given the output of :func:`canonical_json` (avoids dumping twice)."""
    return hashlib.sha256(messages_json.encode("utf-8")).hexdigest()[:32]


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, (int, float)):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, (list, tuple)):
        return "array"
    if isinstance(value, Mapping):
        return "object"
    return type(value).__name__


def _require(record: Mapping[str, Any], field: str, fmt: str, missing_code: str = MISSING_FIELD) -> Any:
    value = record.get(field)
    if value is None:
        raise RecordRejected(missing_code, f"field '{field}' is missing or null (format {fmt})")
    return value


def _require_str(value: Any, where: str) -> str:
    if not isinstance(value, str):
        raise RecordRejected(WRONG_TYPE, f"{where} is a {_json_type(value)}, expected a string")
    return value


def _turn_list(value: Any, field: str) -> list[Any]:
    # Arrow/Parquet list columns come back as lists; tuples are accepted for in-memory sources.
    if not isinstance(value, (list, tuple)):
        raise RecordRejected(WRONG_TYPE, f"field '{field}' is a {_json_type(value)}, expected an array of turns")
    return list(value)


# (canonical role, raw content, where the content came from, for error messages)
Turn = tuple[str, Any, str]


def _role_content_turns(
    turns: list[Any], field: str, role_key: str, content_key: str, role_map: Mapping[str, str] | None
) -> list[Turn]:
    """Turns from a list of dicts; roles mapped through ``role_map`` if given."""
    out: list[Turn] = []
    for index, turn in enumerate(turns):
        where = f"{field}[{index}]"
        if not _is_mapping(turn):
            raise RecordRejected(WRONG_TYPE, f"{where} is a {_json_type(turn)}, expected an object")
        keys = (role_key, content_key)
        if role_map is not None and role_key not in turn and "role" in turn:
            keys = ("role", "content")
        role_field, content_field = keys
        if turn.get(role_field) is None:
            raise RecordRejected(MISSING_FIELD, f"{where} has no '{role_field}'")
        role = _require_str(turn[role_field], f"{where}.{role_field}")
        mapped = role_map.get(role.strip().lower()) if role_map is not None else role if role in ROLES else None
        if mapped is None:
            allowed = sorted(role_map) if role_map is not None else list(ROLES)
            raise RecordRejected(BAD_ROLE, f"{where}.{role_field} is {role!r}, expected one of {allowed}")
        if content_field not in turn:
            raise RecordRejected(MISSING_FIELD, f"{where} has no '{content_field}'")
        out.append((mapped, turn[content_field], f"{where}.{content_field}"))
    return out


def _messages_turns(record: Mapping[str, Any]) -> list[Turn]:
    turns = _turn_list(_require(record, "messages", "messages"), "messages")
    return _role_content_turns(turns, "messages", "role", "content", None)


def _sharegpt_turns(record: Mapping[str, Any]) -> list[Turn]:
    turns = _turn_list(_require(record, "conversations", "sharegpt"), "conversations")
    return _role_content_turns(turns, "conversations", "from", "value", SHAREGPT_ROLES)


def _alpaca_turns(record: Mapping[str, Any]) -> list[Turn]:
    instruction = _require_str(_require(record, "instruction", "alpaca"), "field 'instruction'")
    extra = record.get("input")
    if extra is not None:
        extra = _require_str(extra, "field 'input'").strip()
        if extra:
            instruction = f"{instruction.strip()}\n\n{extra}"
    output = _require(record, "output", "alpaca", missing_code=MISSING_RESPONSE)
    return [("user", instruction, "field 'instruction'"), ("assistant", output, "field 'output'")]


def _prompt_completion_turns(record: Mapping[str, Any]) -> list[Turn]:
    prompt = _require(record, "prompt", "prompt_completion")
    completion = _require(record, "completion", "prompt_completion", missing_code=MISSING_RESPONSE)
    if isinstance(prompt, (list, tuple)) and isinstance(completion, (list, tuple)):
        return _role_content_turns(list(prompt), "prompt", "role", "content", None) + _role_content_turns(
            list(completion), "completion", "role", "content", None
        )
    return [("user", prompt, "field 'prompt'"), ("assistant", completion, "field 'completion'")]


_TURN_EXTRACTORS = {
    "messages": _messages_turns,
    "alpaca": _alpaca_turns,
    "sharegpt": _sharegpt_turns,
    "prompt_completion": _prompt_completion_turns,
}


def _clean(content: Any, where: str) -> str:
    text = _require_str(content, where)
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as error:
        # Valid JSON can spell a lone surrogate ("\ud800"); no UTF-8 text can hold it.
        bad = text[error.start : error.end]
        raise RecordRejected(
            INVALID_UTF8,
            f"{where} holds {bad!r} at character {error.start}, which UTF-8 cannot encode (a lone surrogate)",
        ) from None
    if "\r" in text:
        text = text.replace("\r\n", "\n").replace("\r", "\n")
    return text.strip()


def _validate(turns: list[Turn], max_chars: int) -> list[dict[str, str]]:
    texts = [_clean(content, where) for _, content, where in turns]
    # Empty turns at the end (e.g. an unanswered assistant slot) mean the response is missing.
    n_kept = len(texts)
    while n_kept and not texts[n_kept - 1] and turns[n_kept - 1][0] != "system":
        n_kept -= 1
    if n_kept < len(texts):
        n_empty = len(texts) - n_kept
        what = f"the final {turns[-1][0]} turn is empty" if n_empty == 1 else f"the last {n_empty} turns are empty"
        raise RecordRejected(MISSING_RESPONSE, f"{what} (turn {len(turns) - 1})")

    messages: list[dict[str, str]] = []
    n_chars = 0
    for index, ((role, _, _), text) in enumerate(zip(turns, texts)):
        if role == "system":
            if messages or index > 0:
                raise RecordRejected(BAD_ORDER, f"system turn at position {index}; a system turn may only come first")
            if not text:
                continue
        elif not text:
            raise RecordRejected(EMPTY_TURN, f"turn {index} ({role}) is empty")
        n_chars += len(text)
        messages.append({"role": role, "content": text})

    if n_chars > max_chars:
        raise RecordRejected(TOO_LARGE, f"{n_chars} characters of content exceed the limit of {max_chars}")
    dialogue = [m["role"] for m in messages if m["role"] != "system"]
    if "user" not in dialogue:
        raise RecordRejected(NO_USER_TURN, f"no user turn among {len(turns)} turns")
    if dialogue[0] != "user":
        raise RecordRejected(BAD_ORDER, "the conversation starts with an assistant turn, expected a user turn first")
    if dialogue[-1] != "assistant":
        raise RecordRejected(MISSING_RESPONSE, "the conversation ends with a user turn that has no response")
    return messages
