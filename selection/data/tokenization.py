"""Render conversations to token ids with labels on assistant content only.

A conversation is a list of ``{"role": "system"|"user"|"assistant", "content": str}``.
It is rendered with the tokenizer's chat template when it has one, otherwise with the
Tulu / open-instruct format LESS uses::

    <|system|>\\n{system}\\n<|user|>\\n{user}\\n<|assistant|>\\n{answer}{eos}\\n

Labels are ``-100`` everywhere except on assistant content and the assistant turn's
end-of-turn token (``<|im_end|>``, ``eos`` ...). Labels are *not* shifted: Hugging Face
causal LMs shift internally, so ``labels[i]`` is the target for position ``i``.

Assistant spans are found by rendering prefixes incrementally: for assistant turn ``i``
the template renders ``messages[:i]`` with the generation prompt (text ``P``) and
``messages[:i+1]`` (text ``Q``); ``Q[len(P):]`` is exactly what the model must produce
for that turn. Both must be prefixes of the full rendering, otherwise the template is
not prefix-stable and we refuse (ValueError) rather than guess. The span is mapped to
tokens with the fast tokenizer's offsets mapping; trailing whitespace after the
end-of-turn token (the template's ``\\n`` separator) stays unlabelled.

Truncation (rule ``TRUNCATION_RULE``) never costs an example its response. The *focus*
is the last assistant turn with content; ``P`` tokens precede its content (everything
before it, ending with the template's structure: the end of the previous turn and the
assistant header), ``R`` are its content tokens, anything after is the tail. When the
rendering is longer than ``max_length``:

- ``P + R`` fits: only the tail is cut.
- otherwise the response keeps its first ``max(max_length - P, min(R, max(1, max_length // 2)))``
  tokens (at most ``R``): all the room the prompt leaves, and never less than half of
  ``max_length`` when the response is that long;
- the prompt gets the rest, cut in the middle: its first tokens (BOS, system, the start
  of the conversation) are kept, then the template structure tokens right before the
  response (the end of the previous turn and the assistant header) are kept whole, so
  the response always follows its header. With less room than that structure, its
  last tokens are kept. Earlier assistant turns are prompt: their tokens that survive
  keep their labels.

So every conversation whose last assistant turn renders to at least one labelled token
keeps at least one, and the focus turn's start is always its last labelled run. Each
example says whether its prompt and/or response were cut; :func:`tokenize_many` lists
them, and :class:`TruncationTally` counts them per source. The rule's id is part of
``ModelSpec.fingerprint``, so everything computed from tokenized examples (checkpoints,
gradient features, scores) is recomputed when it changes.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import torch

IGNORE_INDEX = -100
VALID_ROLES = ("system", "user", "assistant")
# Identity of the truncation rule above: change it whenever tokenized outputs change.
TRUNCATION_RULE = "keep-response-start-v1"

# The open-instruct / Tulu chat template as Jinja, for tokenizers that should render
# Tulu-style through apply_chat_template (identical output to the built-in fallback).
TULU_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{ '<|system|>\n' + message['content'] + '\n' }}"
    "{% elif message['role'] == 'user' %}{{ '<|user|>\n' + message['content'] + '\n' }}"
    "{% elif message['role'] == 'assistant' %}"
    "{{ '<|assistant|>\n' + message['content'] + eos_token + '\n' }}"
    "{% endif %}"
    "{% if loop.last and add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
    "{% endfor %}"
)
_TULU_ROLE_HEADER = {"system": "<|system|>\n", "user": "<|user|>\n", "assistant": "<|assistant|>\n"}


@dataclass(frozen=True)
class TokenizedExample:
    input_ids: list[int]
    labels: list[int]  # IGNORE_INDEX on every token that is not assistant content
    truncated: bool  # True if the rendering was longer than max_length and cut
    n_target_tokens: int  # number of labels != IGNORE_INDEX (after truncation)
    prompt_truncated: bool = False  # tokens before the last assistant turn's content were cut
    response_truncated: bool = False  # the last assistant turn's content was cut short

    def __len__(self) -> int:
        return len(self.input_ids)


@dataclass(frozen=True)
class TruncationStats:
    """What tokenization did to a batch of conversations (outputs stay aligned 1:1)."""

    n_examples: int
    truncated_indices: tuple[int, ...] = field(default=())
    # Examples with zero target tokens (no assistant turn left after truncation).
    no_target_indices: tuple[int, ...] = field(default=())
    # Subset of no_target_indices whose targets were all cut away by truncation.
    no_target_after_truncation_indices: tuple[int, ...] = field(default=())
    prompt_truncated_indices: tuple[int, ...] = field(default=())
    response_truncated_indices: tuple[int, ...] = field(default=())
    n_tokens: int = 0
    n_target_tokens: int = 0

    @property
    def n_truncated(self) -> int:
        return len(self.truncated_indices)

    @property
    def n_no_target(self) -> int:
        return len(self.no_target_indices)

    def usable_indices(self) -> list[int]:
        """Indices of examples with at least one target token (the ones to train on)."""
        skip = set(self.no_target_indices)
        return [i for i in range(self.n_examples) if i not in skip]

    def as_metrics(self) -> dict[str, int]:
        return {
            "n_examples": self.n_examples,
            "n_truncated": self.n_truncated,
            "n_no_target": self.n_no_target,
            "n_no_target_after_truncation": len(self.no_target_after_truncation_indices),
            "n_prompt_truncated": len(self.prompt_truncated_indices),
            "n_response_truncated": len(self.response_truncated_indices),
            "n_tokens": self.n_tokens,
            "n_target_tokens": self.n_target_tokens,
        }


def _validate_messages(messages: Sequence[dict]) -> None:
    if not isinstance(messages, Sequence) or isinstance(messages, (str, bytes)) or not messages:
        raise ValueError("messages must be a non-empty list of {'role', 'content'} dicts")
    for position, message in enumerate(messages):
        if not isinstance(message, dict) or "role" not in message or "content" not in message:
            raise ValueError(f"message {position} must be a dict with 'role' and 'content'")
        if message["role"] not in VALID_ROLES:
            raise ValueError(f"message {position} has role {message['role']!r}; expected one of {VALID_ROLES}")
        if not isinstance(message["content"], str):
            raise ValueError(f"message {position} content must be str, got {type(message['content']).__name__}")
    roles = [message["role"] for message in messages]
    if "assistant" in roles and ("user" not in roles or roles.index("assistant") < roles.index("user")):
        raise ValueError("an assistant turn must follow a user turn (the first non-system turn is assistant)")


def _apply_template(tokenizer: Any, messages: Sequence[dict], add_generation_prompt: bool) -> str:
    return tokenizer.apply_chat_template(list(messages), tokenize=False, add_generation_prompt=add_generation_prompt)


# A rendering: the text and, per assistant turn, the character span [start, end) to label and the turn's index.
_Spans = list[tuple[int, int, int]]


def _render_with_chat_template(tokenizer: Any, messages: Sequence[dict]) -> tuple[str, _Spans]:
    full_text = _apply_template(tokenizer, messages, add_generation_prompt=False)
    spans: _Spans = []
    for turn, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        prompt_text = _apply_template(tokenizer, messages[:turn], add_generation_prompt=True)
        turn_text = _apply_template(tokenizer, messages[: turn + 1], add_generation_prompt=False)
        if not turn_text.startswith(prompt_text) or not full_text.startswith(turn_text):
            raise ValueError(
                f"chat template is not prefix-stable at assistant turn {turn}: rendering a prefix of the "
                "conversation does not produce a prefix of the full rendering, so assistant tokens cannot "
                "be located; use a different template (e.g. selection.data.tokenization.TULU_CHAT_TEMPLATE)"
            )
        spans.append((len(prompt_text), len(turn_text), turn))
    return full_text, spans


def _render_tulu(tokenizer: Any, messages: Sequence[dict]) -> tuple[str, _Spans]:
    if tokenizer.eos_token is None:
        raise ValueError("the Tulu fallback template needs tokenizer.eos_token to end assistant turns; set one")
    # open-instruct tokenizes with add_special_tokens=True, i.e. a leading BOS when the model has one.
    parts: list[str] = [tokenizer.bos_token] if tokenizer.bos_token else []
    spans: _Spans = []
    cursor = len(parts[0]) if parts else 0
    for turn, message in enumerate(messages):
        header = _TULU_ROLE_HEADER[message["role"]]
        if message["role"] == "assistant":
            body = message["content"] + tokenizer.eos_token
            spans.append((cursor + len(header), cursor + len(header) + len(body), turn))
        else:
            body = message["content"]
        segment = header + body + "\n"
        parts.append(segment)
        cursor += len(segment)
    return "".join(parts), spans


def has_chat_template(tokenizer: Any) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def _render(tokenizer: Any, messages: Sequence[dict]) -> tuple[str, _Spans]:
    _validate_messages(messages)
    if has_chat_template(tokenizer):
        text, spans = _render_with_chat_template(tokenizer, messages)
    else:
        text, spans = _render_tulu(tokenizer, messages)
    # Leave whitespace after the end-of-turn token (template separators) unlabelled.
    trimmed = [(start, start + len(text[start:end].rstrip()), turn) for start, end, turn in spans]
    return text, [(start, end, turn) for start, end, turn in trimmed if end > start]


def render_conversation(tokenizer: Any, messages: Sequence[dict]) -> tuple[str, list[tuple[int, int]]]:
    """Return the rendered text and the character spans ``[start, end)`` to label."""
    text, spans = _render(tokenizer, messages)
    return text, [(start, end) for start, end, _ in spans]


def _structure_start(tokenizer: Any, messages: Sequence[dict], turn: int, content_start: int) -> int:
    """Character where the template structure before assistant turn ``turn``'s content begins:
    the end of the previous message's content (its end-of-turn marker and the assistant header follow)."""
    if not has_chat_template(tokenizer):
        # Tulu: "{previous content}\n<|assistant|>\n{answer}".
        return content_start - len(_TULU_ROLE_HEADER["assistant"]) - 1
    prompt_text = _apply_template(tokenizer, messages[:turn], add_generation_prompt=True)
    without_header = _apply_template(tokenizer, messages[:turn], add_generation_prompt=False)
    header_start = len(without_header) if prompt_text.startswith(without_header) else content_start
    previous = messages[turn - 1]
    if not previous["content"]:
        return header_start
    try:
        blank = _apply_template(tokenizer, [*messages[: turn - 1], {**previous, "content": ""}], True)
    except Exception:  # noqa: BLE001 - a template may refuse an empty message; the header alone is then kept
        return header_start
    # The content sits where the two renderings differ; what follows it is template structure.
    prefix = 0
    while prefix < min(len(prompt_text), len(blank)) and prompt_text[prefix] == blank[prefix]:
        prefix += 1
    suffix = 0
    while suffix < min(len(prompt_text), len(blank)) - prefix and prompt_text[-1 - suffix] == blank[-1 - suffix]:
        suffix += 1
    content_end = len(prompt_text) - suffix
    return min(content_end, header_start)


def _fit(
    tokenizer: Any,
    messages: Sequence[dict],
    input_ids: list[int],
    labels: list[int],
    offsets: Sequence[tuple[int, int]],
    spans: _Spans,
    max_length: int,
) -> TokenizedExample:
    """Cut a rendering longer than ``max_length`` by the rule in the module docstring."""
    focus = spans[-1] if spans else None
    labelled = (
        []
        if focus is None
        else [i for i, (start, _) in enumerate(offsets) if labels[i] != IGNORE_INDEX and focus[0] <= start < focus[1]]
    )
    if not labelled:  # no response to protect: keep the start
        ids, kept_labels = input_ids[:max_length], labels[:max_length]
        n_target = sum(1 for label in kept_labels if label != IGNORE_INDEX)
        return TokenizedExample(ids, kept_labels, True, n_target, prompt_truncated=True, response_truncated=False)
    response_start, response_end = labelled[0], labelled[-1] + 1
    prompt_len, response_len = response_start, response_end - response_start
    if prompt_len + response_len <= max_length:  # only the tail (separators, trailing turns) is cut
        keep = list(range(max_length))
        prompt_cut = response_cut = False
    else:
        half = min(response_len, max(1, max_length // 2))
        response_keep = min(response_len, max_length, max(max_length - prompt_len, half))
        prompt_keep = max_length - response_keep
        structure_char = _structure_start(tokenizer, messages, focus[2], focus[0])
        structure = response_start
        while structure > 0 and offsets[structure - 1][0] >= structure_char:
            structure -= 1
        structure_len = response_start - structure
        if prompt_keep >= prompt_len:
            prompt = list(range(prompt_len))
        elif prompt_keep >= structure_len:
            prompt = list(range(prompt_keep - structure_len)) + list(range(structure, response_start))
        else:
            prompt = list(range(response_start - prompt_keep, response_start))
        keep = prompt + list(range(response_start, response_start + response_keep))
        prompt_cut, response_cut = prompt_keep < prompt_len, response_keep < response_len
    ids = [input_ids[i] for i in keep]
    kept_labels = [labels[i] for i in keep]
    n_target = sum(1 for label in kept_labels if label != IGNORE_INDEX)
    return TokenizedExample(
        ids, kept_labels, True, n_target, prompt_truncated=prompt_cut, response_truncated=response_cut
    )


def tokenize_conversation(tokenizer: Any, messages: list[dict], max_length: int) -> TokenizedExample:
    if max_length < 1:
        raise ValueError(f"max_length must be >= 1, got {max_length}")
    if not getattr(tokenizer, "is_fast", False):
        raise ValueError("a fast (tokenizers-backed) tokenizer is required: label spans use its offsets mapping")
    text, spans = _render(tokenizer, messages)
    # The rendered text already carries BOS/special tokens where the template wants them.
    encoding = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    input_ids: list[int] = list(encoding["input_ids"])
    offsets = encoding["offset_mapping"]
    labels = [IGNORE_INDEX] * len(input_ids)
    span_index = 0
    for position, (token_start, token_end) in enumerate(offsets):
        # A token belongs to the span it starts in (tokens straddling the span start are prompt).
        while span_index < len(spans) and token_start >= spans[span_index][1]:
            span_index += 1
        if span_index == len(spans):
            break
        span_start, span_end, _ = spans[span_index]
        if span_start <= token_start < span_end and token_end > token_start:
            labels[position] = input_ids[position]
    if len(input_ids) > max_length:
        return _fit(tokenizer, messages, input_ids, labels, offsets, spans, max_length)
    n_target = sum(1 for label in labels if label != IGNORE_INDEX)
    return TokenizedExample(input_ids=input_ids, labels=labels, truncated=False, n_target_tokens=n_target)


def tokenize_many(
    tokenizer: Any, conversations: Iterable[list[dict]], max_length: int
) -> tuple[list[TokenizedExample], TruncationStats]:
    """Tokenize every conversation; the output list is aligned 1:1 with the input.

    Nothing is dropped here: examples without target tokens are listed in the stats
    (``no_target_indices``) so the caller can drop and report them.
    """
    examples: list[TokenizedExample] = []
    truncated: list[int] = []
    no_target: list[int] = []
    no_target_after_truncation: list[int] = []
    for index, messages in enumerate(conversations):
        example = tokenize_conversation(tokenizer, messages, max_length)
        examples.append(example)
        if example.truncated:
            truncated.append(index)
        if example.n_target_tokens == 0:
            no_target.append(index)
            if example.truncated and any(m["role"] == "assistant" for m in messages):
                no_target_after_truncation.append(index)
    stats = TruncationStats(
        n_examples=len(examples),
        truncated_indices=tuple(truncated),
        no_target_indices=tuple(no_target),
        no_target_after_truncation_indices=tuple(no_target_after_truncation),
        prompt_truncated_indices=tuple(i for i in truncated if examples[i].prompt_truncated),
        response_truncated_indices=tuple(i for i in truncated if examples[i].response_truncated),
        n_tokens=sum(len(e.input_ids) for e in examples),
        n_target_tokens=sum(e.n_target_tokens for e in examples),
    )
    return examples, stats


# Which tokens' loss a per-example gradient is taken of (gradient features only; training always
# learns the answers). "response": the assistant's tokens, as LESS. "sequence": every token of the
# rendered conversation, prompt included, so the features carry what the example is about and not
# only its answer's first tokens (see selection.influence.recipes.loss_tokens_why).
LOSS_TOKENS = ("response", "sequence")
LESS_LOSS_TOKENS = "response"


def check_loss_tokens(loss_tokens: str) -> str:
    if loss_tokens not in LOSS_TOKENS:
        raise ValueError(f"loss_tokens must be one of {LOSS_TOKENS}, got {loss_tokens!r}")
    return loss_tokens


def with_loss_on(example: TokenizedExample, loss_tokens: str) -> TokenizedExample:
    """``example`` labelled for a gradient of the ``loss_tokens`` loss. An example without response
    tokens stays as it is (it has no features either way, so the choice never changes what is covered)."""
    if check_loss_tokens(loss_tokens) == LESS_LOSS_TOKENS or example.n_target_tokens == 0:
        return example
    # Position 0 has nothing before it to predict it from; the model's shift leaves it out.
    return replace(example, labels=list(example.input_ids), n_target_tokens=len(example.input_ids) - 1)


class TruncationTally:
    """What truncation did, per group (e.g. pool source or target task), each example id counted once
    (a gradient run tokenizes the same examples again for every checkpoint)."""

    def __init__(self) -> None:
        self._by_id: dict[str, tuple[str, TokenizedExample]] = {}

    def add(self, example_ids: Sequence[str], groups: Sequence[str], examples: Sequence[TokenizedExample]) -> None:
        if not len(example_ids) == len(groups) == len(examples):
            raise ValueError(
                f"ids, groups and examples differ in length: {len(example_ids)}, {len(groups)}, {len(examples)}"
            )
        for example_id, group, example in zip(example_ids, groups, examples):
            self._by_id[example_id] = (group, example)

    def rows(self, group_label: str = "source") -> list[dict[str, Any]]:
        """One row per group (sorted): examples, cut at all, prompt cut, response cut, no response token left."""
        counts: dict[str, list[int]] = {}
        for group, example in self._by_id.values():
            row = counts.setdefault(group, [0, 0, 0, 0, 0])
            flags = (
                True,
                example.truncated,
                example.prompt_truncated,
                example.response_truncated,
                example.n_target_tokens == 0,
            )
            for column, flag in enumerate(flags):
                row[column] += int(flag)
        names = ("examples", "truncated", "prompt_truncated", "response_truncated", "no_response_left")
        return [{group_label: group, **dict(zip(names, row))} for group, row in sorted(counts.items())]


def collate(examples: Sequence[TokenizedExample], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Right-pad to the longest example: input_ids, attention_mask, labels (-100 on pads)."""
    if not examples:
        raise ValueError("cannot collate an empty batch")
    if pad_token_id is None:
        raise ValueError("pad_token_id is None; set a pad token on the tokenizer first")
    longest = max(len(e.input_ids) for e in examples)
    input_ids = torch.full((len(examples), longest), pad_token_id, dtype=torch.long)
    labels = torch.full((len(examples), longest), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((len(examples), longest), dtype=torch.long)
    for row, example in enumerate(examples):
        length = len(example.input_ids)
        input_ids[row, :length] = torch.tensor(example.input_ids, dtype=torch.long)
        labels[row, :length] = torch.tensor(example.labels, dtype=torch.long)
        attention_mask[row, :length] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def length_sorted_batches(
    examples: Sequence[TokenizedExample],
    max_batch_size: int,
    max_tokens: int | None = None,
    max_rows: Callable[[int], int] | None = None,
) -> list[list[int]]:
    """Group example indices into batches of similar length, longest first.

    Each batch holds at most ``max_batch_size`` examples and, when ``max_tokens`` is
    given, at most ``max_tokens`` padded tokens (rows x longest row); an example longer
    than ``max_tokens`` gets a batch of its own. ``max_rows(longest)``, when given, caps the rows
    of a batch whose longest row has that many tokens (``selection.common.memory``: a memory budget).
    Longest first so memory peaks early.
    Ties keep input order, so the result is deterministic.
    """
    if max_batch_size < 1:
        raise ValueError(f"max_batch_size must be >= 1, got {max_batch_size}")
    if max_tokens is not None and max_tokens < 1:
        raise ValueError(f"max_tokens must be >= 1 or None, got {max_tokens}")
    order = sorted(range(len(examples)), key=lambda i: (-len(examples[i].input_ids), i))
    batches: list[list[int]] = []
    current: list[int] = []
    for index in order:
        # Sorted descending, so the batch's first element is its longest row.
        longest = len(examples[current[0]].input_ids) if current else len(examples[index].input_ids)
        too_many_rows = len(current) + 1 > min(max_batch_size, max_rows(longest) if max_rows else max_batch_size)
        too_many_tokens = max_tokens is not None and (len(current) + 1) * longest > max_tokens
        if current and (too_many_rows or too_many_tokens):
            batches.append(current)
            current = []
        current.append(index)
    if current:
        batches.append(current)
    return batches
