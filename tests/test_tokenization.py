from __future__ import annotations

import random

import pytest
import torch

from selection.data import tokenization
from selection.data.tokenization import (
    IGNORE_INDEX,
    TULU_CHAT_TEMPLATE,
    TokenizedExample,
    TruncationTally,
    collate,
    length_sorted_batches,
    tokenize_conversation,
    tokenize_many,
)
from selection.train.models import ModelSpec
from tests.conftest import CHATML_TEMPLATE, SAMPLE_CONVERSATION, make_tiny_tokenizer


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
    messages = [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "yo"},
        {"role": "user", "content": "?"},
    ]
    example = tokenize_conversation(chatml_tokenizer, messages, max_length=512)
    assert labelled_text(chatml_tokenizer, example) == ["yo<|im_end|>"]


def test_template_that_is_not_prefix_stable_is_refused():
    # Renders the last message differently from earlier ones: spans cannot be located.
    unstable = make_tiny_tokenizer(
        chat_template=(
            "{% for m in messages %}{% if loop.last %}[{{ m['content'] }}]{% else %}{{ m['content'] }}"
            "{% endif %}{% endfor %}"
        )
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


def _decoded_runs(tokenizer, example: TokenizedExample) -> tuple[str, list[str]]:
    """The decoded text before the last labelled run, and each labelled run decoded."""
    runs = labelled_text(tokenizer, example)
    last = max(i for i, label in enumerate(example.labels) if label != IGNORE_INDEX)
    first_of_last = last
    while first_of_last > 0 and example.labels[first_of_last - 1] != IGNORE_INDEX:
        first_of_last -= 1
    return tokenizer.decode(example.input_ids[:first_of_last]), runs


HEADER = "<|im_end|>\n<|im_start|>assistant\n"  # the template structure before a ChatML response
# SmolLM2-Instruct's own template (ChatML that adds a default system turn when there is none).
SMOLLM2_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}"
    "{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def test_long_prompt_is_cut_in_the_middle_and_the_response_keeps_its_start(chatml_tokenizer):
    prompt, answer = "P" * 10 + "Q" * 200, "A" * 10 + "B" * 200
    messages = [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}]
    example = tokenize_conversation(chatml_tokenizer, messages, max_length=80)
    assert len(example.input_ids) == 80 and example.truncated
    assert example.prompt_truncated and example.response_truncated
    before, runs = _decoded_runs(chatml_tokenizer, example)
    # Half of max_length for the response, its start; the prompt keeps its start and the whole structure.
    assert runs == ["A" * 10 + "B" * 30]
    assert before.endswith(HEADER) and before.startswith("<|im_start|>user\nPPPPPPPPPPQ")
    assert len(chatml_tokenizer(before, add_special_tokens=False)["input_ids"]) == 40


def test_short_prompt_leaves_the_response_all_the_room(chatml_tokenizer):
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "A" * 300}]
    full = tokenize_conversation(chatml_tokenizer, messages, max_length=10_000)
    example = tokenize_conversation(chatml_tokenizer, messages, max_length=100)
    assert example.input_ids == full.input_ids[:100] and example.labels == full.labels[:100]
    assert example.response_truncated and not example.prompt_truncated


def test_long_prompt_with_short_response_keeps_the_whole_response(chatml_tokenizer):
    messages = [
        {"role": "system", "content": "S" * 10},
        {"role": "user", "content": "U" * 300},
        {"role": "assistant", "content": "yes"},
    ]
    example = tokenize_conversation(chatml_tokenizer, messages, max_length=60)
    before, runs = _decoded_runs(chatml_tokenizer, example)
    assert runs == ["yes<|im_end|>"] and len(example.input_ids) == 60
    assert example.prompt_truncated and not example.response_truncated
    assert before.startswith("<|im_start|>system\nSSSS") and before.endswith("UUU" + HEADER)


def test_multi_turn_keeps_the_last_assistant_turn_start(chatml_tokenizer):
    messages = [
        *SAMPLE_CONVERSATION[:3],
        {"role": "user", "content": "Q" * 300},
        {"role": "assistant", "content": "final " * 40},
        {"role": "user", "content": "trailing"},
    ]
    example = tokenize_conversation(chatml_tokenizer, messages, max_length=150)
    before, runs = _decoded_runs(chatml_tokenizer, example)
    # The earlier answer is in the kept start of the prompt and keeps its labels.
    assert runs[0] == "4.<|im_end|>" and runs[-1] == ("final " * 40)[:75]
    assert before.endswith("user\nQQ" + HEADER) and len(example.input_ids) == 150
    assert "trailing" not in chatml_tokenizer.decode(example.input_ids)


def test_only_the_tail_is_cut_when_prompt_and_response_fit(chatml_tokenizer):
    messages = [
        {"role": "user", "content": "q"},
        {"role": "assistant", "content": "a"},
        {"role": "user", "content": "T" * 100},
    ]
    full = tokenize_conversation(chatml_tokenizer, messages, max_length=10_000)
    example = tokenize_conversation(chatml_tokenizer, messages, max_length=30)
    assert example.input_ids == full.input_ids[:30] and example.n_target_tokens == full.n_target_tokens
    assert example.truncated and not example.prompt_truncated and not example.response_truncated


@pytest.mark.parametrize("template", [None, CHATML_TEMPLATE, SMOLLM2_TEMPLATE, "{{ bos_token }}" + TULU_CHAT_TEMPLATE])
def test_truncation_never_removes_the_response(template):
    """Random conversations and lengths: every example with an assistant turn keeps response tokens,
    fits max_length, labels only assistant text, and keeps the start of its last answer after its header."""
    tokenizer = make_tiny_tokenizer(chat_template=template)
    rng = random.Random(0)
    words = ["alpha", "beta", "gamma", "delta", "x", "?", "\n"]

    def text(limit: int) -> str:
        return " ".join(rng.choice(words) for _ in range(rng.randint(0, limit)))

    for _ in range(150):
        messages = [{"role": "system", "content": text(30)}] if rng.random() < 0.3 else []
        for _ in range(rng.randint(1, 3)):
            messages += [{"role": "user", "content": text(80)}, {"role": "assistant", "content": text(80)}]
        if rng.random() < 0.2:
            messages.append({"role": "user", "content": text(20)})
        max_length = rng.randint(2, 300)
        full = tokenize_conversation(tokenizer, messages, max_length=100_000)
        example = tokenize_conversation(tokenizer, messages, max_length=max_length)
        assert len(example.input_ids) == len(example.labels) <= max_length
        assert example.n_target_tokens >= 1
        assert example.truncated == (len(full.input_ids) > max_length)
        if not example.truncated:
            assert example == full
            continue
        answers = [m["content"] for m in messages if m["role"] == "assistant"]
        chatml = template in (CHATML_TEMPLATE, SMOLLM2_TEMPLATE)
        eos = "<|im_end|>" if chatml else "</s>"
        runs = labelled_text(tokenizer, example)
        assert all(any(run in answer + eos for answer in answers) for run in runs)
        # The last run is the start of the last answer.
        last_answer = list(labelled_text(tokenizer, full))[-1]
        assert last_answer.startswith(runs[-1])
        if max_length >= 40:  # room for the template structure before the response
            before, _ = _decoded_runs(tokenizer, example)
            assert before.endswith(HEADER if chatml else "<|assistant|>\n")


def test_truncation_is_flagged_and_counted(chatml_tokenizer):
    long_answer = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "A" * 100}]
    long_prompt = [{"role": "user", "content": "U" * 100}, {"role": "assistant", "content": "a"}]
    conversations = [SAMPLE_CONVERSATION, long_answer, long_prompt, [{"role": "user", "content": "only a prompt" * 9}]]
    examples, stats = tokenize_many(chatml_tokenizer, conversations, max_length=50)
    assert len(examples) == 4  # aligned 1:1 with the input; nothing dropped silently
    assert stats.truncated_indices == (0, 1, 2, 3)
    assert stats.prompt_truncated_indices == (0, 2, 3) and stats.response_truncated_indices == (1,)
    assert stats.no_target_indices == (3,) and stats.no_target_after_truncation_indices == ()
    assert stats.usable_indices() == [0, 1, 2]
    metrics = stats.as_metrics()
    assert (metrics["n_truncated"], metrics["n_prompt_truncated"], metrics["n_response_truncated"]) == (4, 3, 1)

    examples, stats = tokenize_many(chatml_tokenizer, conversations, max_length=10_000)
    assert stats.n_truncated == 0 and stats.no_target_indices == (3,) and stats.usable_indices() == [0, 1, 2]
    assert stats.n_target_tokens == sum(e.n_target_tokens for e in examples)


def test_truncation_tally_counts_each_id_once_per_source(chatml_tokenizer):
    long_answer = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "A" * 100}]
    examples, _ = tokenize_many(chatml_tokenizer, [SAMPLE_CONVERSATION, long_answer, long_answer[:1]], max_length=50)
    tally = TruncationTally()
    tally.add(["a", "b", "c"], ["alpaca", "arena", "arena"], examples)
    tally.add(["b"], ["arena"], examples[1:2])  # the same example again (another checkpoint)
    assert tally.rows() == [
        {
            "source": "alpaca",
            "examples": 1,
            "truncated": 1,
            "prompt_truncated": 1,
            "response_truncated": 0,
            "no_response_left": 0,
        },
        {
            "source": "arena",
            "examples": 2,
            "truncated": 1,
            "prompt_truncated": 0,
            "response_truncated": 1,
            "no_response_left": 1,
        },
    ]
    with pytest.raises(ValueError, match="differ in length"):
        tally.add(["a"], [], examples[:1])


def test_truncation_rule_is_part_of_the_model_fingerprint(monkeypatch):
    spec = ModelSpec(name="m", source="/models/m")
    before = spec.fingerprint()
    monkeypatch.setattr(tokenization, "TRUNCATION_RULE", "another-rule")
    assert spec.fingerprint() != before


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


def test_sequence_loss_labels_every_token_and_response_loss_leaves_the_example_alone(chatml_tokenizer):
    example = tokenize_conversation(chatml_tokenizer, SAMPLE_CONVERSATION, 512)
    assert tokenization.with_loss_on(example, "response") is example
    whole = tokenization.with_loss_on(example, "sequence")
    assert whole.input_ids == example.input_ids and whole.labels == example.input_ids
    assert whole.n_target_tokens == len(example.input_ids) - 1 > example.n_target_tokens
    # The example itself is not changed (the training pass labels the answers only).
    assert IGNORE_INDEX in example.labels


def test_sequence_loss_never_gives_features_to_an_example_without_a_response(chatml_tokenizer):
    no_answer = tokenize_conversation(chatml_tokenizer, [{"role": "user", "content": "only a question"}], 512)
    assert no_answer.n_target_tokens == 0
    assert tokenization.with_loss_on(no_answer, "sequence") is no_answer


def test_unknown_loss_tokens_are_refused(chatml_tokenizer):
    example = tokenize_conversation(chatml_tokenizer, SAMPLE_CONVERSATION, 512)
    with pytest.raises(ValueError, match="loss_tokens must be one of"):
        tokenization.with_loss_on(example, "prompt")
