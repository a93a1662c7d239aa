from __future__ import annotations

import pytest
import torch
from tests.conftest import SAMPLE_CONVERSATION, make_tiny_tokenizer

from selection.tokenization import (
    IGNORE_INDEX,
    TULU_CHAT_TEMPLATE,
    TokenizedExample,
    collate,
    length_sorted_batches,
    tokenize_conversation,
    tokenize_many,
)


def labelled_text(tokenizer, example: TokenizedExample) -> list[str]:
    """Decode each maximal run of labelled tokens."""
    runs: list[list[int]] = []
    previous_labelled = False
    for token, label in zip(example.input_ids, example.labels):
        labelled = label != IGNORE_INDEX
        if labelled:
            assert label == token
            if not previous_labelled:
                runs.append([])
            runs[-1].append(token)
        previous_labelled = labelled
    return [tokenizer.decode(run) for run in runs]


def test_tulu_fallback_masks_everything_but_assistant_content(tiny_tokenizer):
    example = tokenize_conversation(tiny_tokenizer, SAMPLE_CONVERSATION, max_length=512)
    assert labelled_text(tiny_tokenizer, example) == ["4.</s>", "6, of course.</s>"]
    text = tiny_tokenizer.decode(example.input_ids)
    assert text == (
        "<s><|system|>\nBe brief.\n<|user|>\nWhat is 2+2?\n<|assistant|>\n4.</s>\n"
        "<|user|>\nAnd 3+3?\n<|assistant|>\n6, of course.</s>\n"
    )
    assert example.n_target_tokens == len("4.") + 1 + len("6, of course.") + 1
    assert not example.truncated


def test_chat_template_masks_multi_turn_with_system(chatml_tokenizer):
    example = tokenize_conversation(chatml_tokenizer, SAMPLE_CONVERSATION, max_length=512)
    assert labelled_text(chatml_tokenizer, example) == ["4.<|im_end|>", "6, of course.<|im_end|>"]
    assert chatml_tokenizer.decode(example.input_ids).startswith("<|im_start|>system\nBe brief.<|im_end|>")


def test_tulu_jinja_template_matches_builtin_fallback(tiny_tokenizer):
    templated = make_tiny_tokenizer(chat_template="{{ bos_token }}" + TULU_CHAT_TEMPLATE)
    via_template = tokenize_conversation(templated, SAMPLE_CONVERSATION, max_length=512)
    via_fallback = tokenize_conversation(tiny_tokenizer, SAMPLE_CONVERSATION, max_length=512)
    assert via_template == via_fallback


def test_assistant_text_repeated_in_user_turn_is_not_labelled(chatml_tokenizer):
    messages = [{"role": "user", "content": "Say yes"}, {"role": "assistant", "content": "yes"}]
    example = tokenize_conversation(chatml_tokenizer, messages, max_length=512)
    assert labelled_text(chatml_tokenizer, example) == ["yes<|im_end|>"]


def test_trailing_user_turn_has_no_labels(chatml_tokenizer):
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}, {"role": "user", "content": "?"}]
    example = tokenize_conversation(chatml_tokenizer, messages, max_length=512)
    assert labelled_text(chatml_tokenizer, example) == ["yo<|im_end|>"]


def test_template_that_is_not_prefix_stable_is_refused():
    # Renders the last message differently from earlier ones: spans cannot be located.
    unstable = make_tiny_tokenizer(
        chat_template="{% for m in messages %}{% if loop.last %}[{{ m['content'] }}]{% else %}{{ m['content'] }}{% endif %}{% endfor %}"
    )
    with pytest.raises(ValueError, match="prefix-stable"):
        tokenize_conversation(unstable, SAMPLE_CONVERSATION, max_length=512)


@pytest.mark.parametrize(
    "messages, message",
    [
        ([], "non-empty"),
        ([{"role": "robot", "content": "x"}], "role"),
        ([{"role": "user", "content": 3}], "content must be str"),
        ([{"role": "assistant", "content": "a"}, {"role": "user", "content": "q"}], "must follow a user"),
    ],
)
def test_invalid_messages_raise(tiny_tokenizer, messages, message):
    with pytest.raises(ValueError, match=message):
        tokenize_conversation(tiny_tokenizer, messages, max_length=64)


def test_tulu_fallback_needs_eos():
    tokenizer = make_tiny_tokenizer()
    tokenizer.eos_token = None
    with pytest.raises(ValueError, match="eos_token"):
        tokenize_conversation(tokenizer, SAMPLE_CONVERSATION, max_length=64)


def test_truncation_is_flagged_and_counted(chatml_tokenizer):
    full = tokenize_conversation(chatml_tokenizer, SAMPLE_CONVERSATION, max_length=10_000)
    first_target = next(i for i, label in enumerate(full.labels) if label != IGNORE_INDEX)
    cut_inside_target = first_target + 1
    short = tokenize_conversation(chatml_tokenizer, SAMPLE_CONVERSATION, max_length=cut_inside_target)
    assert short.truncated and len(short.input_ids) == cut_inside_target
    assert short.input_ids == full.input_ids[:cut_inside_target]
    assert short.labels == full.labels[:cut_inside_target]
    assert short.n_target_tokens == 1

    conversations = [SAMPLE_CONVERSATION, SAMPLE_CONVERSATION[:3], [{"role": "user", "content": "only a prompt"}]]
    examples, stats = tokenize_many(chatml_tokenizer, conversations, max_length=first_target)
    assert len(examples) == 3  # aligned 1:1 with the input; nothing dropped silently
    assert stats.truncated_indices == (0, 1)
    assert stats.no_target_indices == (0, 1, 2)
    assert stats.no_target_after_truncation_indices == (0, 1)
    assert stats.usable_indices() == []
    assert stats.as_metrics()["n_truncated"] == 2

    examples, stats = tokenize_many(chatml_tokenizer, conversations, max_length=10_000)
    assert stats.n_truncated == 0 and stats.no_target_indices == (2,) and stats.usable_indices() == [0, 1]
    assert stats.n_target_tokens == sum(e.n_target_tokens for e in examples)


def make_example(length: int, target_from: int = 0) -> TokenizedExample:
    ids = list(range(10, 10 + length))
    labels = [IGNORE_INDEX] * target_from + ids[target_from:]
    return TokenizedExample(ids, labels, truncated=False, n_target_tokens=length - target_from)


def test_collate_right_pads_and_masks_pads():
    batch = collate([make_example(3, target_from=1), make_example(5)], pad_token_id=0)
    assert batch["input_ids"].tolist() == [[10, 11, 12, 0, 0], [10, 11, 12, 13, 14]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]]
    assert batch["labels"].tolist() == [[-100, 11, 12, -100, -100], [10, 11, 12, 13, 14]]
    assert all(tensor.dtype == torch.long for tensor in batch.values())
    with pytest.raises(ValueError):
        collate([], pad_token_id=0)


def test_length_sorted_batches_respect_limits_and_cover_all():
    lengths = [5, 1, 9, 3, 9, 2, 7]
    examples = [make_example(n) for n in lengths]
    batches = length_sorted_batches(examples, max_batch_size=3)
    assert batches == [[2, 4, 6], [0, 3, 5], [1]]
    batches = length_sorted_batches(examples, max_batch_size=4, max_tokens=18)
    assert sorted(i for b in batches for i in b) == list(range(len(lengths)))
    for batch in batches:
        assert len(batch) <= 4
        assert len(batch) == 1 or len(batch) * max(lengths[i] for i in batch) <= 18
    # An example longer than max_tokens still gets its own batch.
    assert length_sorted_batches([make_example(50)], max_batch_size=4, max_tokens=10) == [[0]]
