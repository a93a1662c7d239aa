"""Paired bootstrap confidence intervals for differences between methods on the same test rows."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

DEFAULT_RESAMPLES = 2000
DEFAULT_CONFIDENCE = 0.95
# Bound the (resamples x rows) index matrix drawn at once; larger problems draw it in chunks.
_MAX_INDICES_PER_DRAW = 4_000_000


@dataclass(frozen=True)
class BootstrapInterval:
    """Mean of the paired differences with a percentile bootstrap interval around it."""

    mean: float
    low: float
    high: float
    n: int  # paired rows the interval was computed from

    @property
    def significant(self) -> bool:
        """The interval excludes zero (False when undefined)."""
        return bool(self.low > 0 or self.high < 0)


def paired_bootstrap(
    differences: np.ndarray,
    n_resamples: int = DEFAULT_RESAMPLES,
    confidence: float = DEFAULT_CONFIDENCE,
    seed: int = 0,
) -> BootstrapInterval:
    """Percentile bootstrap interval of the mean of per-row paired differences.

    ``differences[i]`` is method minus baseline on test row ``i`` (both evaluated on the
    same row, so resampling rows keeps the pairing). Draws ``n_resamples`` samples of the
    rows with replacement from ``numpy.random.default_rng(seed)`` and returns the
    ``(1 - confidence) / 2`` and ``(1 + confidence) / 2`` percentiles (numpy's linear
    interpolation) of the resampled means. Fewer than two rows: the mean with a NaN
    interval (one row says nothing about the spread), never significant.
    """
    if n_resamples < 1:
        raise ValueError(f"n_resamples must be >= 1, got {n_resamples}")
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    values = np.asarray(differences, dtype=np.float64)
    if values.ndim != 1:
        raise ValueError(f"differences must be one value per row, got shape {values.shape}")
    if not np.isfinite(values).all():
        raise ValueError("differences contain NaN or inf; drop rows that are not scored for both sides first")
    n = len(values)
    if n == 0:
        return BootstrapInterval(math.nan, math.nan, math.nan, 0)
    mean = float(values.mean())
    if n == 1:
        return BootstrapInterval(mean, math.nan, math.nan, 1)
    if np.ptp(values) == 0:  # every resample has this mean; summing would only add rounding noise
        return BootstrapInterval(float(values[0]), float(values[0]), float(values[0]), n)
    rng = np.random.default_rng(seed)
    per_draw = max(1, _MAX_INDICES_PER_DRAW // n)
    means = np.empty(n_resamples)
    for start in range(0, n_resamples, per_draw):
        stop = min(start + per_draw, n_resamples)
        means[start:stop] = values[rng.integers(0, n, size=(stop - start, n))].mean(axis=1)
    alpha = (1 - confidence) / 2
    low, high = np.percentile(means, [100 * alpha, 100 * (1 - alpha)])
    return BootstrapInterval(mean, float(low), float(high), n)
