"""Quality scores of (prompt, response) pairs for kMQ, with a record of which scorer ran.

kMQ samples within each cluster with probabilities from a quality score (softmax with a
temperature). Three scorers, all offline:

- :class:`IFDScorer` (default): instruction-following difficulty under the base model,
  IFD = PPL(response | prompt) / PPL(response) (Li et al. 2024), mapped to a quality in
  [0, 1) by :func:`ifd_quality` (IFD >= 1 is not eligible). It asks how much the prompt
  helps, so an answer's own predictability (code that repeats its prompt, a one-letter
  MMLU answer) cancels out of the ratio.
- :class:`LogLikelihoodScorer`: a causal LM's mean per-token log-likelihood of the
  assistant response(s) given the prompt (:func:`response_log_likelihood`). It measures
  how predictable an answer is, so it favours copy-heavy, formulaic answers; kept as an
  option and as iterative kMQ's default feedback judge.
- :class:`RewardModelScorer`: a local reward model folder
  (``AutoModelForSequenceClassification`` with one output), the score of the whole
  rendered conversation. This is what the Diversify-and-Conquer paper uses.

Every scorer follows :class:`ResponseScorer`: ``score(conversations)`` -> one float per
conversation, NaN = could not be scored (reported, never 0); ``fingerprint()`` and
``describe()`` for lineage. Higher = better response, except that IFD is returned raw:
:func:`sampling_quality` turns any scorer's stored scores into kMQ's sampling quality.

:func:`quality_kind` and :func:`make_scorer` pick kMQ's scorer from its settings;
:func:`cached_quality_scores` keeps each scorer's scores in the `quality_scores` table.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Protocol, runtime_checkable

import duckdb
import numpy as np
import torch

from selection.data.tokenization import (
    IGNORE_INDEX,
    TokenizedExample,
    TruncationStats,
    collate,
    length_sorted_batches,
    render_conversation,
    tokenize_many,
)
from selection.diversity import diversity_store
from selection.diversity.embeddings import length_order, pad_token_batch
from selection.train.models import ModelSpec, ensure_pad_token, eval_mode, resolve_device, resolve_dtype
from selection.train.training import token_losses

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


class _ScorerLineage:
    """``fingerprint`` and ``describe`` of a scorer, from its ``_settings`` and ``_meaning``."""

    _meaning: ClassVar[dict[str, str]]  # what the scores mean, appended to describe()

    def _settings(self) -> dict[str, Any]:
        raise NotImplementedError

    def fingerprint(self) -> str:
        return _fingerprint_of(self._settings())

    def describe(self) -> dict[str, Any]:
        return {**self._settings(), "fingerprint": self.fingerprint(), **self._meaning}


class _LanguageModelScorer(_ScorerLineage):
    """A scorer that runs a loaded causal LM; ``model_fingerprint`` names its weights in lineage.

    Subclasses pass these arguments through (``*args, **kwargs``) and take their own keyword-only."""

    def __init__(
        self,
        model: torch.nn.Module,
        tokenizer: Any,
        model_fingerprint: str,
        max_length: int = 256,
        batch_size: int = 8,
        max_tokens: int | None = None,
    ) -> None:
        if not model_fingerprint:
            raise ValueError("model_fingerprint must be non-empty (it identifies the scorer in lineage)")
        self.model, self.tokenizer, self.model_fingerprint = model, tokenizer, model_fingerprint
        self.max_length, self.batch_size, self.max_tokens = max_length, batch_size, max_tokens


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
    """Labels on the last assistant turn only (truncation keeps that turn's start as the last labelled run)."""
    n_assistant = sum(1 for message in messages if message["role"] == "assistant")
    runs = _label_runs(example.labels)
    if len(runs) > n_assistant or (len(runs) < n_assistant and not example.truncated):
        raise ValueError(
            f"found {len(runs)} labelled spans for {n_assistant} assistant turns; the chat template "
            "does not separate assistant turns, so the final turn cannot be isolated"
        )
    labels = [IGNORE_INDEX] * len(example.labels)
    if runs and (len(runs) == n_assistant or example.truncated):
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
    progress: Callable[[int], None] | None = None,
) -> LikelihoodResult:
    """Mean per-token log-likelihood (natural log) of the assistant tokens given everything
    before them, per conversation, in input order.

    Tokenization is :func:`selection.data.tokenization.tokenize_many` (labels on assistant
    content and end-of-turn tokens; past ``max_length`` the prompt is cut before the last
    response, which keeps its start). With
    ``final_turn_only`` only the last assistant turn counts (earlier turns are context).
    Conversations with no predictable target token (no assistant turn, or an empty one)
    get NaN and are listed in ``unscored_indices``. Batches are length-sorted
    (``batch_size`` rows, at most ``max_tokens`` padded tokens); the model runs in eval mode.
    ``progress`` gets the size of each finished batch.
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
            if progress is not None:
                progress(len(indices))
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


class LogLikelihoodScorer(_LanguageModelScorer):
    """:class:`ResponseScorer` from a causal LM's response log-likelihood.

    ``model_fingerprint`` identifies the model weights for lineage (e.g.
    ``ModelSpec.fingerprint()`` plus an adapter's hash); the scorer cannot hash a live model
    cheaply. After ``score``, ``last_result`` holds the stats (truncations, NaN rows).
    """

    _meaning: ClassVar[dict[str, str]] = {
        "meaning": "mean per-token log-likelihood of the response (nats); higher = more likely"
    }

    def __init__(self, *args: Any, final_turn_only: bool = False, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.final_turn_only = final_turn_only
        self.last_result: LikelihoodResult | None = None

    def score(self, conversations: Sequence[Conversation]) -> np.ndarray:
        self.last_result = score_response_likelihoods(
            self.model,
            self.tokenizer,
            conversations,
            self.max_length,
            self.batch_size,
            self.max_tokens,
            self.final_turn_only,
        )
        return self.last_result.values

    def _settings(self) -> dict[str, Any]:
        return {
            "kind": "response_log_likelihood",
            "model": self.model_fingerprint,
            "max_length": self.max_length,
            "final_turn_only": self.final_turn_only,
        }


# ------------------------------------------------------------------ instruction-following difficulty


@dataclass(frozen=True)
class IFDResult:
    """Per-conversation IFD and its two halves, over the same response tokens (input order)."""

    ifd: np.ndarray  # [n] PPL(response | prompt) / PPL(response | empty instruction); NaN = unscored
    conditioned: np.ndarray  # [n] mean log-likelihood of those tokens given the prompt (nats)
    unconditioned: np.ndarray  # [n] the same given an empty instruction
    n_tokens: np.ndarray  # [n] response tokens compared (0 where unscored)
    stats: TruncationStats  # of the prompted tokenization
    unscored_indices: tuple[int, ...]

    @property
    def n_unscored(self) -> int:
        return len(self.unscored_indices)


def _without_instruction(messages: Conversation, index: int) -> Conversation:
    """The final assistant turn after an empty user turn (templates require a user turn first)."""
    answers = [m for m in messages if m["role"] == "assistant"]
    if not answers:
        raise ValueError(f"conversation {index} has no assistant turn; IFD scores a response")
    return [{"role": "user", "content": ""}, {"role": "assistant", "content": answers[-1]["content"]}]


def _target_ids(example: TokenizedExample) -> list[int]:
    return [label for label in example.labels[1:] if label != IGNORE_INDEX]


@torch.no_grad()
def _target_log_probs(
    model: torch.nn.Module,
    examples: Sequence[TokenizedExample],
    pad_token_id: int,
    batch_size: int,
    max_tokens: int | None,
) -> list[np.ndarray]:
    """Log-probability of every predicted target token, per example, in token order."""
    out = [np.empty(0, dtype=np.float64) for _ in examples]
    usable = [i for i, example in enumerate(examples) if _predictable_targets(example) > 0]
    device = next(model.parameters()).device
    with eval_mode(model):
        for batch_rows in length_sorted_batches([examples[i] for i in usable], batch_size, max_tokens):
            indices = [usable[row] for row in batch_rows]
            batch = {k: v.to(device) for k, v in collate([examples[i] for i in indices], pad_token_id).items()}
            token_nll, _ = token_losses(model, batch)
            mask = batch["labels"][:, 1:] != IGNORE_INDEX
            for row, index in enumerate(indices):
                out[index] = -token_nll[row][mask[row]].double().cpu().numpy()
    return out


def instruction_following_difficulty(
    model: torch.nn.Module,
    tokenizer: Any,
    conversations: Sequence[Conversation],
    max_length: int = 256,
    batch_size: int = 8,
    max_tokens: int | None = None,
) -> IFDResult:
    """IFD of each conversation's final response (Li et al. 2024, "From Quantity to Quality"):

        IFD = PPL(y | x) / PPL(y) = exp(mean NLL(y | x) - mean NLL(y))

    ``x`` is everything before the last assistant turn, ``y`` that turn. Chat-format
    variant: ``PPL(y)`` is taken after an *empty* user turn in the same template (Li et
    al. score the bare answer text), so both perplexities cover exactly the same
    response tokens, end-of-turn token included. When truncation to ``max_length`` cuts
    the prompted response, both means run over its first tokens only. IFD < 1: the
    prompt helps predict the answer (lower = easier); IFD >= 1: it does not. NaN (listed
    in ``unscored_indices``): no response token left after truncation.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    prompted, stats = tokenize_many(tokenizer, conversations, max_length)
    prompted = [_keep_final_turn(example, messages) for example, messages in zip(prompted, conversations)]
    alone, _ = tokenize_many(tokenizer, [_without_instruction(m, i) for i, m in enumerate(conversations)], max_length)
    # One pass over both halves: similar lengths share batches.
    log_probs = _target_log_probs(model, [*prompted, *alone], tokenizer.pad_token_id, batch_size, max_tokens)
    n = len(conversations)
    ifd, conditioned, unconditioned = (np.full(n, np.nan) for _ in range(3))
    n_tokens = np.zeros(n, dtype=np.int64)
    for i in range(n):
        with_prompt, without = _target_ids(prompted[i]), _target_ids(alone[i])
        m = min(len(with_prompt), len(without))
        if m == 0:
            continue
        if with_prompt[:m] != without[:m]:
            raise ValueError(
                f"conversation {i}: the response tokenizes differently with and without its prompt, so IFD "
                "would compare different tokens; use quality='log_likelihood' with this tokenizer"
            )
        conditioned[i], unconditioned[i] = log_probs[i][:m].mean(), log_probs[n + i][:m].mean()
        ifd[i], n_tokens[i] = np.exp(unconditioned[i] - conditioned[i]), m
    unscored = tuple(int(i) for i in np.flatnonzero(np.isnan(ifd)))
    return IFDResult(ifd, conditioned, unconditioned, n_tokens, stats, unscored)


def ifd_quality(ifd: Sequence[float] | np.ndarray) -> np.ndarray:
    """kMQ sampling quality from IFD: the IFD itself where it is below 1, NaN (not eligible) otherwise.

    Li et al. rank by IFD (higher = the answer is harder to produce even with the prompt)
    and discard IFD >= 1 (the prompt does not help: answer and instruction do not
    match); NaN keeps those out of kMQ's sampling exactly as unscored rows are. Quality
    lies in [0, 1), so with softmax(quality / T) no example outweighs another in its
    cluster by more than e^(1/T) (2.7x at the default T = 1), whatever its answer's format.
    """
    values = np.asarray(ifd, dtype=np.float64)
    with np.errstate(invalid="ignore"):
        return np.where(values < 1.0, values, np.nan)


class IFDScorer(_LanguageModelScorer):
    """Scorer of instruction-following difficulty under a causal LM (the kMQ offline default).

    ``score`` returns the raw IFD (what is cached; see :func:`instruction_following_difficulty`);
    :meth:`to_quality` maps it to kMQ's sampling quality (:func:`ifd_quality`). It is a
    pool-quality scorer, not a feedback judge (IFD is not "higher = better answer" above 1).
    ``model_fingerprint`` identifies the weights as for :class:`LogLikelihoodScorer`.
    """

    _meaning: ClassVar[dict[str, str]] = {
        "meaning": "IFD = PPL(response | prompt) / PPL(response | empty instruction) (Li et al. 2024)",
        "quality": "IFD where IFD < 1; IFD >= 1 not eligible",
    }
    last_result: IFDResult | None = None  # set by score()

    def score(self, conversations: Sequence[Conversation]) -> np.ndarray:
        self.last_result = instruction_following_difficulty(
            self.model, self.tokenizer, conversations, self.max_length, self.batch_size, self.max_tokens
        )
        return self.last_result.ifd

    @staticmethod
    def to_quality(scores: Sequence[float] | np.ndarray) -> np.ndarray:
        return ifd_quality(scores)

    def _settings(self) -> dict[str, Any]:
        return {
            "kind": "ifd",
            "variant": "chat template, empty user turn for PPL(y)",
            "model": self.model_fingerprint,
            "max_length": self.max_length,
        }


def sampling_quality(scorer: Any, scores: Sequence[float] | np.ndarray) -> np.ndarray:
    """kMQ quality (higher = sampled more, NaN = not eligible) from a scorer's stored scores:
    its ``to_quality`` mapping when it has one (:class:`IFDScorer`), else the scores as they are."""
    mapping = getattr(scorer, "to_quality", None)
    return np.asarray(scores if mapping is None else mapping(scores), dtype=np.float64)


def relative_sampling_weights(quality: Sequence[float] | np.ndarray, temperature: float) -> np.ndarray:
    """Each example's softmax(quality / T) weight over the eligible pool, scaled to mean 1; 0 where NaN.

    kMQ normalizes within each cluster, so this is how much more often an example is
    drawn than an average one competing for the same cluster budget: comparable across
    sources whatever the clustering.
    """
    q = np.asarray(quality, dtype=np.float64)
    if not (np.isfinite(temperature) and temperature > 0):
        raise ValueError(f"temperature must be finite and > 0, got {temperature}")
    weights = np.zeros(q.shape)
    eligible = np.isfinite(q)
    if eligible.any():
        raw = np.exp((q[eligible] - q[eligible].max()) / temperature)
        weights[eligible] = raw / raw.mean()
    return weights


def summarize_by_group(
    groups: Sequence[str],
    named_values: dict[str, Sequence[float] | np.ndarray],
    group_name: str = "source",
    digits: int = 3,
) -> list[dict[str, Any]]:
    """One row per group (sorted): n, then mean/median/p10/p90 of each named value over its
    finite entries; ``n_<name>`` counts those, in every row, when any value is NaN."""
    labels = np.asarray(groups, dtype=object)
    arrays = {name: np.asarray(values, dtype=np.float64) for name, values in named_values.items()}
    for name, values in arrays.items():
        if values.shape != labels.shape:
            raise ValueError(f"{name} has {values.size} values for {labels.size} group labels")
    rows = []
    for group in sorted(set(labels.tolist())):
        mask = labels == group
        row: dict[str, Any] = {group_name: group, "n": int(mask.sum())}
        for name, values in arrays.items():
            v = values[mask]
            v = v[np.isfinite(v)]
            if not np.isfinite(values).all():
                row[f"n_{name}"] = len(v)
            stats = (v.mean(), np.median(v), *np.percentile(v, [10, 90])) if len(v) else (np.nan,) * 4
            row.update(
                {f"{name}_{k}": round(float(s), digits) for k, s in zip(("mean", "median", "p10", "p90"), stats)}
            )
        rows.append(row)
    return rows


# ------------------------------------------------------------------ reward model

_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt")


class RewardModelScorer(_ScorerLineage):
    """:class:`ResponseScorer` from a local reward model folder.

    The conversation is rendered with the reward model's chat template (the Tulu format
    when it has none, as in :mod:`selection.data.tokenization`); the score is the model's
    output ``label_index`` (default: the only one) at the last token. Renderings longer
    than ``max_length`` tokens keep their *last* tokens (the response is what is judged);
    ``last_n_truncated`` counts them.
    """

    _meaning: ClassVar[dict[str, str]] = {"meaning": "reward model score of the conversation; higher = better response"}

    def __init__(
        self,
        path: str | Path,
        device: str = "cpu",
        max_length: int = 1024,
        batch_size: int = 8,
        dtype: str = "float32",
        label_index: int | None = None,
    ) -> None:
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


# ------------------------------------------------------------------ kMQ's scorer and its cache

QUALITY_KINDS = ("ifd", "log_likelihood", "reward_model")


def quality_kind(quality: str | None, reward_model_path: str | None) -> str:
    """The quality signal a kMQ setting asks for: ``quality`` when set, else the reward model
    when a path is given, else IFD. Refuses unknown kinds and a reward model without a path."""
    kind = quality or ("reward_model" if reward_model_path else "ifd")
    if kind not in QUALITY_KINDS:
        raise ValueError(f"`quality` {kind!r} is not one of {', '.join(QUALITY_KINDS)}")
    if kind == "reward_model" and not reward_model_path:
        raise ValueError("`quality` 'reward_model' needs `reward_model_path` (a local reward model folder)")
    return kind


def make_scorer(
    kind: str, reward_model_path: str | None, model: torch.nn.Module, tokenizer: Any, spec: ModelSpec, device: str
) -> ResponseScorer:
    """The pool-quality scorer of a :func:`quality_kind` (the LM scorers run the loaded base ``model``)."""
    if kind == "reward_model":
        return RewardModelScorer(reward_model_path, device=device)
    if kind == "log_likelihood":
        return LogLikelihoodScorer(model, tokenizer, spec.fingerprint(), max_length=spec.max_length)
    return IFDScorer(model, tokenizer, spec.fingerprint(), max_length=spec.max_length)


def feedback_judge(
    kind: str, reward_model_path: str | None, quality_scorer: ResponseScorer, device: str
) -> ResponseScorer | None:
    """Iterative kMQ's judge: the reward model when configured (the paper), else None (the trained model's surprise)."""
    if not reward_model_path:
        return None
    if kind == "reward_model":
        return quality_scorer
    return RewardModelScorer(reward_model_path, device=device)


def cached_quality_scores(
    connect: Callable[[], AbstractContextManager[duckdb.DuckDBPyConnection]],
    scorer: ResponseScorer,
    ids: Sequence[str],
    conversations: Sequence[Conversation],
    log: Callable[[str], None],
) -> np.ndarray:
    """Quality per example, cached by scorer fingerprint in `quality_scores`: only unscored ids are computed.

    NaN where the scorer could not score an example.
    """
    with connect() as con:
        known = diversity_store.quality_scores(con, scorer.fingerprint())
    todo = [i for i, example_id in enumerate(ids) if example_id not in known]
    if todo:
        log(f"scoring quality of {len(todo)} examples with {scorer.describe()['kind']}")
        values = scorer.score([conversations[i] for i in todo])
        new_ids = [ids[i] for i in todo]
        with connect() as con:
            diversity_store.add_quality_scores(con, scorer.fingerprint(), new_ids, values, scorer.describe())
        known.update(zip(new_ids, values, strict=True))
    return np.array([known[i] if known[i] is not None else np.nan for i in ids], dtype=np.float64)
