"""Greedy generation (deterministic, batch-size invariant) and iterative-kMQ feedback scores."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import pytest
import torch

from selection.data.tokenization import render_conversation
from selection.diversity.quality import LogLikelihoodScorer, response_log_likelihood
from selection.train.generation import (
    compute_feedback,
    end_of_turn_token_ids,
    generate_greedy,
    render_prompt,
    split_final_turn,
)

PROMPTS = [
    [{"role": "user", "content": "Hi"}],
    [{"role": "user", "content": "Tell me about the weather in a long sentence please."}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Why?"}],
    [{"role": "user", "content": "Count to three."}],
]
CONVERSATIONS = [
    [*PROMPTS[0], {"role": "assistant", "content": "Hello! How can I help?"}],
    [*PROMPTS[1], {"role": "assistant", "content": "It is sunny."}],
    [
        *PROMPTS[2],
        {"role": "assistant", "content": "Because."},
        {"role": "user", "content": "Really?"},
        {"role": "assistant", "content": "Yes, really."},
    ],
]


@pytest.mark.parametrize("template", [False, True])
def test_render_prompt_is_the_scoring_prefix(tiny_tokenizer: Any, chatml_tokenizer: Any, template: bool) -> None:
    tokenizer = chatml_tokenizer if template else tiny_tokenizer
    for messages in CONVERSATIONS:
        prompt, _gold = split_final_turn(messages)
        full, spans = render_conversation(tokenizer, messages)
        assert full.startswith(render_prompt(tokenizer, prompt))
        assert len(render_prompt(tokenizer, prompt)) == spans[-1][0]
    with pytest.raises(ValueError, match="user turn"):
        render_prompt(tokenizer, CONVERSATIONS[0])


def test_end_of_turn_ids(tiny_tokenizer: Any, chatml_tokenizer: Any) -> None:
    assert end_of_turn_token_ids(tiny_tokenizer) == [tiny_tokenizer.eos_token_id]
    im_end = chatml_tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert set(end_of_turn_token_ids(chatml_tokenizer)) == {chatml_tokenizer.eos_token_id, im_end}


@pytest.mark.parametrize("template", [False, True])
def test_greedy_is_deterministic_and_batch_size_invariant(
    tiny_llama: torch.nn.Module, tiny_tokenizer: Any, chatml_tokenizer: Any, template: bool
) -> None:
    tokenizer = chatml_tokenizer if template else tiny_tokenizer
    batched = generate_greedy(tiny_llama, tokenizer, PROMPTS, max_new_tokens=12, batch_size=4)
    assert len(batched) == len(PROMPTS) and all(isinstance(text, str) for text in batched)
    assert any(batched)
    assert generate_greedy(tiny_llama, tokenizer, PROMPTS, max_new_tokens=12, batch_size=4) == batched
    assert generate_greedy(tiny_llama, tokenizer, PROMPTS, max_new_tokens=12, batch_size=1) == batched
    assert generate_greedy(tiny_llama, tokenizer, PROMPTS[::-1], max_new_tokens=12, batch_size=3) == batched[::-1]
    assert generate_greedy(tiny_llama, tokenizer, [], max_new_tokens=4) == []


def test_generation_restores_training_mode(tiny_llama: torch.nn.Module, tiny_tokenizer: Any) -> None:
    tiny_llama.train()
    generate_greedy(tiny_llama, tiny_tokenizer, PROMPTS[:1], max_new_tokens=2)
    assert tiny_llama.training


def test_default_feedback_is_generated_minus_gold_log_likelihood(
    tiny_llama: torch.nn.Module, chatml_tokenizer: Any
) -> None:
    result = compute_feedback(
        tiny_llama,
        chatml_tokenizer,
        CONVERSATIONS,
        max_new_tokens=8,
        max_length=128,
        batch_size=2,
        model_fingerprint="tiny",
    )
    prompts = [split_final_turn(m)[0] for m in CONVERSATIONS]
    generated = [[*p, {"role": "assistant", "content": g}] for p, g in zip(prompts, result.generations)]
    ll_gen = response_log_likelihood(tiny_llama, chatml_tokenizer, generated, 128, final_turn_only=True)
    ll_gold = response_log_likelihood(tiny_llama, chatml_tokenizer, CONVERSATIONS, 128, final_turn_only=True)
    assert result.scores.shape == (3,) and result.n_unscored == 0
    np.testing.assert_allclose(result.scores, ll_gen - ll_gold, rtol=1e-6)
    # Greedy answers are the model's own most likely tokens: the gold ones surprise it more, so S > 0.
    assert np.all(result.scores > 0)
    assert result.scorer["kind"] == "response_log_likelihood"
    assert "loglik(gen) - loglik(gold)" in result.scorer["feedback"]
    # Same scores at the default batch size, up to float rounding: a different batch pads to a
    # different length, and BLAS may then sum in another order (seen: 4e-8 apart on one CI machine).
    np.testing.assert_allclose(
        compute_feedback(tiny_llama, chatml_tokenizer, CONVERSATIONS, max_new_tokens=8, max_length=128).scores,
        result.scores,
        rtol=1e-6,
    )


class _AnswerLengthJudge:
    """A stand-in reward model: longer final answers are better."""

    def score(self, conversations: Sequence[list[dict[str, str]]]) -> np.ndarray:
        return np.array([float(len(c[-1]["content"])) for c in conversations])

    def fingerprint(self) -> str:
        return "length-judge"

    def describe(self) -> dict[str, Any]:
        return {"kind": "answer_length"}


def test_judge_feedback_is_gold_minus_generated(tiny_llama: torch.nn.Module, tiny_tokenizer: Any) -> None:
    result = compute_feedback(
        tiny_llama, tiny_tokenizer, CONVERSATIONS, max_new_tokens=6, max_length=128, scorer=_AnswerLengthJudge()
    )
    gold_lengths = np.array([len(split_final_turn(m)[1]) for m in CONVERSATIONS], dtype=float)
    np.testing.assert_array_equal(result.gold_scores, gold_lengths)
    np.testing.assert_array_equal(result.scores, gold_lengths - [len(g) for g in result.generations])
    assert result.scorer["feedback"] == "score(gold) - score(gen)"


def test_feedback_refuses_self_likelihood_judge_and_marks_long_prompts(
    tiny_llama: torch.nn.Module, tiny_tokenizer: Any
) -> None:
    with pytest.raises(ValueError, match="scorer=None"):
        compute_feedback(
            tiny_llama, tiny_tokenizer, CONVERSATIONS, scorer=LogLikelihoodScorer(tiny_llama, tiny_tokenizer, "tiny")
        )
    too_long = [{"role": "user", "content": "y" * 100}, {"role": "assistant", "content": "ok"}]
    result = compute_feedback(tiny_llama, tiny_tokenizer, [CONVERSATIONS[0], too_long], max_new_tokens=4, max_length=64)
    assert result.unscored_indices == (1,) and result.generations[1] == "" and np.isfinite(result.scores[0])
    with pytest.raises(ValueError, match="no assistant turn"):
        compute_feedback(tiny_llama, tiny_tokenizer, [PROMPTS[0]])
