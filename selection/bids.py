"""BIDS selection (Dai et al. 2025, "Improving Influence-based Instruction
Tuning Data Selection for Balanced Learning of Diverse Capabilities").

Definition (every implementation here returns exactly this selection). `scores` is the raw
influence matrix `[n_train, n_val]`.
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
i.e. the step's best value is bit-identical to the naive one. Ties: columns are
sorted by (value descending, row index ascending), so a column's pointer row is
its lowest-index unselected row among those with the top value; the winner is
the lowest such row over all columns reaching the best value. A row with a
smaller value can only reach the same fl(A - ref) through rounding; that is
checked against the column's next smaller value, and in that rare case the
column is scanned in full. Heavily tied inputs (integer scores) stay fast.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from dataclasses import dataclass
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


def _as_fortran64(
    arr: np.ndarray, kept: np.ndarray, shift: np.ndarray | None = None, scale: np.ndarray | None = None
) -> np.ndarray:
    """float64 column-major copy of arr[:, kept], optionally (x - shift) / scale.

    Column-major so that each column is contiguous for the per-column sort; built
    in row blocks because a whole-matrix transposing copy is several times slower.
    """
    n = arr.shape[0]
    subset = kept.size != arr.shape[1]
    out = np.empty((n, kept.size), dtype=np.float64, order="F")
    for r0 in range(0, n, 4096):
        block = arr[r0 : r0 + 4096]
        block = (block[:, kept] if subset else block).astype(np.float64)
        if shift is not None:
            block -= shift
            block /= scale
        out[r0 : r0 + 4096] = block
    return out


def normalize_columns(scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-column z-score (sample std, ddof=1) as float64, dropping columns whose
    values are all identical. Returns (normalized matrix, kept column indices).

    The values equal `(x - x.mean(0)) / x.std(0, ddof=1)` on `x = scores.astype(float64)`
    bit for bit; the result is column-major (Fortran order).
    """
    arr = _checked_matrix(scores)
    if arr.shape[0] < 2:
        raise ValueError("z-scoring with ddof=1 needs at least 2 rows")
    # Exact test for zero variance: a float std of a constant column can be a
    # tiny non-zero number because of rounding in the mean.
    kept = np.flatnonzero(arr.max(axis=0) != arr.min(axis=0))
    if kept.size == 0:
        raise ValueError("every score column has zero variance; nothing to normalize against")
    # Column statistics are independent per column, so computing them on all
    # columns and indexing is the same as computing them on the kept ones.
    mean = arr.mean(axis=0, dtype=np.float64)[kept]
    std = arr.std(axis=0, ddof=1, dtype=np.float64)[kept]
    if not np.all(np.isfinite(std) & (std > 0)):
        raise ValueError("a non-constant score column has a standard deviation that underflows to 0")
    return _as_fortran64(arr, kept, mean, std), kept


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
        arr = _checked_matrix(scores)
        matrix = _as_fortran64(arr, np.arange(arr.shape[1]))
    return matrix, _resolve_count(budget, matrix.shape[0])


@dataclass
class _ColumnIndex:
    """Per column j, its top `depth` rows by (value descending, row index ascending)."""

    order: np.ndarray  # [m, depth] row ids
    run_end: np.ndarray  # [m, depth] first position holding a strictly smaller value (depth if none)
    below: np.ndarray  # [m] largest value of the column below the last listed value (-inf if none)


def _index_columns(matrix: np.ndarray, depth: int) -> _ColumnIndex:
    n, m = matrix.shape
    id_type = np.int32 if n < 2**31 else np.int64
    order = np.empty((m, depth), dtype=id_type)
    run_end = np.empty((m, depth), dtype=id_type)
    below = np.full(m, -np.inf)
    positions = np.arange(depth)
    for j in range(m):
        col = np.ascontiguousarray(matrix[:, j])  # no copy for the column-major matrix
        if depth < n:
            cut = n - depth
            part = np.argpartition(col, cut)
            cand = part[cut:]
            edge = col[cand[0]]  # argpartition puts the depth-th largest value at `cut`
            if np.count_nonzero(col == edge) > np.count_nonzero(col[cand] == edge):
                # Equal values straddle the cut, which argpartition makes arbitrarily: keep
                # the lowest row ids among them so in-list ties come first in index order.
                above = cand[col[cand] > edge]
                cand = np.concatenate([above, np.flatnonzero(col == edge)[: depth - above.size]])
                below[j] = np.max(col, where=col < edge, initial=-np.inf)
            else:
                below[j] = col[part[:cut]].max()  # all rows left out are strictly below edge
        else:
            cand = np.arange(n)
        values = col[cand]
        by_value = np.argsort(-values)
        cand, values = cand[by_value], values[by_value]
        if np.any(values[1:] == values[:-1]):
            by_value_then_id = np.lexsort((cand, -values))
            cand, values = cand[by_value_then_id], values[by_value_then_id]
            starts = np.flatnonzero(np.r_[True, values[1:] != values[:-1]])
            run_end[j] = np.r_[starts[1:], depth][np.searchsorted(starts, positions, side="right") - 1]
        else:
            run_end[j] = positions + 1
        order[j] = cand
    return _ColumnIndex(order, run_end, below)


def _greedy(matrix: np.ndarray, budget: int) -> tuple[np.ndarray, np.ndarray]:
    n, m = matrix.shape
    depth = budget  # a pointer passes only selected rows, at most budget - 1 of them
    index = _index_columns(matrix, depth)
    order, run_end = index.order, index.run_end
    cols = np.arange(m)
    ptr = np.zeros(m, dtype=np.int64)
    top_row = order[:, 0].astype(np.int64)
    colmax = matrix[top_row, cols]
    selected = np.zeros(n, dtype=bool)
    total = np.zeros(m, dtype=np.float64)
    ref = np.zeros(m, dtype=np.float64)
    picks = np.empty(budget, dtype=np.int64)
    gains = np.empty(budget, dtype=np.float64)

    for step in range(budget):
        vals = colmax - ref
        best = vals.max()
        tied_cols = np.flatnonzero(vals == best)
        # Each column's top row is its lowest-index unselected row with that value.
        # A lower-valued row can only tie through rounding of fl(A - ref); check the
        # column's next smaller value and scan the whole column in that (rare) case.
        ends = run_end[tied_cols, ptr[tied_cols]]
        next_vals = np.where(
            ends < depth,
            matrix[order[tied_cols, np.minimum(ends, depth - 1)], tied_cols],
            index.below[tied_cols],
        )
        winner = int(top_row[tied_cols].min())
        for j in tied_cols[(next_vals - ref[tied_cols]) == best]:
            tied = np.flatnonzero(((matrix[:, j] - ref[j]) == best) & ~selected)
            winner = min(winner, int(tied[0]))
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


def bids_select_with_gains(scores: np.ndarray, budget: int, normalize: bool = True) -> tuple[np.ndarray, np.ndarray]:
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
