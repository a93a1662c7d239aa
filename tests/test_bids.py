import numpy as np
import pytest

from selection.bids import (
    bids_select,
    bids_select_naive,
    bids_select_with_gains,
    explain_selection,
    normalize_columns,
)


def literal_bids(scores, budget, normalize=True):
    """The definition in `selection.bids`'s docstring, written as plainly as possible, independent of the module."""
    a = np.asarray(scores, dtype=np.float64)
    if normalize:
        a = a[:, a.max(axis=0) != a.min(axis=0)]
        a = (a - a.mean(axis=0)) / a.std(axis=0, ddof=1)
    chosen = []
    ref = np.zeros(a.shape[1])
    for _ in range(budget):
        best_i, best_v = None, -np.inf
        for i in range(a.shape[0]):
            if i in chosen:
                continue
            v = np.max(a[i] - ref)
            if v > best_v:  # strict: an equal value later never replaces the lower index
                best_i, best_v = i, v
        chosen.append(best_i)
        ref = a[chosen].mean(axis=0)
    return np.asarray(chosen)


def test_hand_computed_balance_beats_plain_max():
    scores = np.array([[5.0, 0.0], [4.9, 0.0], [0.0, 1.0]])
    # step 0: row 0 (5); ref=[5,0]; row 1 -> max(-0.1, 0)=0, row 2 -> max(-5, 1)=1
    np.testing.assert_array_equal(bids_select(scores, 2, normalize=False), [0, 2])
    picks, gains = bids_select_with_gains(scores, 3, normalize=False)
    np.testing.assert_array_equal(picks, [0, 2, 1])
    np.testing.assert_allclose(gains, [5.0, 1.0, 2.4])  # ref=[2.5, 0.5] at step 2: max(4.9-2.5, -0.5)


def test_hand_computed_ties_go_to_lowest_index():
    scores = np.array([[3.0, 0.0], [0.0, 3.0], [2.0, 2.0], [1.0, 1.0], [3.0, 0.0]])
    # step 0: rows 0, 1, 4 tie at 3 -> 0; ref=[3,0]: row 1 -> 3, row 4 -> 0 -> row 1;
    # ref=[1.5,1.5]: row 2 -> 0.5, row 4 -> 1.5 -> row 4; ref=[2,1]: row 2 -> 1, row 3 -> 0
    np.testing.assert_array_equal(bids_select(scores, 4, normalize=False), [0, 1, 4, 2])
    np.testing.assert_array_equal(bids_select(np.ones((5, 3)), 5, normalize=False), [0, 1, 2, 3, 4])


def test_zero_variance_columns_are_dropped_before_z_scoring():
    scores = np.array([[1.0, 7.0, 0.0], [2.0, 7.0, 0.0], [3.0, 7.0, 1.0]])
    z, kept = normalize_columns(scores)
    np.testing.assert_array_equal(kept, [0, 2])
    s = np.sqrt(1 / 3)  # sample std of [0, 0, 1]
    np.testing.assert_allclose(z, [[-1, -1 / 3 / s], [0, -1 / 3 / s], [1, 2 / 3 / s]])
    # step 0: row 2 (z=1.155); ref=[1, 1.155]: row 0 -> -1.732, row 1 -> -1 -> row 1
    np.testing.assert_array_equal(bids_select(scores, 3), [2, 1, 0])
    with pytest.raises(ValueError, match="zero variance"):
        bids_select(np.full((4, 2), 0.3), 2)


def test_single_target_column_is_plain_descending_order():
    col = np.random.default_rng(3).integers(0, 5, size=(40, 1)).astype(float)
    expected = np.argsort(-col[:, 0], kind="stable")[:25]
    np.testing.assert_array_equal(bids_select(col, 25), expected)
    np.testing.assert_array_equal(bids_select(col, 25, normalize=False), expected)


def test_budget_errors():
    scores = np.random.default_rng(0).standard_normal((4, 3))
    with pytest.raises(ValueError, match="exceeds the number of rows 4"):
        bids_select(scores, 5)
    for bad in (0, -1, 2.0):
        with pytest.raises(ValueError):
            bids_select(scores, bad)
    with pytest.raises(ValueError, match="NaN"):
        bids_select(np.array([[1.0, np.nan], [0.0, 1.0]]), 1)
    with pytest.raises(ValueError, match="at least 2 rows"):
        bids_select(np.ones((1, 3)), 1)


def _adversarial_matrices(rng):
    yield rng.standard_normal((60, 7))
    yield rng.integers(0, 3, size=(50, 6)).astype(float)  # many exact ties
    yield np.repeat(rng.standard_normal((10, 4)), 5, axis=0)  # duplicated rows
    yield np.round(rng.standard_normal((40, 5)), 1) * 0.1  # decimal values, rounding-prone ties
    m = rng.standard_normal((30, 5))
    m[:, 2] = 4.2  # a zero-variance column
    yield m
    low_rank = rng.standard_normal((80, 2)) @ rng.standard_normal((2, 9))  # correlated columns
    yield low_rank.astype(np.float32)


@pytest.mark.parametrize("normalize", [True, False])
def test_fast_equals_naive_on_random_and_adversarial(normalize):
    rng = np.random.default_rng(7)
    for matrix in _adversarial_matrices(rng):
        for budget in (1, matrix.shape[0] // 3, matrix.shape[0]):
            fast = bids_select(matrix, budget, normalize)
            np.testing.assert_array_equal(fast, literal_bids(matrix, budget, normalize))
            np.testing.assert_array_equal(fast, bids_select_naive(matrix, budget, normalize))
            assert np.unique(fast).size == budget


def test_fast_equals_naive_on_larger_partial_budget():
    # budget << n exercises the partial per-column sort and the tie scan past it
    rng = np.random.default_rng(11)
    continuous = rng.standard_normal((3000, 40))
    tied = rng.integers(0, 4, size=(3000, 40)).astype(float)
    for matrix in (continuous, tied):
        np.testing.assert_array_equal(bids_select(matrix, 150), bids_select_naive(matrix, 150))


def test_explain_selection_top_columns():
    scores = np.array([[0.1, 0.5, 0.3, 0.5], [0.0, 0.0, 0.0, 0.0]])
    records = explain_selection(scores, [0], ["a", "b", "c", "d"], top=3, normalize=False)
    assert [(r["rank"], r["column"], r["label"]) for r in records] == [(0, 1, "b"), (1, 3, "d"), (2, 2, "c")]
    assert records[0]["score"] == pytest.approx(0.5)
    assert {r["selection_rank"] for r in records} == {0} and {r["row"] for r in records} == {0}


def test_explain_selection_uses_normalized_scores_and_skips_constant_columns():
    scores = np.array([[10.0, 0.2, 5.0], [20.0, 0.1, 5.0], [30.0, 0.0, 5.0]])
    records = explain_selection(scores, [2, 0], ["x", "y", "z"], top=3)
    by_row = {}
    for r in records:
        by_row.setdefault(r["row"], []).append(r["label"])
    assert by_row == {2: ["x", "y"], 0: ["y", "x"]}  # z is constant; z-scores rank columns
    with pytest.raises(ValueError, match="column labels"):
        explain_selection(scores, [0], ["x"])
