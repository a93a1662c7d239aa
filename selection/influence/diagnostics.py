"""Is a gradient feature matrix informative? Cheap summary statistics of stored features.

Cosine influence only ranks examples when their features point in different directions.
When the warmup checkpoint is barely trained (a few optimizer steps, so Adam's second
moment is tiny and ``m / sqrt(v)`` saturates) every example's feature ends up close to
one shared direction: scores then mostly reflect that direction, not the example. The
statistics, computed on the L2-normalized rows:

- ``mean_feature_norm``: norm of the mean row over all rows. Isotropic features give
  about ``1 / sqrt(n_rows)``; features sharing one direction give close to 1.
- ``mean_pairwise_cosine``: mean cosine over distinct pairs of a seeded sample of at
  most ``sample_size`` rows (about 0 when isotropic).
- ``saturated_share``: share of coordinates within 10% of their row's largest absolute
  value, averaged over the sample (1 for sign-like rows, near 0 for Gaussian-like ones).

``collapsed``: ``mean_feature_norm > COLLAPSE_MEAN_NORM`` with at least
``MIN_ROWS_TO_JUDGE`` rows (with fewer, even isotropic rows have a large mean).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from selection.influence import influence_store

COLLAPSE_MEAN_NORM = 0.5
# Isotropic rows have E|mean|^2 = 1 / n: at 16 rows that is 0.25, far below the threshold's 0.5^2.
MIN_ROWS_TO_JUDGE = 16
SATURATION_FRACTION = 0.9
DEFAULT_SAMPLE_SIZE = 512
_CHUNK_ROWS = 4096


@dataclass(frozen=True)
class FeatureDiagnostics:
    n_rows: int
    dim: int
    mean_feature_norm: float | None  # None without rows
    mean_pairwise_cosine: float | None  # None with fewer than two rows
    saturated_share: float | None
    n_sampled: int
    collapsed: bool

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    def describe(self) -> str:
        """One line for logs and metadata."""
        if self.mean_feature_norm is None:
            return "no rows"
        cosine = "n/a" if self.mean_pairwise_cosine is None else f"{self.mean_pairwise_cosine:.2f}"
        return (
            f"mean-feature norm {self.mean_feature_norm:.2f} over {self.n_rows} rows, mean pairwise cosine "
            f"{cosine} ({self.n_sampled} sampled), saturated share {self.saturated_share:.2f}"
        )


def _unit_rows(rows: np.ndarray) -> np.ndarray:
    rows = np.asarray(rows, dtype=np.float32)
    norms = np.linalg.norm(rows, axis=1, keepdims=True)
    return np.divide(rows, norms, out=np.zeros_like(rows), where=norms > 0)


def feature_diagnostics(
    blocks: np.ndarray | Iterable[np.ndarray], sample_size: int = DEFAULT_SAMPLE_SIZE, seed: int = 0
) -> FeatureDiagnostics:
    """Diagnostics of a ``[n, dim]`` feature matrix given whole or as row blocks (e.g. the
    memory-mapped shards of a store, read one at a time); see the module docstring."""
    if sample_size < 2:
        raise ValueError(f"sample_size must be >= 2, got {sample_size}")
    parts: Sequence[np.ndarray] = [blocks] if isinstance(blocks, np.ndarray) else list(blocks)
    if any(part.ndim != 2 for part in parts):
        raise ValueError("features must be 2-d [rows, dim] arrays")
    dims = {part.shape[1] for part in parts}
    if len(dims) > 1:
        raise ValueError(f"feature blocks differ in dim: {sorted(dims)}")
    dim = dims.pop() if dims else 0
    n_rows = sum(part.shape[0] for part in parts)
    if n_rows == 0:
        return FeatureDiagnostics(0, dim, None, None, None, 0, False)
    total = np.zeros(dim, dtype=np.float64)
    for part in parts:
        for start in range(0, part.shape[0], _CHUNK_ROWS):
            total += _unit_rows(part[start : start + _CHUNK_ROWS]).sum(axis=0, dtype=np.float64)
    mean_norm = float(np.linalg.norm(total / n_rows))

    chosen = np.sort(np.random.default_rng(seed).choice(n_rows, size=min(n_rows, sample_size), replace=False))
    offsets = np.cumsum([0] + [part.shape[0] for part in parts])
    sample = _unit_rows(
        np.concatenate(
            [
                np.asarray(part[chosen[(chosen >= lo) & (chosen < hi)] - lo])
                for part, lo, hi in zip(parts, offsets[:-1], offsets[1:])
            ]
        )
    )
    m = sample.shape[0]
    # Sum of all pairwise cosines from the norm of the sum: no m x m matrix.
    summed = sample.sum(axis=0, dtype=np.float64)
    self_similarity = float(np.sum(np.einsum("ij,ij->i", sample, sample, dtype=np.float64)))
    cosine = float((summed @ summed - self_similarity) / (m * (m - 1))) if m > 1 else None
    magnitude = np.abs(sample)
    row_max = magnitude.max(axis=1, keepdims=True)
    nonzero = row_max[:, 0] > 0
    saturated = (magnitude >= SATURATION_FRACTION * row_max).mean(axis=1)
    saturated_share = float(saturated[nonzero].mean()) if nonzero.any() else 0.0
    collapsed = n_rows >= MIN_ROWS_TO_JUDGE and mean_norm > COLLAPSE_MEAN_NORM
    return FeatureDiagnostics(n_rows, dim, mean_norm, cosine, saturated_share, m, collapsed)


def collapsed_feature_reason(
    con: Any, model: str, warmup_run_key: str, key: influence_store.FeatureKey, dropped_directions: int = 0
) -> tuple[bool | None, str]:
    """Whether the features behind an influence run are informative, with a reason.

    ``(False, why)`` when any stored train or target feature set of that (model, warmup run,
    mode, dim, seed, train transform, loss tokens) collapsed and the run scored them as stored;
    ``(True, ...)`` when all were checked and none did, or when the run removed the pool's mean and top
    directions before the cosine (``dropped_directions``), which takes the shared direction out of the
    scores; ``(None, ...)`` when no diagnostics were recorded (stores written before diagnostics existed)."""
    rows = influence_store.latest_diagnostics(con, model, warmup_run_key, key)
    if not rows:
        return None, "no feature diagnostics recorded for these features; rematerialize train_gradients"
    bad = [row for row in rows if row[7]]
    if not bad:
        return True, f"none of {len(rows)} feature sets collapsed"
    kind, epoch, shard, steps, n_rows, norm, cosine, _ = bad[0]
    where = f"{kind} features of epoch {epoch}{f' shard {shard}' if shard else ''}"
    cosine_text = "n/a" if cosine is None else f"{cosine:.2f}"
    found = (
        f"{len(bad)} of {len(rows)} feature sets collapsed onto one direction, e.g. {where}: mean-feature norm "
        f"{norm:.2f} (> {COLLAPSE_MEAN_NORM}), mean pairwise cosine {cosine_text} over {n_rows} rows after "
        f"{steps} warmup optimizer steps"
    )
    if dropped_directions:
        return True, (
            f"{found}; the influence run removed the pool's mean and top {dropped_directions} directions "
            "before the cosine, so that shared direction does not rank the scores"
        )
    return False, (
        f"{found}; scores then rank mostly by that shared direction. Train the warmup longer (more examples, "
        "epochs or a smaller batch_size) and recompute the features, or remove the common directions "
        "(influence_scores' dropped_directions)"
    )
