"""Quality scores of (prompt, response) pairs for kMQ, with a record of which scorer ran.

kMQ samples within each cluster with probabilities from a quality score (softmax with a
temperature). Two scorers, both offline:

- :class:`LogLikelihoodScorer` (default): a causal LM's mean per-token log-likelihood of
  the assistant response(s) given the prompt (:func:`response_log_likelihood`). Higher
  means the model finds the response more natural; it needs no extra model.
- :class:`RewardModelScorer`: a local reward model folder
  (``AutoModelForSequenceClassification`` with one output), the score of the whole
  rendered conversation. This is what the Diversify-and-Conquer paper uses.

Every scorer follows :class:`ResponseScorer`: ``score(conversations)`` -> one float per
conversation, higher = better response, NaN = could not be scored (reported, never 0);
``fingerprint()`` and ``describe()`` for lineage.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch

from selection.embeddings import length_order, pad_token_batch
from selection.models import ensure_pad_token, eval_mode, resolve_device, resolve_dtype
from selection.training import token_losses
from selection.tokenization import (
    IGNORE_INDEX,
    TokenizedExample,
    TruncationStats,
    collate,
    length_sorted_batches,
    render_conversation,
    tokenize_many,
)

Conversation = list[dict[str, str]]


@runtime_checkable
class ResponseScorer(Protocol):
    """Scores conversations; higher = better response; NaN = unscorable."""

    def score(self, conversations: Sequence[Conversation]) -> np.ndarray: ...

    def fingerprint(self) -> str: ...

    def describe(self) -> dict[str, Any]: ...


def _fingerprint_of(description: dict[str, Any]) -> str:
    canonical = json.dumps(description, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(canonical.encode()).hexdigest()[:16]


# ------------------------------------------------------------------ log-likelihood


@dataclass(frozen=True)
class LikelihoodResult:
    """Per-conversation mean token log-likelihood (NaN: no target token) and tokenization stats."""

    values: np.ndarray  # [n] float64
    stats: TruncationStats
    unscored_indices: tuple[int, ...]  # NaN rows: no response token left to predict

    @property
    def n_unscored(self) -> int:
        return len(self.unscored_indices)


def _label_runs(labels: Sequence[int]) -> list[tuple[int, int]]:
    """Maximal ``[start, end)`` runs of target labels (one per assistant turn)."""
    runs: list[tuple[int, int]] = []
    start: int | None = None
    for position, label in enumerate(labels):
        if label != IGNORE_INDEX and start is None:
            start = position
        elif label == IGNORE_INDEX and start is not None:
            runs.append((start, position))
            start = None
    if start is not None:
        runs.append((start, len(labels)))
    return runs


def _keep_final_turn(example: TokenizedExample, messages: Conversation) -> TokenizedExample:
    """Labels on the last assistant turn only; none if truncation cut that turn away."""
    n_assistant = sum(1 for message in messages if message["role"] == "assistant")
    runs = _label_runs(example.labels)
    if len(runs) > n_assistant or (len(runs) < n_assistant and not example.truncated):
        raise ValueError(
            f"found {len(runs)} labelled spans for {n_assistant} assistant turns; the chat template "
            "does not separate assistant turns, so the final turn cannot be isolated"
        )
    labels = [IGNORE_INDEX] * len(example.labels)
    if len(runs) == n_assistant and runs:
        start, end = runs[-1]
        labels[start:end] = example.labels[start:end]
    n_target = sum(1 for label in labels if label != IGNORE_INDEX)
    return TokenizedExample(example.input_ids, labels, example.truncated, n_target)


def _predictable_targets(example: TokenizedExample) -> int:
    # Position 0 is never predicted (labels shift by one inside the model).
    return sum(1 for label in example.labels[1:] if label != IGNORE_INDEX)


def _batch_log_likelihoods(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> tuple[np.ndarray, np.ndarray]:
    """(sum of target-token log-probs, number of target tokens) per row."""
    token_nll, counts = token_losses(model, batch)
    sums = -token_nll.double().sum(dim=1)
    return sums.cpu().numpy(), counts.cpu().numpy()


@torch.no_grad()
def score_response_likelihoods(
    model: torch.nn.Module,
    tokenizer: Any,
    conversations: Sequence[Conversation],
    max_length: int = 256,
    batch_size: int = 8,
    max_tokens: int | None = None,
    final_turn_only: bool = False,
) -> LikelihoodResult:
    """Mean per-token log-likelihood (natural log) of the assistant tokens given everything
    before them, per conversation, in input order.

    Tokenization is :func:`selection.tokenization.tokenize_many` (labels on assistant
    content and end-of-turn tokens, first ``max_length`` tokens kept). With
    ``final_turn_only`` only the last assistant turn counts (earlier turns are context).
    Conversations with no predictable target token (no assistant turn, or truncation cut
    it away) get NaN and are listed in ``unscored_indices``. Batches are length-sorted
    (``batch_size`` rows, at most ``max_tokens`` padded tokens); the model runs in eval mode.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    examples, stats = tokenize_many(tokenizer, conversations, max_length)
    if final_turn_only:
        examples = [_keep_final_turn(example, messages) for example, messages in zip(examples, conversations)]
    values = np.full(len(examples), np.nan, dtype=np.float64)
    usable = [i for i, example in enumerate(examples) if _predictable_targets(example) > 0]
    device = next(model.parameters()).device
    with eval_mode(model):
        for batch_rows in length_sorted_batches([examples[i] for i in usable], batch_size, max_tokens):
            indices = [usable[row] for row in batch_rows]
            batch = collate([examples[i] for i in indices], tokenizer.pad_token_id)
            sums, counts = _batch_log_likelihoods(model, {key: value.to(device) for key, value in batch.items()})
            values[indices] = sums / counts
    unscored = tuple(i for i in range(len(examples)) if np.isnan(values[i]))
    return LikelihoodResult(values=values, stats=stats, unscored_indices=unscored)


def response_log_likelihood(
    model: torch.nn.Module,
    tokenizer: Any,
    conversations: Sequence[Conversation],
    max_length: int = 256,
    batch_size: int = 8,
    max_tokens: int | None = None,
    final_turn_only: bool = False,
) -> np.ndarray:
    """``[n]`` float64 mean per-token response log-likelihood; NaN where nothing is scored.

    Same as :func:`score_response_likelihoods` without the stats; count the NaNs
    (``np.isnan(x).sum()``) and report them.
    """
    return score_response_likelihoods(
        model, tokenizer, conversations, max_length, batch_size, max_tokens, final_turn_only
    ).values


class LogLikelihoodScorer:
    """:class:`ResponseScorer` from a causal LM's response log-likelihood.

    ``model_fingerprint`` identifies the model weights for lineage (e.g.
    ``ModelSpec.fingerprint()`` plus an adapter's hash); the scorer cannot hash a live model
    cheaply. After ``score``, ``last_result`` holds the stats (truncations, NaN rows).
    """

    def __init__(self, model: torch.nn.Module, tokenizer: Any, model_fingerprint: str, max_length: int = 256,
                 batch_size: int = 8, max_tokens: int | None = None, final_turn_only: bool = False) -> None:
        if not model_fingerprint:
            raise ValueError("model_fingerprint must be non-empty (it identifies the scorer in lineage)")
        self.model = model
        self.tokenizer = tokenizer
        self.model_fingerprint = model_fingerprint
        self.max_length = max_length
        self.batch_size = batch_size
        self.max_tokens = max_tokens
        self.final_turn_only = final_turn_only
        self.last_result: LikelihoodResult | None = None

    def score(self, conversations: Sequence[Conversation]) -> np.ndarray:
        self.last_result = score_response_likelihoods(
            self.model, self.tokenizer, conversations, self.max_length, self.batch_size,
            self.max_tokens, self.final_turn_only,
        )
        return self.last_result.values

    def _settings(self) -> dict[str, Any]:
        return {
            "kind": "response_log_likelihood",
            "model": self.model_fingerprint,
            "max_length": self.max_length,
            "final_turn_only": self.final_turn_only,
        }

    def fingerprint(self) -> str:
        return _fingerprint_of(self._settings())

    def describe(self) -> dict[str, Any]:
        return {**self._settings(), "fingerprint": self.fingerprint(),
                "meaning": "mean per-token log-likelihood of the response (nats); higher = more likely"}


# ------------------------------------------------------------------ reward model

_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt")


class RewardModelScorer:
    """:class:`ResponseScorer` from a local reward model folder.

    The conversation is rendered with the reward model's chat template (the Tulu format
    when it has none, as in :mod:`selection.tokenization`); the score is the model's
    output ``label_index`` (default: the only one) at the last token. Renderings longer
    than ``max_length`` tokens keep their *last* tokens (the response is what is judged);
    ``last_n_truncated`` counts them.
    """

    def __init__(self, path: str | Path, device: str = "cpu", max_length: int = 1024, batch_size: int = 8,
                 dtype: str = "float32", label_index: int | None = None) -> None:
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        self.path = Path(path).expanduser()
        if not self.path.is_dir():
            raise FileNotFoundError(f"reward model folder {self.path} does not exist")
        if not (self.path / "config.json").is_file():
            raise FileNotFoundError(f"reward model folder {self.path} has no config.json (not a Hugging Face model)")
        if max_length < 2 or batch_size < 1:
            raise ValueError(f"need max_length >= 2 and batch_size >= 1, got {max_length}, {batch_size}")
        self.max_length, self.batch_size, self.dtype = max_length, batch_size, dtype
        self.tokenizer = AutoTokenizer.from_pretrained(str(self.path), local_files_only=True)
        model = AutoModelForSequenceClassification.from_pretrained(
            str(self.path), local_files_only=True, dtype=resolve_dtype(dtype)
        )
        n_labels = int(model.config.num_labels)
        if label_index is None and n_labels != 1:
            raise ValueError(f"reward model {self.path} has {n_labels} outputs; pass label_index to pick one")
        self.label_index = 0 if label_index is None else label_index
        if not 0 <= self.label_index < n_labels:
            raise ValueError(f"label_index {self.label_index} out of range for {n_labels} outputs")
        ensure_pad_token(self.tokenizer)
        if model.config.pad_token_id is None:
            # Sequence classifiers find each row's last token via the pad id.
            model.config.pad_token_id = self.tokenizer.pad_token_id
        self.model = model.to(resolve_device(device)).eval()
        self.last_n_truncated = 0

    @torch.no_grad()
    def score(self, conversations: Sequence[Conversation]) -> np.ndarray:
        for index, messages in enumerate(conversations):
            if not messages or messages[-1]["role"] != "assistant":
                raise ValueError(f"conversation {index} does not end with an assistant turn; nothing to judge")
        texts = [render_conversation(self.tokenizer, messages)[0] for messages in conversations]
        encoded = self.tokenizer(texts, add_special_tokens=False)["input_ids"]
        self.last_n_truncated = sum(1 for ids in encoded if len(ids) > self.max_length)
        encoded = [ids[-self.max_length :] for ids in encoded]
        values = np.full(len(encoded), np.nan, dtype=np.float64)
        device = next(self.model.parameters()).device
        order = length_order([len(ids) for ids in encoded])
        for start in range(0, len(order), self.batch_size):
            rows = order[start : start + self.batch_size]
            input_ids, attention_mask = pad_token_batch([encoded[i] for i in rows], self.tokenizer.pad_token_id)
            logits = self.model(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device)).logits
            values[rows] = logits[:, self.label_index].double().cpu().numpy()
        return values

    def _settings(self) -> dict[str, Any]:
        files = sorted(p for p in self.path.iterdir() if p.is_file())
        config_sha = hashlib.sha256((self.path / "config.json").read_bytes()).hexdigest()
        # Names and sizes, not a content hash: reward models are gigabytes.
        weights = [(p.name, p.stat().st_size) for p in files if p.suffix in _WEIGHT_SUFFIXES]
        return {
            "kind": "reward_model",
            "path": str(self.path.resolve()),
            "config_sha256": config_sha,
            "weights": weights,
            "label_index": self.label_index,
            "max_length": self.max_length,
            "dtype": self.dtype,
        }

    def fingerprint(self) -> str:
        settings = self._settings()
        del settings["path"]  # the same model copied elsewhere scores the same
        return _fingerprint_of(settings)

    def describe(self) -> dict[str, Any]:
        return {**self._settings(), "fingerprint": self.fingerprint(),
                "meaning": "reward model score of the conversation; higher = better response"}
