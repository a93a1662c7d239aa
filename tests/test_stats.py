"""Paired bootstrap intervals: hand-built cases checked against independent computations."""

from __future__ import annotations

import math

import numpy as np
import pytest

from selection.evaluate import stats
from selection.evaluate.stats import paired_bootstrap


def test_constant_differences_give_a_zero_width_interval_at_that_value() -> None:
    interval = paired_bootstrap(np.full(7, 0.1), n_resamples=500, seed=3)
    assert (interval.mean, interval.low, interval.high, interval.n) == (0.1, 0.1, 0.1, 7)
    assert interval.significant
    zero = paired_bootstrap(np.zeros(5))
    assert (zero.low, zero.high) == (0.0, 0.0) and not zero.significant


def test_interval_equals_a_direct_numpy_percentile_bootstrap_with_the_same_seed() -> None:
    differences = np.random.default_rng(11).normal(0.2, 1.0, size=50)
    interval = paired_bootstrap(differences, n_resamples=2000, confidence=0.9, seed=7)
    indices = np.random.default_rng(7).integers(0, 50, size=(2000, 50))
    expected = np.percentile(differences[indices].mean(axis=1), [5, 95])
    assert (interval.low, interval.high) == pytest.approx(tuple(expected), abs=1e-12)
    assert interval.mean == pytest.approx(differences.mean())


def test_chunked_resampling_draws_the_same_resamples(monkeypatch: pytest.MonkeyPatch) -> None:
    differences = np.random.default_rng(5).normal(size=37)
    whole = paired_bootstrap(differences, n_resamples=101, seed=2)
    monkeypatch.setattr(stats, "_MAX_INDICES_PER_DRAW", 40)  # one resample per draw
    assert paired_bootstrap(differences, n_resamples=101, seed=2) == whole


def test_interval_agrees_with_the_normal_approximation_on_many_rows() -> None:
    differences = np.random.default_rng(0).normal(0.3, 1.0, size=400)
    interval = paired_bootstrap(differences, n_resamples=4000, seed=1)
    half_width = 1.959964 * differences.std(ddof=1) / math.sqrt(len(differences))
    assert interval.low == pytest.approx(differences.mean() - half_width, abs=0.1 * half_width)
    assert interval.high == pytest.approx(differences.mean() + half_width, abs=0.1 * half_width)
    assert interval.significant  # the true mean 0.3 is about six standard errors from zero


def test_significance_needs_the_interval_to_exclude_zero() -> None:
    centred = np.array([-1.0, 1.0, -0.5, 0.5, -0.2, 0.2, 0.1, -0.1])
    assert not paired_bootstrap(centred).significant
    assert paired_bootstrap(centred + 2.0).significant and paired_bootstrap(centred - 2.0).significant
    single = paired_bootstrap(np.array([0.4]))  # one row says nothing about the spread
    assert single.mean == 0.4 and math.isnan(single.low) and not single.significant
    empty = paired_bootstrap(np.array([]))
    assert math.isnan(empty.mean) and empty.n == 0 and not empty.significant


def test_bad_inputs_raise() -> None:
    with pytest.raises(ValueError, match="NaN"):
        paired_bootstrap(np.array([1.0, math.nan]))
    with pytest.raises(ValueError, match="confidence"):
        paired_bootstrap(np.ones(3), confidence=1.0)
    with pytest.raises(ValueError, match="n_resamples"):
        paired_bootstrap(np.ones(3), n_resamples=0)
    with pytest.raises(ValueError, match="one value per row"):
        paired_bootstrap(np.ones((2, 2)))
