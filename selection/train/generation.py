"""Greedy generation and the iterative-kMQ feedback score.

Iterative kMQ (Yu et al. 2024, "Diversify and Conquer", Sec. 3) trains on the selection
so far, lets the trained model answer the selected prompts, and scores each example by
how far the model's own answer falls short of the gold one:

    S = score(x, y_gold) - score(x, y_gen)

where the paper's ``score`` is a **reward model** (its code uses an open 3B RLHF reward
model; ``rm(x, gold) - rm(x, gen)``). Clusters with a larger mean S still have more to
teach and get more of the next round's budget (``selection.kmq.update_cluster_weights``).
Here the scorer is pluggable (:func:`compute_feedback` ``scorer=``, any
:class:`selection.diversity.quality.ResponseScorer`, e.g. :class:`selection.diversity.quality.RewardModelScorer`).

Without a reward model (offline default, ``scorer=None``) the trained model itself is the
judge, through its per-token surprise (negative log-likelihood) of the final response:

    S = NLL(y_gold | x) - NLL(y_gen | x) = loglik(y_gen | x) - loglik(y_gold | x)

Same sign convention: higher S = the gold answer is much further from what the model
produces than its own answer = more to learn from that cluster. The literal
``loglik(gold) - loglik(gen)`` would be backwards: greedy decoding picks the most likely
token at every step, so its own answer nearly always has the higher likelihood, making
that difference <= 0 almost everywhere (every cluster would be clipped to the weight
floor) and largest exactly where the model already reproduces the gold answer. For the
same reason, a :class:`~selection.diversity.quality.LogLikelihoodScorer` over the trained model is
refused as ``scorer``.

Greedy generation renders prompts with the chat template and ``add_generation_prompt``
(the Tulu format when there is no template), left-pads batches, decodes with
``do_sample=False`` and stops at EOS or the template's end-of-turn token; outputs do not
depend on the batch size (up to float rounding in the padded attention).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from selection.data.tokenization import has_chat_template, render_conversation
from selection.diversity.embeddings import length_order, pad_token_batch
from selection.diversity.quality import Conversation, LogLikelihoodScorer, ResponseScorer
from selection.train.models import eval_mode

_TULU_GENERATION_PROMPT = "<|assistant|>\n"


def render_prompt(tokenizer: Any, messages: Sequence[dict[str, str]]) -> str:
    """The text a model continues to answer ``messages`` (which must end with a user turn).

    Equal to the prefix that :mod:`selection.data.tokenization` treats as the prompt of the
    next assistant turn, so generated answers are scored in the same context.
    """
    if not messages or messages[-1]["role"] != "user":
        raise ValueError("a generation prompt must end with a user turn")
    if has_chat_template(tokenizer):
        return tokenizer.apply_chat_template(list(messages), tokenize=False, add_generation_prompt=True)
    return render_conversation(tokenizer, messages)[0] + _TULU_GENERATION_PROMPT


def end_of_turn_token_ids(tokenizer: Any, model: torch.nn.Module | None = None) -> list[int]:
    """Token ids that end an assistant turn: EOS, the model's generation EOS ids, and the
    template's end-of-turn token (``<|im_end|>``, ``<|eot_id|>`` ...) found by rendering
    a one-turn conversation and reading what follows the answer."""
    stop: set[int] = set()
    if tokenizer.eos_token_id is not None:
        stop.add(int(tokenizer.eos_token_id))
    generation_config = getattr(model, "generation_config", None)
    configured = getattr(generation_config, "eos_token_id", None)
    if configured is not None:
        stop.update(int(i) for i in (configured if isinstance(configured, (list, tuple)) else [configured]))
    marker = "ANSWER"
    one_turn = [{"role": "user", "content": "Q"}, {"role": "assistant", "content": marker}]
    text, spans = render_conversation(tokenizer, one_turn)
    start, end = spans[-1]
    suffix = text[start:end]
    if suffix.startswith(marker) and len(suffix) > len(marker):
        ids = tokenizer(suffix[len(marker) :], add_special_tokens=False)["input_ids"]
        if len(ids) == 1:
            stop.add(int(ids[0]))
    if not stop:
        raise ValueError("cannot tell where an answer ends: the tokenizer has no EOS or end-of-turn token")
    return sorted(stop)


def _cut_at_stop(token_ids: list[int], stop_ids: set[int]) -> list[int]:
    for position, token in enumerate(token_ids):
        if token in stop_ids:
            return token_ids[:position]
    return token_ids


@torch.no_grad()
def _generate_from_token_ids(
    model: torch.nn.Module,
    tokenizer: Any,
    prompts: Sequence[list[int]],
    max_new_tokens: int,
    batch_size: int,
    progress: Callable[[int], None] | None = None,
) -> list[str]:
    from transformers import GenerationConfig

    if tokenizer.pad_token_id is None:
        raise ValueError("tokenizer has no pad token; call selection.train.models.ensure_pad_token first")
    stop_ids = end_of_turn_token_ids(tokenizer, model)
    config = GenerationConfig(
        max_new_tokens=max_new_tokens,
        do_sample=False,
        num_beams=1,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=stop_ids,
    )
    device = next(model.parameters()).device
    outputs: list[str] = [""] * len(prompts)
    order = length_order([len(ids) for ids in prompts])
    with eval_mode(model):
        for start in range(0, len(order), batch_size):
            rows = order[start : start + batch_size]
            input_ids, attention_mask = pad_token_batch([prompts[i] for i in rows], tokenizer.pad_token_id, "left")
            longest = input_ids.shape[1]
            generated = model.generate(
                input_ids=input_ids.to(device), attention_mask=attention_mask.to(device), generation_config=config
            )
            for row, index in enumerate(rows):
                new_tokens = _cut_at_stop(generated[row, longest:].tolist(), set(stop_ids))
                outputs[index] = tokenizer.decode(new_tokens, skip_special_tokens=True).strip()
            if progress is not None:
                progress(len(rows))
    return outputs


def _encode_prompts(tokenizer: Any, prompts_messages: Sequence[Sequence[dict[str, str]]]) -> list[list[int]]:
    # Rendered prompts already carry BOS / special tokens where the template wants them.
    return [tokenizer(render_prompt(tokenizer, m), add_special_tokens=False)["input_ids"] for m in prompts_messages]


def generate_greedy(
    model: torch.nn.Module,
    tokenizer: Any,
    prompts_messages: Sequence[Sequence[dict[str, str]]],
    max_new_tokens: int = 128,
    batch_size: int = 8,
) -> list[str]:
    """Greedy answers (stripped text, special tokens removed), one per prompt, in input order.

    Each prompt is a conversation ending with a user turn. Deterministic; the model runs
    in eval mode on its own device.
    """
    if max_new_tokens < 1 or batch_size < 1:
        raise ValueError(f"max_new_tokens and batch_size must be >= 1, got {max_new_tokens}, {batch_size}")
    if not prompts_messages:
        return []
    return _generate_from_token_ids(
        model, tokenizer, _encode_prompts(tokenizer, prompts_messages), max_new_tokens, batch_size
    )


@dataclass(frozen=True)
class FeedbackResult:
    """Per-example feedback (input order). ``scores`` is S; NaN where unscorable."""

    scores: np.ndarray  # [n] float64, S (higher = more to learn)
    gold_scores: np.ndarray  # [n] scorer output on the gold answers (log-likelihood when scorer=None)
    generated_scores: np.ndarray  # [n] the same on the generated answers
    generations: list[str]  # "" where the prompt was too long to generate for
    unscored_indices: tuple[int, ...]
    scorer: dict[str, Any]  # describe() of the judge, for lineage

    @property
    def n_unscored(self) -> int:
        return len(self.unscored_indices)


def split_final_turn(messages: Conversation) -> tuple[Conversation, str]:
    """(everything before the last assistant turn, that turn's content)."""
    last = max((i for i, m in enumerate(messages) if m["role"] == "assistant"), default=None)
    if last is None:
        raise ValueError("conversation has no assistant turn to compare against")
    return list(messages[:last]), messages[last]["content"]


def compute_feedback(
    model: torch.nn.Module,
    tokenizer: Any,
    conversations: Sequence[Conversation],
    max_new_tokens: int = 128,
    max_length: int = 512,
    batch_size: int = 8,
    scorer: ResponseScorer | None = None,
    model_fingerprint: str = "trained-model",
    progress: Callable[[int], None] | None = None,
) -> FeedbackResult:
    """Generate greedy answers to each conversation's final prompt and score S (module docstring).

    The prompt is everything before the last assistant turn (earlier turns stay as
    context); the gold answer is that turn. With ``scorer=None`` both answers are scored
    by the model's final-turn log-likelihood over the first ``max_length`` tokens;
    prompts that leave no room for an answer within ``max_length`` are not generated for.
    NaN S (listed in ``unscored_indices``) means an answer could not be scored.
    ``progress`` gets the number of prompts each generation batch answered (prompts that do not fit are not counted).
    """
    if isinstance(scorer, LogLikelihoodScorer) and scorer.model is model:
        raise ValueError(
            "scorer is the trained model's own log-likelihood: S = loglik(gold) - loglik(gen) is <= 0 almost "
            "everywhere because greedy answers maximize it; use scorer=None (surprise-based S) or a reward model"
        )
    prompts, golds = zip(*(split_final_turn(messages) for messages in conversations)) if conversations else ((), ())
    encoded = _encode_prompts(tokenizer, prompts)
    fits = [i for i, ids in enumerate(encoded) if len(ids) < max_length]
    generations = [""] * len(conversations)
    if fits:
        for index, text in zip(
            fits,
            _generate_from_token_ids(
                model, tokenizer, [encoded[i] for i in fits], max_new_tokens, batch_size, progress
            ),
        ):
            generations[index] = text
    gold_conversations = [[*p, {"role": "assistant", "content": g}] for p, g in zip(prompts, golds)]
    generated_conversations = [[*p, {"role": "assistant", "content": g}] for p, g in zip(prompts, generations)]
    judge: ResponseScorer = (
        scorer
        if scorer is not None
        else LogLikelihoodScorer(
            model, tokenizer, model_fingerprint, max_length=max_length, batch_size=batch_size, final_turn_only=True
        )
    )
    gold_scores = np.asarray(judge.score(gold_conversations), dtype=np.float64)
    generated_scores = np.asarray(judge.score(generated_conversations), dtype=np.float64)
    not_generated = np.ones(len(conversations), dtype=bool)
    not_generated[fits] = False
    generated_scores[not_generated] = np.nan
    # Reward: gold minus generated. Self-likelihood: surprise of gold minus surprise of generated.
    scores = gold_scores - generated_scores if scorer is not None else generated_scores - gold_scores
    unscored = tuple(int(i) for i in np.flatnonzero(np.isnan(scores)))
    description = judge.describe()
    if scorer is None:
        description = {**description, "feedback": "loglik(gen) - loglik(gold) under the trained model"}
    else:
        description = {**description, "feedback": "score(gold) - score(gen)"}
    return FeedbackResult(scores, gold_scores, generated_scores, generations, unscored, description)
