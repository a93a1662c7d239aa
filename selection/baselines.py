"""Baselines users compare selections against: random, task-wise round robin over
LESS rankings, RDS's representation similarity (aggregated like LESS in `selection.selectors`),
and the full pool."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from selection.less import resolve_budget


def random_select(n_pool: int, budget: int | float, seed: int) -> np.ndarray:
    """`budget` (count or fraction) distinct indices drawn uniformly, seeded."""
    k = resolve_budget(budget, n_pool)
    return np.random.default_rng(seed).choice(n_pool, size=k, replace=False).astype(np.int64)


def full_data(n_pool: int) -> np.ndarray:
    """Every pool index, in pool order."""
    if n_pool <= 0:
        raise ValueError(f"n_pool must be positive, got {n_pool}")
    return np.arange(n_pool, dtype=np.int64)


def round_robin_select(per_task_rankings: Mapping[str, Sequence[int] | np.ndarray], budget: int) -> np.ndarray:
    """Take each task's next best not-yet-chosen example in turn (tasks in sorted
    name order) until `budget` distinct examples are chosen. Rankings are pool
    indices, best first (e.g. `np.argsort(-less_scores)` per task)."""
    if not per_task_rankings:
        raise ValueError("per_task_rankings is empty")
    if isinstance(budget, bool) or not isinstance(budget, (int, np.integer)) or budget <= 0:
        raise ValueError(f"budget must be a positive integer count, got {budget!r}")
    tasks = sorted(per_task_rankings)
    rankings = [np.asarray(per_task_rankings[t], dtype=np.int64) for t in tasks]
    for task, ranking in zip(tasks, rankings):
        if ranking.ndim != 1:
            raise ValueError(f"ranking of task {task!r} must be 1-D")
    reachable = np.unique(np.concatenate(rankings)).size
    if budget > reachable:
        raise ValueError(f"budget {budget} exceeds the {reachable} distinct examples in the rankings")
    chosen: list[int] = []
    seen: set[int] = set()
    cursors = [0] * len(tasks)
    while len(chosen) < budget:
        for t, ranking in enumerate(rankings):
            while cursors[t] < ranking.size and int(ranking[cursors[t]]) in seen:
                cursors[t] += 1
            if cursors[t] < ranking.size:
                pick = int(ranking[cursors[t]])
                seen.add(pick)
                chosen.append(pick)
                if len(chosen) == budget:
                    break
    return np.asarray(chosen, dtype=np.int64)


def cosine_similarity_matrix(pool_emb: np.ndarray, target_emb: np.ndarray, chunk_rows: int = 65536) -> np.ndarray:
    """[n_pool, n_target] cosine similarities, computed in pool row chunks (float32)."""
    pool = np.asarray(pool_emb)
    target = np.asarray(target_emb, dtype=np.float32)
    if pool.ndim != 2 or target.ndim != 2 or pool.shape[1] != target.shape[1]:
        raise ValueError(f"need 2-D embeddings of equal width, got {pool.shape} and {target.shape}")

    def unit(x: np.ndarray, what: str) -> np.ndarray:
        norms = np.linalg.norm(x, axis=1)
        if not np.all(np.isfinite(norms)) or np.any(norms == 0):
            raise ValueError(f"{what} embeddings contain zero or non-finite rows")
        return x / norms[:, None]

    target_t = unit(target, "target").T
    out = np.empty((pool.shape[0], target.shape[0]), dtype=np.float32)
    for start in range(0, pool.shape[0], chunk_rows):
        block = np.asarray(pool[start : start + chunk_rows], dtype=np.float32)
        out[start : start + block.shape[0]] = unit(block, "pool") @ target_t
    return out
