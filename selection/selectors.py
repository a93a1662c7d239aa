"""The choosers of the score-based methods (LESS per task and multi-target, BIDS, round robin,
random, RDS) and of the full pool, and the explanations of their picks (registered in
`selection.registry`).

A score-based chooser takes a :class:`ScoredPool` and a budget (a count); `columns` describes the
score matrix's columns: one dict per target val example with `task`, `subtask` and `val_example_id`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from fractions import Fraction
from numbers import Real

import numpy as np
import pandas as pd

from selection import baselines, bids, less

ALL_TARGETS = "all"


@dataclass(frozen=True)
class RankedPicks:
    target: str
    indices: np.ndarray  # rows of the score matrix, in selection order
    scores: np.ndarray  # the method's score for each pick (NaN where it has none)


@dataclass(frozen=True)
class ScoredPool:
    """What a score-based method chooses from: one score row per candidate example."""

    scores: np.ndarray  # [n_rows, n_columns]: influence (or similarity) of each row on each val example
    columns: Sequence[Mapping[str, str]]  # per column: task, subtask, val_example_id
    seed: int = 0  # for methods that sample


# The rule of the config `budget`, stated in every refusal of one.
BUDGET_RULE = (
    "give a whole count >= 1 (1 means one example) or a fraction of the pool between 0 and 1, exclusive (e.g. 0.05)"
)


def check_budget_setting(budget: float) -> float:
    """A config ``budget`` (see :func:`resolve_budget_setting`) that can select examples from some pool;
    anything else (not finite, not positive, a non-whole count) is a ValueError naming the rule."""
    if isinstance(budget, bool) or not isinstance(budget, Real):
        raise ValueError(f"`budget` {budget!r} is not a number: {BUDGET_RULE}")
    if not math.isfinite(budget):
        raise ValueError(f"`budget` {budget} is not a finite number: {BUDGET_RULE}")
    if budget <= 0:
        raise ValueError(f"`budget` {budget} must be positive: {BUDGET_RULE}")
    if budget >= 1 and budget != int(budget):
        raise ValueError(
            f"`budget` {budget} is >= 1, so a count of examples, and must be whole "
            f"({math.floor(budget)} or {math.ceil(budget)}): {BUDGET_RULE}"
        )
    return budget


def resolve_budget_setting(budget: float, n_pool: int) -> int:
    """Config budgets: a value >= 1 is a count (must be whole; 1 is one example), a value in (0, 1)
    a fraction of the pool (:func:`check_budget_setting` refuses the rest)."""
    check_budget_setting(budget)
    if budget >= 1:
        return less.resolve_budget(int(budget), n_pool)
    if math.floor(Fraction(repr(float(budget))) * n_pool) == 0:  # as less.resolve_budget rounds
        raise ValueError(
            f"`budget` {budget} is a fraction of the pool of {n_pool} examples and selects none: "
            "give a larger fraction or a count (e.g. 1, one example)"
        )
    return less.resolve_budget(float(budget), n_pool)


def task_columns(columns: Sequence[Mapping[str, str]]) -> dict[str, list[int]]:
    by_task: dict[str, list[int]] = {}
    for index, column in enumerate(columns):
        by_task.setdefault(column["task"], []).append(index)
    return dict(sorted(by_task.items()))


def per_task_less_scores(scores: np.ndarray, columns: Sequence[Mapping[str, str]]) -> dict[str, np.ndarray]:
    """LESS target score of every row for each task (mean per subtask, max over subtasks)."""
    return {
        task: less.aggregate_target_scores(np.asarray(scores[:, cols]), [columns[c]["subtask"] for c in cols])
        for task, cols in task_columns(columns).items()
    }


def less_selections(pool: ScoredPool, budget: int) -> list[RankedPicks]:
    """Top-`budget` per task, plus the multi-target variant (`all`: max over tasks of the task scores)."""
    per_task = per_task_less_scores(pool.scores, pool.columns)
    picks = []
    for task, task_scores in per_task.items():
        chosen = less.top_k(task_scores, budget)
        picks.append(RankedPicks(task, chosen, task_scores[chosen]))
    combined, _ = less.multi_target_scores(per_task)
    chosen = less.top_k(combined, budget)
    return picks + [RankedPicks(ALL_TARGETS, chosen, combined[chosen])]


def bids_selection(pool: ScoredPool, budget: int) -> list[RankedPicks]:
    chosen, gains = bids.bids_select_with_gains(np.asarray(pool.scores), budget)
    return [RankedPicks(ALL_TARGETS, chosen, gains)]


def round_robin_selection(pool: ScoredPool, budget: int) -> list[RankedPicks]:
    per_task = per_task_less_scores(pool.scores, pool.columns)
    rankings = {task: np.argsort(-s, kind="stable") for task, s in per_task.items()}
    chosen = baselines.round_robin_select(rankings, budget)
    combined, _ = less.multi_target_scores(per_task)
    return [RankedPicks(ALL_TARGETS, chosen, combined[chosen])]


def random_selection(pool: ScoredPool, budget: int) -> list[RankedPicks]:
    """A seeded uniform sample of the rows; the scores are not looked at."""
    chosen = baselines.random_select(pool.scores.shape[0], budget, pool.seed)
    return [RankedPicks(ALL_TARGETS, chosen, np.full(len(chosen), np.nan))]


def full_selection(n_pool: int) -> list[RankedPicks]:
    """Every example of the pool, in pool order (no score)."""
    return [RankedPicks(ALL_TARGETS, baselines.full_data(n_pool), np.full(n_pool, np.nan))]


def explanations(
    scores: np.ndarray, columns: Sequence[Mapping[str, str]], picks: RankedPicks, top: int = 3
) -> pd.DataFrame:
    """For each pick, the `top` val examples with the highest normalized influence on it, and their tasks."""
    matrix = np.asarray(scores)
    records = bids.explain_selection(matrix, picks.indices, list(range(matrix.shape[1])), top=top)
    return pd.DataFrame(
        [
            {
                "row": r["row"],
                "reason_rank": r["rank"],
                "val_example_id": columns[r["column"]]["val_example_id"],
                "val_task": columns[r["column"]]["task"],
                "val_subtask": columns[r["column"]]["subtask"],
                "normalized_influence": r["score"],
            }
            for r in records
        ],
        columns=["row", "reason_rank", "val_example_id", "val_task", "val_subtask", "normalized_influence"],
    )


def task_balance(scores: np.ndarray, columns: Sequence[Mapping[str, str]], rows: np.ndarray) -> dict[str, float]:
    """Mean z-scored influence of the selected rows on each task's val examples (the BIDS balance picture)."""
    normalized, kept = bids.normalize_columns(np.asarray(scores))
    kept_columns = [columns[c] for c in kept]
    selected = normalized[rows]
    balance: dict[str, list[float]] = {}
    for local, column in enumerate(kept_columns):
        balance.setdefault(column["task"], []).append(float(selected[:, local].mean()))
    return {task: float(np.mean(values)) for task, values in sorted(balance.items())}
