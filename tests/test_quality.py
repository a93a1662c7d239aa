"""Quality scorers: response log-likelihood against a manual per-example computation, NaN
rows, and the reward-model scorer."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from selection.data.tokenization import IGNORE_INDEX, tokenize_conversation
from selection.diversity.quality import (
    LogLikelihoodScorer,
    ResponseScorer,
    RewardModelScorer,
    response_log_likelihood,
    score_response_likelihoods,
)

CONVERSATIONS = [
    [{"role": "user", "content": "Name a color."}, {"role": "assistant", "content": "Blue."}],
    [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "What is 2+2?"},
        {"role": "assistant", "content": "4."},
        {"role": "user", "content": "And 3+3?"},
        {"role": "assistant", "content": "6, of course."},
    ],
    [
        {"role": "user", "content": "Say something long."},
        {"role": "assistant", "content": "Here is a fairly long answer with several words in it."},
    ],
    [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello there!"}],
]


def _manual_mean_log_likelihood(model: torch.nn.Module, input_ids: list[int], labels: list[int]) -> float:
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([input_ids])).logits[0]
    log_probs = torch.log_softmax(logits.double(), dim=-1)
    picked = [log_probs[t - 1, labels[t]].item() for t in range(1, len(labels)) if labels[t] != IGNORE_INDEX]
    return float(np.mean(picked))


@pytest.mark.parametrize("template", [False, True])
def test_log_likelihood_matches_manual_per_example(
    tiny_llama: torch.nn.Module, tiny_tokenizer: Any, chatml_tokenizer: Any, template: bool
) -> None:
    tokenizer = chatml_tokenizer if template else tiny_tokenizer
    got = response_log_likelihood(tiny_llama, tokenizer, CONVERSATIONS, max_length=128, batch_size=3)
    for row, messages in enumerate(CONVERSATIONS):
        example = tokenize_conversation(tokenizer, messages, max_length=128)
        expected = _manual_mean_log_likelihood(tiny_llama, example.input_ids, example.labels)
        assert abs(got[row] - expected) <= 1e-4 * abs(expected)
    one_by_one = response_log_likelihood(tiny_llama, tokenizer, CONVERSATIONS, max_length=128, batch_size=1)
    np.testing.assert_allclose(got, one_by_one, rtol=1e-4)


def test_final_turn_only_scores_the_last_answer(tiny_llama: torch.nn.Module, chatml_tokenizer: Any) -> None:
    multi = CONVERSATIONS[1]
    got = response_log_likelihood(tiny_llama, chatml_tokenizer, [multi], max_length=128, final_turn_only=True)[0]
    example = tokenize_conversation(chatml_tokenizer, multi, max_length=128)
    first_turn_end = tokenize_conversation(chatml_tokenizer, multi[:3], max_length=128)
    labels = [IGNORE_INDEX] * len(first_turn_end.input_ids) + example.labels[len(first_turn_end.input_ids) :]
    assert sum(label != IGNORE_INDEX for label in labels) > 0
    assert got == pytest.approx(_manual_mean_log_likelihood(tiny_llama, example.input_ids, labels), rel=1e-4)
    # Truncation cuts the prompt, not the final answer: its start is still what gets scored.
    cut = len(first_turn_end.input_ids) - 2
    result = score_response_likelihoods(tiny_llama, chatml_tokenizer, [multi], max_length=cut, final_turn_only=True)
    short = tokenize_conversation(chatml_tokenizer, multi, max_length=cut)
    runs = [i for i, label in enumerate(short.labels) if label != IGNORE_INDEX]
    final_start = max(i for i in runs if i - 1 not in runs)
    final_labels = [IGNORE_INDEX] * final_start + short.labels[final_start:]
    assert short.prompt_truncated and result.unscored_indices == ()
    assert result.values[0] == pytest.approx(
        _manual_mean_log_likelihood(tiny_llama, short.input_ids, final_labels), rel=1e-4
    )


def test_no_target_examples_are_nan_and_counted(tiny_llama: torch.nn.Module, tiny_tokenizer: Any) -> None:
    long_prompt = [{"role": "user", "content": "x" * 200}, {"role": "assistant", "content": "ok"}]
    no_answer = [{"role": "user", "content": "Anyone there?"}]
    conversations = [CONVERSATIONS[0], long_prompt, no_answer, CONVERSATIONS[3]]
    result = score_response_likelihoods(tiny_llama, tiny_tokenizer, conversations, max_length=64, batch_size=2)
    # The long prompt is cut before its answer, so only the conversation without an answer is unscored.
    assert result.unscored_indices == (2,) and result.n_unscored == 1
    assert np.isnan(result.values[2]) and np.isfinite(result.values[[0, 1, 3]]).all()
    assert result.stats.truncated_indices == (1,) and result.stats.prompt_truncated_indices == (1,)
    assert np.all(result.values[[0, 1, 3]] < 0)


def test_log_likelihood_scorer_protocol_and_fingerprint(tiny_llama: torch.nn.Module, tiny_tokenizer: Any) -> None:
    scorer = LogLikelihoodScorer(tiny_llama, tiny_tokenizer, "model-a", max_length=128)
    assert isinstance(scorer, ResponseScorer)
    np.testing.assert_allclose(
        scorer.score(CONVERSATIONS[:2]), response_log_likelihood(tiny_llama, tiny_tokenizer, CONVERSATIONS[:2], 128)
    )
    assert scorer.last_result is not None and scorer.last_result.n_unscored == 0
    other = LogLikelihoodScorer(tiny_llama, tiny_tokenizer, "model-b", max_length=128)
    assert scorer.fingerprint() != other.fingerprint()
    assert scorer.describe()["kind"] == "response_log_likelihood" and scorer.describe()["model"] == "model-a"
    with pytest.raises(ValueError, match="model_fingerprint"):
        LogLikelihoodScorer(tiny_llama, tiny_tokenizer, "")


def _save_tiny_reward_model(folder: Path, tokenizer: Any, num_labels: int = 1) -> Path:
    from transformers import LlamaConfig, LlamaForSequenceClassification

    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_labels=num_labels,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(0)
    LlamaForSequenceClassification(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def test_reward_model_scorer_batched_equals_single(tmp_path: Path, chatml_tokenizer: Any) -> None:
    folder = _save_tiny_reward_model(tmp_path / "rm", chatml_tokenizer)
    scorer = RewardModelScorer(folder, batch_size=3, max_length=32)
    batched = scorer.score(CONVERSATIONS)
    assert scorer.last_n_truncated >= 1  # the multi-turn conversation is longer than 32 tokens
    single = np.concatenate([scorer.score([c]) for c in CONVERSATIONS])
    np.testing.assert_allclose(batched, single, rtol=1e-4, atol=1e-6)
    assert batched.shape == (4,) and np.isfinite(batched).all() and len(set(batched.round(6))) == 4
    assert isinstance(scorer, ResponseScorer) and scorer.describe()["kind"] == "reward_model"
    assert scorer.fingerprint() == RewardModelScorer(folder, max_length=32).fingerprint()
    with pytest.raises(ValueError, match="assistant turn"):
        scorer.score([[{"role": "user", "content": "Hi"}]])


def test_reward_model_scorer_errors(tmp_path: Path, chatml_tokenizer: Any) -> None:
    with pytest.raises(FileNotFoundError, match="does not exist"):
        RewardModelScorer(tmp_path / "missing")
    with pytest.raises(FileNotFoundError, match="config.json"):
        RewardModelScorer(tmp_path)
    folder = _save_tiny_reward_model(tmp_path / "two", chatml_tokenizer, num_labels=2)
    with pytest.raises(ValueError, match="label_index"):
        RewardModelScorer(folder)
    assert RewardModelScorer(folder, label_index=1).score(CONVERSATIONS[:1]).shape == (1,)
