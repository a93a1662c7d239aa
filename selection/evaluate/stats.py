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


# ------------------------------------------------------------------ the report's rule

# Row differences of the null simulation: Student t with 3 degrees of freedom (heavy tails; a
# per-row NLL difference has occasional rows far out, an accuracy difference only -1/0/1).
NULL_DF = 3
NULL_DATASETS = 500
# Per-seed shift of a side's values in the simulation with several seeds, in units of the row noise's scale.
NULL_SEED_SD = 0.5
SMALL_ROW_COUNT = 10  # below this, only very large differences can be told from zero


@dataclass(frozen=True)
class PairedDelta:
    """Mean paired difference (method minus baseline), its t interval and two-sided p-value."""

    mean: float
    low: float
    high: float
    n: int  # paired rows (finite for every seed of both sides)
    se: float  # standard error of ``mean``
    p_value: float  # NaN when undefined (fewer than two rows)
    n_seeds: tuple[int, int] = (1, 1)  # (method, baseline)

    @property
    def significant(self) -> bool:
        """The interval excludes zero: the same as ``p_value < 1 - confidence`` (before any correction)."""
        return bool(self.low > 0 or self.high < 0)


def _seed_matrix(values: np.ndarray, name: str) -> np.ndarray:
    matrix = np.asarray(values, dtype=np.float64)
    if matrix.ndim == 1:
        matrix = matrix[None, :]
    if matrix.ndim != 2 or matrix.shape[0] < 1:
        raise ValueError(f"{name} must be one row of values per seed, got shape {matrix.shape}")
    return matrix


def hierarchical_bootstrap_means(
    method: np.ndarray, baseline: np.ndarray, n_resamples: int = DEFAULT_RESAMPLES, seed: int = 0
) -> np.ndarray:
    """``n_resamples`` bootstrap means of the paired difference, resampling seeds and rows.

    ``method`` is ``[seed, row]`` (or one row of values: one seed), ``baseline`` likewise, both
    on the same rows in the same order, every value finite. Each resample draws the rows with
    replacement (the same rows for both sides: the pairing is kept), then each side's seeds
    with replacement, and takes the mean over the drawn rows of (mean over the drawn method
    seeds minus mean over the drawn baseline seeds). A seed's effect on every row at once is
    thus in the spread, which averaging the seeds first would hide. Rows are drawn first and
    a side with one seed draws none, so with one seed per side these are exactly
    :func:`paired_bootstrap`'s resampled means for the same ``seed``.
    """
    if n_resamples < 1:
        raise ValueError(f"n_resamples must be >= 1, got {n_resamples}")
    x, y = _seed_matrix(method, "method"), _seed_matrix(baseline, "baseline")
    if x.shape[1] != y.shape[1]:
        raise ValueError(f"method and baseline must be on the same rows, got {x.shape[1]} and {y.shape[1]}")
    if not (np.isfinite(x).all() and np.isfinite(y).all()):
        raise ValueError("values contain NaN or inf; drop rows that are not scored for every seed first")
    n = x.shape[1]
    if n == 0:
        raise ValueError("no rows to resample")
    rng = np.random.default_rng(seed)
    per_draw = max(1, _MAX_INDICES_PER_DRAW // (n * max(x.shape[0], y.shape[0])))
    means = np.empty(n_resamples)
    difference = x[0] - y[0]
    for start in range(0, n_resamples, per_draw):
        stop = min(start + per_draw, n_resamples)
        rows = rng.integers(0, n, size=(stop - start, n))
        if x.shape[0] == 1 and y.shape[0] == 1:
            means[start:stop] = difference[rows].mean(axis=1)
            continue
        side_means = []
        for side in (x, y):
            if side.shape[0] == 1:
                side_means.append(side[0][rows])
            else:  # [resample, seed draw, row] -> mean over the drawn seeds of the drawn rows
                seeds = rng.integers(0, side.shape[0], size=(stop - start, side.shape[0]))
                side_means.append(side[seeds[:, :, None], rows[:, None, :]].mean(axis=1))
        means[start:stop] = (side_means[0] - side_means[1]).mean(axis=1)
    return means


def _t_quantile(probability: float, df: float) -> float:
    from scipy.stats import t  # scikit-learn's dependency; imported here to keep this module light

    return float(t.ppf(probability, df))


def _t_p_value(statistic: np.ndarray | float, df: float) -> np.ndarray:
    from scipy.stats import t

    return 2 * t.sf(np.abs(statistic), df)


def _interaction_mean_square(side: np.ndarray) -> float:
    """Residual mean square of a ``[seed, row]`` table after seed and row means (0 with one seed)."""
    seeds, rows = side.shape
    if seeds < 2 or rows < 2:
        return 0.0
    residual = side - side.mean(axis=1, keepdims=True) - side.mean(axis=0, keepdims=True) + side.mean()
    return float((residual**2).sum() / ((seeds - 1) * (rows - 1)))


def paired_delta(
    method: np.ndarray,
    baseline: np.ndarray,
    n_resamples: int = DEFAULT_RESAMPLES,
    confidence: float = DEFAULT_CONFIDENCE,
    seed: int = 0,
) -> PairedDelta:
    """The report's rule: a t interval and p-value whose standard error includes the seeds.

    ``method`` / ``baseline``: ``[seed, row]`` values on the same rows (a 1-D array is one
    seed); rows not finite for every seed of both sides are left out. The estimate is the
    mean over rows of (method's seed mean minus baseline's seed mean). Its standard error is

    - one seed per side: ``s / sqrt(n)`` of the per-row differences (the limit of the row
      bootstrap's spread, times ``sqrt(n / (n - 1))``), i.e. the paired t-test;
    - several seeds on a side: that, plus the seeds' part of the spread of
      :func:`hierarchical_bootstrap_means` (seeds and rows resampled): its variance minus the
      row bootstrap's, scaled by ``s / (s - 1)`` (resampling ``s`` seeds shrinks it so; ``s``
      the fewest seeds of a side with several), minus the seed x row residual mean square over
      ``n * s`` per side (row noise, already in the rows' part). Seed-to-seed variance is thus
      in the interval.

    Interval: ``mean +- t_{df, (1 + confidence) / 2} * se``; p-value: two-sided from
    ``mean / se`` on ``df`` degrees of freedom (``n - 1`` for the rows; with seeds,
    Welch-Satterthwaite with ``sum(s - 1)`` for the seeds' part), so the interval excludes
    zero exactly when ``p < 1 - confidence``. Why not the percentile bootstrap: its interval is too narrow at
    few rows (the resampled means' spread is ``sqrt((n - 1) / n)`` of the standard error, and
    normal rather than t quantiles), so at 5 rows it marks about 15% of truly-zero differences
    at 95%. The t interval is exact for normal differences and conservative for symmetric
    heavier-tailed ones (a paired difference under "no difference" is symmetric);
    :func:`null_false_positive_rate` measures it.
    Fewer than two rows: the mean with NaN interval and p-value. Zero spread: a zero-width
    interval at the mean, p = 0 (or 1 when the mean is 0).
    """
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    x, y = _seed_matrix(method, "method"), _seed_matrix(baseline, "baseline")
    if x.shape[1] != y.shape[1]:
        raise ValueError(f"method and baseline must be on the same rows, got {x.shape[1]} and {y.shape[1]}")
    keep = np.isfinite(x).all(axis=0) & np.isfinite(y).all(axis=0)
    x, y = x[:, keep], y[:, keep]
    seeds = (x.shape[0], y.shape[0])
    n = int(keep.sum())
    if n == 0:
        return PairedDelta(math.nan, math.nan, math.nan, 0, math.nan, math.nan, seeds)
    difference = x.mean(axis=0) - y.mean(axis=0)
    mean = float(difference.mean())
    if n == 1:
        return PairedDelta(mean, math.nan, math.nan, 1, math.nan, math.nan, seeds)
    row_variance = float(difference.var(ddof=1) / n) if np.ptp(difference) > 0 else 0.0
    seed_variance, seed_df = 0.0, 0
    if seeds != (1, 1) and not (np.ptp(x - x[:1]) == 0 and np.ptp(y - y[:1]) == 0):
        # The hierarchical spread minus the rows' own (the row bootstrap's limit) is the seeds' part;
        # resampling s seeds shrinks it by (s - 1) / s, undone with the fewest seeds of a side. It also
        # holds the seed x row noise, already in the rows' part: taken out, so it gets the rows' df.
        total = float(hierarchical_bootstrap_means(x, y, n_resamples, seed).var())
        fewest = min(s for s in seeds if s > 1)
        interaction = sum(_interaction_mean_square(side) / (n * side.shape[0]) for side in (x, y))
        seed_variance = max((total - row_variance * (n - 1) / n) * fewest / (fewest - 1) - interaction, 0.0)
        seed_df = sum(s - 1 for s in seeds)
    se = math.sqrt(row_variance + seed_variance)
    if se == 0:
        return PairedDelta(mean, mean, mean, n, 0.0, 1.0 if mean == 0 else 0.0, seeds)
    # Welch-Satterthwaite: a seed part estimated from a handful of seeds has few degrees of freedom.
    df = (row_variance + seed_variance) ** 2 / (
        row_variance**2 / (n - 1) + (seed_variance**2 / seed_df if seed_df else 0.0)
    )
    half = _t_quantile((1 + confidence) / 2, df) * se
    p_value = float(_t_p_value(mean / se, df))
    return PairedDelta(mean, mean - half, mean + half, n, se, p_value, seeds)


def holm(p_values: np.ndarray) -> np.ndarray:
    """Holm's step-down adjustment: reject ``p_holm < alpha`` keeps the family-wise error at alpha.

    The ``m`` finite p-values sorted ascending get ``max_{j <= i} min(1, (m - j + 1) p_(j))``;
    NaN stays NaN and is not counted in ``m``.
    """
    values = np.asarray(p_values, dtype=np.float64)
    adjusted = np.full(values.shape, np.nan)
    finite = np.flatnonzero(np.isfinite(values))
    order = finite[np.argsort(values[finite], kind="stable")]
    m = len(order)
    scaled = np.minimum(1.0, (m - np.arange(m)) * values[order])
    adjusted[order] = np.maximum.accumulate(scaled) if m else scaled
    return adjusted


def old_percentile_rule(
    method: np.ndarray, baseline: np.ndarray, n_resamples: int = DEFAULT_RESAMPLES, seed: int = 0
) -> bool:
    """The rule the report used before: seed-averaged rows, percentile bootstrap excludes zero at 95%."""
    x, y = _seed_matrix(method, "method"), _seed_matrix(baseline, "baseline")
    return paired_bootstrap(x.mean(axis=0) - y.mean(axis=0), n_resamples, DEFAULT_CONFIDENCE, seed).significant


def null_false_positive_rate(
    n_rows: int,
    n_seeds: int = 1,
    rule: str = "t",
    n_datasets: int = NULL_DATASETS,
    n_resamples: int = 1000,
    seed_sd: float | None = None,
    df: int = NULL_DF,
    seed: int = 0,
) -> float:
    """Share of simulated datasets with a true zero difference that a rule marks significant.

    Each dataset has ``n_rows`` test rows and ``n_seeds`` seeds per side: value = a shift per
    (side, seed) drawn from ``Normal(0, seed_sd)`` (default: 0 with one seed, where a seed's
    shift cannot be told from the method's, else :data:`NULL_SEED_SD`) plus Student-t noise
    with ``df`` degrees of freedom per (side, seed, row). Both sides come from the same
    distribution, so every mark is a false positive. ``rule``: ``"t"``, the report's
    (:func:`paired_delta` at 95%, before Holm), or ``"percentile"``, the old one
    (:func:`old_percentile_rule`). Seeded: the same arguments give the same rate.
    """
    if n_rows < 2 or n_seeds < 1 or n_datasets < 1:
        raise ValueError(f"need n_rows >= 2, n_seeds >= 1, n_datasets >= 1; got {n_rows}, {n_seeds}, {n_datasets}")
    if rule not in ("t", "percentile"):
        raise ValueError(f"rule must be 't' or 'percentile', got {rule!r}")
    if seed_sd is None:
        seed_sd = 0.0 if n_seeds == 1 else NULL_SEED_SD
    rng = np.random.default_rng(seed)
    shape = (n_datasets, 2, n_seeds)
    values = rng.standard_t(df, size=(*shape, n_rows)) + rng.normal(0.0, seed_sd, size=shape)[..., None]
    if rule == "t" and n_seeds == 1:  # paired_delta's one-seed path, vectorized over datasets
        difference = values[:, 0, 0] - values[:, 1, 0]
        t_statistic = difference.mean(axis=1) / (difference.std(axis=1, ddof=1) / math.sqrt(n_rows))
        return float(np.mean(_t_p_value(t_statistic, n_rows - 1) < 1 - DEFAULT_CONFIDENCE))
    if rule == "t":
        marked = [paired_delta(d[0], d[1], n_resamples, seed=i).significant for i, d in enumerate(values)]
    else:
        marked = [old_percentile_rule(d[0], d[1], n_resamples, seed=i) for i, d in enumerate(values)]
    return float(np.mean(marked))
