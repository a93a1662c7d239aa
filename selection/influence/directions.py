"""Remove what every pool feature shares before the cosine: the pool's mean and its top principal
directions ("all but the top", Mu and Viswanath 2018).

Gradient features of a pool share a few large directions (the chat template, the answer format,
what a short warmup has not learned yet): the mean unit feature of a pool often has a norm above
0.8, so every cosine is mostly that common part and the ranking follows it, not the target.
Centring on the pool's mean and projecting out its top ``count`` principal directions leaves what
tells examples apart. Both train and val features of a checkpoint go through the same map, fitted
on the train features of that checkpoint; the influence computation normalizes rows afterwards.

The directions are fitted on at most ``SAMPLE_ROWS`` rows drawn with a fixed seed (the leading
directions of a pool are well estimated by a few thousand of its rows), read chunk by chunk, so the
fit costs one pass over the memory-mapped features and an eigendecomposition of a
``SAMPLE_ROWS``-square Gram matrix, whatever the pool size.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

# Default count, measured by bench/gradient_signal.py on an 800-row planted pool (sgd features of
# the whole sequence): LESS/BIDS planted recall over the base rate 3.00x/3.58x as stored,
# 6.83x/6.00x without 4 directions, 7.33x/6.33x without 8, 7.50x/6.58x without 16, 7.00x/5.92x without 32.
DEFAULT_DROPPED_DIRECTIONS = 8
SAMPLE_ROWS = 4096
READ_ROWS = 8192
DROPPED_WHY = (
    "differs from LESS (plain cosine): the pool's mean and top {count} principal directions are removed "
    "from train and val features before the cosine, since every feature shares them and they would rank "
    "the pool by its common part (planted recall 3.0x the base rate with none removed, 7.3x with 8)"
)


class Rows(Protocol):
    """A `[n, dim]` array or a view that supports contiguous row slices (``scores.ChunkedRows``)."""

    shape: tuple[int, int]

    def __getitem__(self, rows: slice) -> Any: ...


def dropped_why(count: int) -> str:
    """One line on how removing ``count`` directions differs from LESS ("" when none are removed)."""
    return DROPPED_WHY.format(count=count) if count else ""


def check_count(count: int, n_rows: int, dim: int) -> int:
    if count < 0:
        raise ValueError(f"dropped_directions must be >= 0, got {count}")
    # Removing as many directions as there are rows (or dims) leaves nothing to compare.
    if count and count >= min(n_rows, dim):
        raise ValueError(
            f"dropped_directions {count} must be below the number of train rows ({n_rows}) and the feature dim ({dim})"
        )
    return count


def usable_count(count: int, n_rows: int, dim: int) -> int:
    """``count``, lowered to a quarter of the train rows and of the dim: a small pool has few
    shared directions to remove, and removing many of its few would leave too little to rank by."""
    if count < 0:
        raise ValueError(f"dropped_directions must be >= 0, got {count}")
    return min(count, min(n_rows, dim) // 4)


@dataclass(frozen=True)
class CommonDirections:
    """The pool's mean feature and its top principal directions (orthonormal rows)."""

    mean: np.ndarray  # [dim] float32
    directions: np.ndarray  # [count, dim] float32

    def remove(self, features: np.ndarray) -> np.ndarray:
        """Features centred on the mean, without their part along the directions (float32, not normalized)."""
        centred = np.asarray(features, dtype=np.float32) - self.mean
        return centred - (centred @ self.directions.T) @ self.directions


def _unit(rows: np.ndarray) -> np.ndarray:
    rows = np.asarray(rows, dtype=np.float32)
    norms = np.linalg.norm(rows, axis=1, keepdims=True)
    return rows / np.where(norms > 0, norms, 1.0)


def fit(rows: Rows, count: int, seed: int = 0, sample_rows: int = SAMPLE_ROWS) -> CommonDirections:
    """Mean and top ``count`` principal directions of the unit rows of ``rows`` (all rows when there
    are at most ``sample_rows``, else a seeded sample of them)."""
    n_rows, dim = rows.shape
    check_count(count, n_rows, dim)
    rng = np.random.default_rng(seed)
    take = np.sort(rng.choice(n_rows, size=sample_rows, replace=False)) if n_rows > sample_rows else None
    parts = []
    for start in range(0, n_rows, READ_ROWS):
        block = _unit(rows[start : start + READ_ROWS])
        if take is not None:
            inside = take[(take >= start) & (take < start + READ_ROWS)] - start
            block = block[inside]
        parts.append(block)
    sample = np.concatenate(parts).astype(np.float64)
    mean = sample.mean(axis=0)
    centred = sample - mean
    if count == 0:
        return CommonDirections(mean.astype(np.float32), np.zeros((0, dim), np.float32))
    # Top right singular vectors from the smaller of the Gram and covariance matrices: exact, deterministic.
    gram_side = len(centred) <= dim
    values, vectors = np.linalg.eigh(centred @ centred.T if gram_side else centred.T @ centred)
    order = np.argsort(values)[::-1][:count]
    # A direction with no variance is noise from the eigensolver, not something the pool shares.
    if values[order[-1]] <= 1e-9 * max(float(values.sum()), 1e-30):
        raise ValueError(
            f"the train features span fewer than {count} directions beyond their mean; lower dropped_directions"
        )
    top = centred.T @ vectors[:, order] if gram_side else vectors[:, order]  # [dim, count]
    norms = np.linalg.norm(top, axis=0)
    return CommonDirections(mean.astype(np.float32), (top / norms).T.astype(np.float32))


class WithoutDirections:
    """A row-slice view of ``rows`` with ``directions`` removed from every unit row (see ``fit``)."""

    def __init__(self, rows: Rows, directions: CommonDirections) -> None:
        self.rows = rows
        self.directions = directions
        self.shape = tuple(rows.shape)
        self.ndim = 2

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, rows: slice) -> np.ndarray:
        return self.directions.remove(_unit(self.rows[rows]))
