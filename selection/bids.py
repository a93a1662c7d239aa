"""BIDS selection (Dai et al. 2025, "Improving Influence-based Instruction
Tuning Data Selection for Balanced Learning of Diverse Capabilities").

Definition (CONTRACT.md). `scores` is the raw influence matrix `[n_train, n_val]`.
1. Normalize (optional): z-score every column over the rows (ddof=1). Columns
   whose values are all identical have zero variance and are dropped.
2. Greedy: ref = 0. At each step pick the unselected row i maximizing
   f(i) = max_j (A[i, j] - ref[j]), ties to the lowest row index; then ref
   becomes the mean of the selected rows (running sum / count, float64).

Algorithm. The naive loop costs O(n * m) per step. But the best value over rows is
   max_i max_j (A[i, j] - ref[j]) = max_j (colmax_j - ref[j]),
where colmax_j is the largest A[i, j] over *unselected* rows. So only the m
column maxima matter. Each column keeps its rows sorted by value (descending)
and a pointer to its first unselected row; selecting a row only moves the
pointers of columns where that row was on top, past rows already selected.
A pointer in column j never passes more than the number of selected rows, so
only the top `budget` rows of each column are ever needed (argpartition, then
sort). Cost: O(n * m) to normalize and partition, O(budget * log budget * m)
to sort, then O(m) per step -- against O(budget * n * m) naive.

Exactness. Floating-point subtraction is monotone in its first argument, so
fl(colmax_j - ref[j]) equals the largest fl(A[i, j] - ref[j]) over unselected i,
i.e. the step's best value is bit-identical to the naive one. Rows tying for it
are found by scanning each winning column from its pointer while fl(A - ref)
still equals the best value, and the lowest row index wins, as in the definition.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from numbers import Integral

import numpy as np


def _checked_matrix(scores: np.ndarray) -> np.ndarray:
    arr = np.asarray(scores)
    if arr.ndim != 2:
        raise ValueError(f"scores must be 2-D [n_train, n_val], got shape {arr.shape}")
    if arr.shape[0] == 0 or arr.shape[1] == 0:
        raise ValueError(f"scores must have at least one row and one column, got {arr.shape}")
    if not np.all(np.isfinite(arr)):
        raise ValueError("scores contain NaN or infinite values")
    return arr


def normalize_columns(scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-column z-score (sample std, ddof=1) as float64, dropping columns whose
    values are all identical. Returns (normalized matrix, kept column indices)."""
    arr = _checked_matrix(scores)
    if arr.shape[0] < 2:
        raise ValueError("z-scoring with ddof=1 needs at least 2 rows")
    # Exact test for zero variance: a float std of a constant column can be a
    # tiny non-zero number because of rounding in the mean.
    kept = np.flatnonzero(arr.max(axis=0) != arr.min(axis=0))
    if kept.size == 0:
        raise ValueError("every score column has zero variance; nothing to normalize against")
    # Fancy column indexing is slow on a large C-order matrix; skip it when nothing is dropped.
    z = arr.astype(np.float64) if kept.size == arr.shape[1] else arr[:, kept].astype(np.float64)
    mean = z.mean(axis=0)
    std = z.std(axis=0, ddof=1)
    z -= mean
    z /= std
    return z, kept


def _resolve_count(budget: int, n_rows: int) -> int:
    if isinstance(budget, bool) or not isinstance(budget, Integral):
        raise ValueError(f"budget must be an integer count, got {budget!r}")
    if budget <= 0:
        raise ValueError(f"budget must be positive, got {budget}")
    if budget > n_rows:
        raise ValueError(f"budget {budget} exceeds the number of rows {n_rows}")
    return int(budget)


def _prepare(scores: np.ndarray, budget: int, normalize: bool) -> tuple[np.ndarray, int]:
    if normalize:
        matrix, _ = normalize_columns(scores)
    else:
        matrix = _checked_matrix(scores).astype(np.float64)
    return matrix, _resolve_count(budget, matrix.shape[0])


def _top_rows_per_column(matrix: np.ndarray, depth: int) -> np.ndarray:
    """[m, depth] row indices: for each column its `depth` largest values, descending."""
    n, m = matrix.shape
    out = np.empty((m, depth), dtype=np.int64)
    for j in range(m):
        col = -np.ascontiguousarray(matrix[:, j])
        cand = np.argpartition(col, depth - 1)[:depth] if depth < n else np.arange(n)
        # Order among equal values is irrelevant: ties are resolved by scanning (see _lowest_tied_row).
        out[j] = cand[np.argsort(col[cand])]
    return out


def _greedy(matrix: np.ndarray, budget: int) -> tuple[np.ndarray, np.ndarray]:
    n, m = matrix.shape
    depth = budget  # pointers never pass more than budget - 1 selected rows
    order = _top_rows_per_column(matrix, depth)
    cols = np.arange(m)
    ptr = np.zeros(m, dtype=np.int64)
    top_row = order[:, 0].copy()
    colmax = matrix[top_row, cols]
    selected = np.zeros(n, dtype=bool)
    total = np.zeros(m, dtype=np.float64)
    ref = np.zeros(m, dtype=np.float64)
    picks = np.empty(budget, dtype=np.int64)
    gains = np.empty(budget, dtype=np.float64)

    for step in range(budget):
        vals = colmax - ref
        best = vals.max()
        winner = n
        for j in np.flatnonzero(vals == best):
            winner = min(winner, _lowest_tied_row(matrix, order[j], int(ptr[j]), j, ref[j], best, selected))
        picks[step], gains[step] = winner, best
        selected[winner] = True
        total += matrix[winner]
        ref = total / (step + 1)
        if step + 1 == budget:
            break
        stale = np.flatnonzero(top_row == winner)
        moving = stale
        while moving.size:
            ptr[moving] += 1
            top_row[moving] = order[moving, ptr[moving]]
            moving = moving[selected[top_row[moving]]]
        colmax[stale] = matrix[top_row[stale], stale]
    return picks, gains


def _lowest_tied_row(
    matrix: np.ndarray,
    column_order: np.ndarray,
    start: int,
    j: int,
    ref_j: float,
    best: float,
    selected: np.ndarray,
) -> int:
    """Lowest unselected row i with fl(matrix[i, j] - ref_j) == best, given that
    column_order[start] is the column's top unselected row and achieves it."""
    lowest = int(column_order[start])
    for pos in range(start + 1, column_order.size):
        row = int(column_order[pos])
        if matrix[row, j] - ref_j < best:
            return lowest
        if not selected[row]:
            lowest = min(lowest, row)
    if column_order.size == matrix.shape[0]:
        return lowest
    # Ties run past the partial sort (rare): fall back to a full column scan.
    tied = np.flatnonzero(((matrix[:, j] - ref_j) == best) & ~selected)
    return int(tied[0])


def bids_select_with_gains(
    scores: np.ndarray, budget: int, normalize: bool = True
) -> tuple[np.ndarray, np.ndarray]:
    """`bids_select` plus the winning value max_j (A[i, j] - ref[j]) of each step."""
    matrix, count = _prepare(scores, budget, normalize)
    return _greedy(matrix, count)


def bids_select(scores: np.ndarray, budget: int, normalize: bool = True) -> np.ndarray:
    """`budget` distinct row indices of `scores` in BIDS selection order (see module doc)."""
    return bids_select_with_gains(scores, budget, normalize)[0]


def bids_select_naive(scores: np.ndarray, budget: int, normalize: bool = True) -> np.ndarray:
    """Literal O(budget * n * m) loop of the definition; a reference for tests and benches."""
    matrix, count = _prepare(scores, budget, normalize)
    available = np.ones(matrix.shape[0], dtype=bool)
    total = np.zeros(matrix.shape[1], dtype=np.float64)
    ref = np.zeros(matrix.shape[1], dtype=np.float64)
    picks = np.empty(count, dtype=np.int64)
    for step in range(count):
        value = np.where(available, (matrix - ref).max(axis=1), -np.inf)
        picks[step] = int(np.argmax(value))  # argmax returns the first (lowest) index on ties
        available[picks[step]] = False
        total += matrix[picks[step]]
        ref = total / (step + 1)
    return picks


def explain_selection(
    scores: np.ndarray,
    selected: Sequence[int] | np.ndarray,
    column_labels: Sequence[Hashable],
    top: int = 3,
    normalize: bool = True,
) -> list[dict]:
    """Why was each selected row chosen: its `top` validation columns by
    (z-score-normalized, as BIDS sees them) influence, descending, ties to the
    lower column. Zero-variance columns are skipped: they cannot drive BIDS.

    Returns long-format records, one per (selected row, rank), with keys
    `selection_rank`, `row`, `rank`, `column`, `label`, `score`.
    """
    arr = _checked_matrix(scores)
    if len(column_labels) != arr.shape[1]:
        raise ValueError(f"{len(column_labels)} column labels for {arr.shape[1]} score columns")
    if top <= 0:
        raise ValueError(f"top must be positive, got {top}")
    rows = np.asarray(selected, dtype=np.int64)
    if rows.ndim != 1 or (rows.size and (rows.min() < 0 or rows.max() >= arr.shape[0])):
        raise ValueError(f"selected must be 1-D row indices in [0, {arr.shape[0]})")
    if normalize:
        matrix, kept = normalize_columns(arr)
        sub = matrix[rows]
    else:
        kept = np.arange(arr.shape[1])
        sub = arr[rows].astype(np.float64)
    n_top = min(top, kept.size)
    # Stable sort of negated values: ties keep the lower column first.
    best_cols = np.argsort(-sub, axis=1, kind="stable")[:, :n_top]
    records = []
    for sel_rank, (row, cols) in enumerate(zip(rows.tolist(), best_cols)):
        for rank, local in enumerate(cols.tolist()):
            column = int(kept[local])
            records.append(
                {
                    "selection_rank": sel_rank,
                    "row": row,
                    "rank": rank,
                    "column": column,
                    "label": column_labels[column],
                    "score": float(sub[sel_rank, local]),
                }
            )
    return records
