"""kMQ and iterative kMQ on the pool: quality scores, selection, and iterative kMQ's training feedback.

The algorithms are in :mod:`selection.kmq`. This module feeds them the pool, its clusters and
a quality scorer (:mod:`selection.diversity.quality`, scores cached per scorer), and for
iterative kMQ trains, generates and judges between rounds (:class:`IterativeFeedback`, each
round cached on disk), then records the rounds in `kmq_rounds`.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from selection import kmq, selectors
from selection.common import files, integrity, progress
from selection.common.runtime import Connect, Log
from selection.data import tokenization
from selection.diversity import diversity_store, quality
from selection.train import checkpoints, generation, models, preflight, training

ELIGIBLE = "eligible examples (a quality score, and IFD < 1 with quality 'ifd')"


@dataclass(frozen=True)
class KmqSettings:
    budget: float  # a count (>= 1, whole) or a fraction of the pool (< 1)
    temperature: float  # softmax temperature of the quality weights within a cluster
    seed: int
    quality: str | None  # see quality.quality_kind
    reward_model_path: str | None

    def __post_init__(self) -> None:
        # A bad setting fails before anything is read or loaded.
        quality.quality_kind(self.quality, self.reward_model_path)
        selectors.check_budget_setting(self.budget)

    @property
    def quality_kind(self) -> str:
        return quality.quality_kind(self.quality, self.reward_model_path)


@dataclass(frozen=True)
class IterativeKmqSettings(KmqSettings):
    n_rounds: int  # each adds budget / n_rounds examples
    max_new_tokens: int  # greedy generation length for the feedback score
    learning_rate: float


@dataclass(frozen=True)
class KmqPool:
    """The examples to choose from (the current pool, or part of it) with each one's source and cluster."""

    pool_version: str
    ids: list[str]
    conversations: list
    sources: list[str]
    label_of: dict[str, int]
    # The current pool's size (a fractional budget is a share of it) when ``ids`` are part of it,
    # and what ``ids`` are (for the budget's error messages).
    n_pool: int | None = None
    usable: str = "current pool examples"

    @property
    def pool_size(self) -> int:
        return len(self.ids) if self.n_pool is None else self.n_pool


@dataclass(frozen=True)
class KmqRuntime:
    """What a kMQ run uses besides its pool and settings."""

    spec: models.ModelSpec
    load_model: Callable[[], tuple[Any, Any]]  # (model, tokenizer); called once the inputs pass their checks
    device: str
    batch_size: int
    connect: Connect
    log: Log


@dataclass
class KmqInputs:
    pool: KmqPool
    scorer: Any
    scores: np.ndarray  # the scorer's output (IFD, log-likelihood or reward); NaN = unscored
    quality: np.ndarray  # what kMQ samples with (quality.sampling_quality); NaN = not eligible
    eligible: np.ndarray  # indices with a finite quality
    model: Any
    tokenizer: Any

    def eligible_labels(self) -> np.ndarray:
        return np.array([self.pool.label_of[self.pool.ids[i]] for i in self.eligible])

    def eligible_budget(self, budget: float) -> int:
        part = self.pool.pool_size != len(self.pool.ids)
        usable = f"{ELIGIBLE} among the {self.pool.usable}" if part else ELIGIBLE
        return preflight.resolve_selection_budget(budget, self.pool.pool_size, len(self.eligible), usable)

    def by_source(self, temperature: float) -> list[dict]:
        """Per-source score and relative sampling weight (mean 1 over the pool, 0 if not eligible)."""
        weights = quality.relative_sampling_weights(self.quality, temperature)
        rows = quality.summarize_by_group(self.pool.sources, {"score": self.scores, "weight": weights})
        sources = np.asarray(self.pool.sources, dtype=object)
        n_eligible = {s: int(np.isfinite(self.quality[sources == s]).sum()) for s in set(self.pool.sources)}
        return [
            {
                "source": r["source"],
                "n": r["n"],
                "n_eligible": n_eligible[r["source"]],
                **{k: v for k, v in r.items() if k not in ("source", "n")},
            }
            for r in rows
        ]

    def quality_metrics(self, temperature: float) -> dict[str, Any]:
        """The quality signal: per-source distributions and eligibility counts."""
        n_unscored = int(np.isnan(self.scores).sum())
        return {
            "quality_kind": self.scorer.describe()["kind"],
            "quality_by_source": self.by_source(temperature),
            "n_unscored": n_unscored,
            "n_ineligible": int(len(self.pool.ids) - len(self.eligible) - n_unscored),
        }


def load_kmq_inputs(pool: KmqPool, settings: KmqSettings, runtime: KmqRuntime) -> KmqInputs:
    """Check the pool's clusters and the budget, then load the model and score the pool's quality."""
    if len(pool.label_of) != len(pool.ids):
        raise ValueError(
            f"clusters cover {len(pool.label_of)} of {len(pool.ids)} pool examples; rematerialize clusters"
        )
    # Refused before the model is loaded and the pool scored.
    preflight.resolve_selection_budget(settings.budget, pool.pool_size, len(pool.ids), pool.usable)
    model, tokenizer = runtime.load_model()
    scorer = quality.make_scorer(
        settings.quality_kind, settings.reward_model_path, model, tokenizer, runtime.spec, runtime.device
    )
    scores = quality.cached_quality_scores(runtime.connect, scorer, pool.ids, pool.conversations, runtime.log.info)
    sampling = quality.sampling_quality(scorer, scores)
    n_unscored = int(np.isnan(scores).sum())
    n_filtered = int((np.isfinite(scores) & ~np.isfinite(sampling)).sum())
    if n_unscored:
        runtime.log.warning(
            f"{n_unscored} examples have no quality score (no response token to score) and are not eligible"
        )
    if n_filtered:
        runtime.log.info(
            f"{n_filtered} examples have IFD >= 1 (the prompt does not help predict the answer) and "
            "are not eligible, as in Li et al. 2024"
        )
    return KmqInputs(pool, scorer, scores, sampling, np.flatnonzero(np.isfinite(sampling)), model, tokenizer)


@dataclass(frozen=True)
class KmqResult:
    """One kMQ run's picks; the caller stores them under its registry entry's method name."""

    pool_version: str
    budget: int
    example_ids: list[str]  # in selection order
    scores: np.ndarray  # the quality scorer's output for each pick
    metrics: dict[str, Any]  # for lineage


@dataclass(frozen=True)
class IterativeKmqResult(KmqResult):
    rounds: list[kmq.RoundRecord]


def select_kmq(pool: KmqPool, settings: KmqSettings, runtime: KmqRuntime) -> KmqResult:
    """kMQ: budget per cluster proportional to its size, quality-weighted sampling within clusters."""
    inputs = load_kmq_inputs(pool, settings, runtime)
    scored = inputs.eligible
    labels = inputs.eligible_labels()
    budget = inputs.eligible_budget(settings.budget)
    result = kmq.kmq_select(
        inputs.quality[scored], budget, labels=labels, seed=settings.seed, temperature=settings.temperature
    )
    chosen = scored[result.indices]
    per_cluster = {str(c): int(b) for c, b in enumerate(result.per_cluster_budget)}
    metrics = {
        "budget": budget,
        "pool_version": pool.pool_version,
        "scorer": inputs.scorer.describe(),
        "per_cluster": per_cluster,
        "temperature": settings.temperature,
        **inputs.quality_metrics(settings.temperature),
    }
    return KmqResult(pool.pool_version, budget, [pool.ids[i] for i in chosen], inputs.scores[chosen], metrics)


class IterativeFeedback:
    """Iterative kMQ's ``feedback_fn`` over the eligible examples: train a fresh LoRA for one epoch
    on the selection so far, then score gold vs greedy generations with ``judge`` (None: the
    trained model's surprise).

    Each round is cached in ``feedback_dir/<round key>/feedback.json``; ``feedback_log`` holds
    one entry per round, in order.
    """

    def __init__(
        self,
        inputs: KmqInputs,
        settings: IterativeKmqSettings,
        judge: quality.ResponseScorer | None,
        runtime: KmqRuntime,
        feedback_dir: Path,
    ) -> None:
        self.inputs, self.settings, self.judge, self.runtime = inputs, settings, judge, runtime
        self.feedback_dir = feedback_dir
        self.train_config = training.TrainingConfig(
            epochs=1,
            learning_rate=settings.learning_rate,
            batch_size=8,
            micro_batch_size=runtime.batch_size,
            seed=settings.seed,
        )
        self.feedback_log: list[dict] = []

    def _pool_index(self, selected_local: np.ndarray) -> list[int]:
        return [int(self.inputs.eligible[i]) for i in selected_local]

    def __call__(self, selected_local: np.ndarray) -> np.ndarray:
        spec, ids, conversations = self.runtime.spec, self.inputs.pool.ids, self.inputs.pool.conversations
        model, tokenizer = self.inputs.model, self.inputs.tokenizer
        rows = self._pool_index(selected_local)
        chosen_ids, chosen = [ids[i] for i in rows], [conversations[i] for i in rows]
        # Keyed by what determines the feedback, so a rerun reuses trained adapters and scores.
        round_key = checkpoints.training_run_key(
            spec.fingerprint(),
            {
                **self.train_config.to_dict(),
                "max_new_tokens": self.settings.max_new_tokens,
                "feedback_judge": self.judge.fingerprint() if self.judge is not None else "self_likelihood",
            },
            chosen_ids,
        )
        round_dir = self.feedback_dir / round_key
        files.make_dirs(round_dir)
        cached = round_dir / "feedback.json"
        if cached.is_file():
            # Rematerializing would read the same file again: the fix is to delete it.
            stored = integrity.read_json(
                cached, asset=None, fix="delete it and rematerialize kmq_iterative_selection to recompute the round"
            )
            self.feedback_log.append({**stored["log"], "reused": True})
            return np.array([np.nan if s is None else s for s in stored["scores"]], dtype=np.float64)
        examples, stats = tokenization.tokenize_many(tokenizer, chosen, spec.max_length)
        usable = stats.usable_indices()
        peft_model = models.add_lora(model, spec, seed=self.settings.seed)
        training.train_lora(
            peft_model,
            [examples[i] for i in usable],
            self.train_config,
            round_dir / "adapter_run",
            tokenizer.pad_token_id,
            save_moments=False,
        )
        reporter = progress.ProgressReporter(
            f"iterative kMQ round {len(self.feedback_log) + 1} of {self.settings.n_rounds}: greedy generation",
            len(chosen),
            self.runtime.log.info,
            unit="prompts",
        )
        result = generation.compute_feedback(
            peft_model,
            tokenizer,
            chosen,
            max_new_tokens=self.settings.max_new_tokens,
            max_length=spec.max_length,
            batch_size=self.runtime.batch_size,
            scorer=self.judge,
            model_fingerprint=f"{spec.fingerprint()}-{round_key}",
            progress=reporter.update,
        )
        peft_model.unload()  # back to the plain base model for the next round
        log = {
            "round": len(self.feedback_log),
            "round_key": round_key,
            "n_scored": int(np.isfinite(result.scores).sum()),
            "n_unscored": len(result.unscored_indices),
            "scorer": result.scorer,
        }
        # Written whole or not at all: a half-written file would pass for a finished round.
        files.write_text(
            cached,
            json.dumps({"log": log, "scores": [None if np.isnan(s) else float(s) for s in result.scores]}, default=str),
        )
        self.feedback_log.append(log)
        self.runtime.log.info(f"feedback round {len(self.feedback_log)}: mean S {np.nanmean(result.scores):.4f}")
        return result.scores

    def round_rows(self, records: list[kmq.RoundRecord]) -> list[diversity_store.KmqRoundRow]:
        """The `kmq_rounds` rows of a finished run, with each round's feedback entry."""
        ids = self.inputs.pool.ids
        return [
            diversity_store.KmqRoundRow(
                round=record.round,
                weights=record.weights.tolist(),
                cluster_scores=None
                if record.cluster_scores is None
                else [None if np.isnan(v) else float(v) for v in record.cluster_scores],
                updated_weights=None if record.updated_weights is None else record.updated_weights.tolist(),
                new_example_ids=[ids[i] for i in self._pool_index(record.new_indices)],
                feedback=self.feedback_log[record.round] if record.round < len(self.feedback_log) else None,
            )
            for record in records
        ]


def select_kmq_iterative(
    pool: KmqPool, settings: IterativeKmqSettings, runtime: KmqRuntime, feedback_dir: Path, run_id: str
) -> IterativeKmqResult:
    """Iterative kMQ: rounds of budget / n_rounds examples; cluster weights follow training feedback
    (gold vs generated). The rounds replace the model's and budget's in `kmq_rounds`; trained
    rounds are cached under ``feedback_dir``."""
    inputs = load_kmq_inputs(pool, settings, runtime)
    scored = inputs.eligible
    judge = quality.feedback_judge(settings.quality_kind, settings.reward_model_path, inputs.scorer, runtime.device)
    labels = inputs.eligible_labels()
    budget = inputs.eligible_budget(settings.budget)
    feedback = IterativeFeedback(inputs, settings, judge, runtime, feedback_dir)
    selected, records = kmq.run_iterative_kmq(
        labels,
        inputs.quality[scored],
        budget,
        settings.n_rounds,
        feedback,
        seed=settings.seed,
        temperature=settings.temperature,
    )
    chosen = scored[selected]
    with runtime.connect() as con:
        diversity_store.replace_kmq_rounds(con, runtime.spec.name, budget, feedback.round_rows(records), run_id)
    final = records[-1].updated_weights if records[-1].updated_weights is not None else records[-1].weights
    metrics = {
        "budget": budget,
        "pool_version": pool.pool_version,
        "scorer": inputs.scorer.describe(),
        "n_rounds": settings.n_rounds,
        "temperature": settings.temperature,
        "final_weights": [float(w) for w in final],
        "feedback": feedback.feedback_log,
        "feedback_judge": judge.describe() if judge is not None else "self_likelihood",
        **inputs.quality_metrics(settings.temperature),
    }
    return IterativeKmqResult(
        pool.pool_version, budget, [pool.ids[i] for i in chosen], inputs.scores[chosen], metrics, records
    )
