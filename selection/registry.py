"""Every selection method, one entry each: its name, what it consumes and the core function that chooses.

The Dagster skin makes, from each entry, the `<name>_selection` asset (the skin of the input it
consumes reads that input and calls `choose`), its blocking check `<name>_selection_is_valid`
and the dependency of `finetuned_checkpoints` on it. A new method over an input that already has
a skin is a core module holding its chooser plus one entry in METHODS.
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from selection import selectors
from selection.common import names
from selection.diversity import kmq_run


class Input(enum.Enum):
    """What a method chooses from, and so how its chooser is called."""

    # The model's latest influence scores of the current pool: choose(ScoredPool, budget) -> [RankedPicks].
    INFLUENCE_SCORES = "influence_scores"
    # Cosine similarity of the model's mean last-layer hidden states, pool x target val examples
    # (RDS): choose(ScoredPool, budget) -> [RankedPicks].
    HIDDEN_STATES = "hidden_states"
    # Embedding clusters of the pool and a quality score per example (kMQ):
    # choose(KmqPool, KmqSettings, KmqRuntime) -> KmqResult (see `kmq_run.select_kmq`).
    CLUSTERS = "clusters"
    # Clusters and quality, plus the feedback of a LoRA trained after each round (iterative kMQ):
    # choose(KmqPool, IterativeKmqSettings, KmqRuntime, feedback_dir, run_id) -> IterativeKmqResult.
    CLUSTERS_WITH_FEEDBACK = "clusters_with_feedback"
    # The whole current pool, nothing scored: choose(n_pool) -> [RankedPicks].
    POOL = "pool"


@dataclass(frozen=True)
class SelectionMethod:
    name: str  # the `method` its selections are stored under
    description: str
    consumes: Input
    choose: Callable[..., Any]
    code: tuple[str, ...]  # the modules whose source decides the picks (the asset's code version)
    # The picks follow the influence scores: each selection reports whether those were informative.
    follows_scores: bool = False

    def __post_init__(self) -> None:
        names.check_name(self.name, "method", "selection method")  # names export folders

    @property
    def asset(self) -> str:
        return f"{self.name}_selection"


_SCORES_CODE = ("selection.selectors", "selection.less", "selection.bids", "selection.baselines")

METHODS: tuple[SelectionMethod, ...] = (
    SelectionMethod(
        "less",
        "LESS (Xia et al. 2024): top-k by target score per task, and multi-target (`all`: max over tasks).",
        Input.INFLUENCE_SCORES,
        selectors.less_selections,
        _SCORES_CODE,
        follows_scores=True,
    ),
    SelectionMethod(
        "bids",
        "BIDS (Dai et al. 2025): per-target z-scores, iterative pick for the most underrepresented target.",
        Input.INFLUENCE_SCORES,
        selectors.bids_selection,
        _SCORES_CODE,
        follows_scores=True,
    ),
    SelectionMethod(
        "round_robin",
        "Baseline: task-wise round robin over the LESS per-task rankings.",
        Input.INFLUENCE_SCORES,
        selectors.round_robin_selection,
        _SCORES_CODE,
        follows_scores=True,
    ),
    SelectionMethod(
        "random",
        "Baseline: uniform random sample of the scored pool (seeded).",
        Input.INFLUENCE_SCORES,
        selectors.random_selection,
        _SCORES_CODE,
    ),
    SelectionMethod(
        "kmq",
        "kMQ: budget per cluster proportional to its size, quality-weighted sampling within clusters.",
        Input.CLUSTERS,
        kmq_run.select_kmq,
        ("selection.kmq", "selection.common.allocation", "selection.diversity.quality", "selection.diversity.kmq_run"),
    ),
    SelectionMethod(
        "kmq_iterative",
        "Iterative kMQ: rounds of b/N examples; cluster weights follow training feedback (gold vs generated).",
        Input.CLUSTERS_WITH_FEEDBACK,
        kmq_run.select_kmq_iterative,
        (
            "selection.kmq",
            "selection.common.allocation",
            "selection.diversity.quality",
            "selection.diversity.kmq_run",
            "selection.train.generation",
            "selection.train.training",
        ),
    ),
    SelectionMethod(
        "rds",
        "RDS baseline (LESS paper): cosine similarity of the model's mean last-layer hidden states between "
        "pool and target val examples, aggregated per task like LESS; top-k per task and multi-target.",
        Input.HIDDEN_STATES,
        selectors.less_selections,
        ("selection.baselines", "selection.diversity.embeddings", "selection.selectors"),
    ),
    SelectionMethod(
        "full",
        "Full-data baseline: the whole pool, so finetuning on it can be compared with every selection.",
        Input.POOL,
        selectors.full_selection,
        ("selection.selectors",),
    ),
)
