import numpy as np
import pytest
from sklearn.datasets import make_blobs

from selection.kmq import (
    allocate_budget,
    allocate_weighted_budget,
    choose_k_by_silhouette,
    cluster,
    cluster_mean_scores,
    cluster_pool,
    iterative_kmq_round,
    iterative_round_budget,
    kmq_select,
    run_iterative_kmq,
    sample_within_clusters,
    update_cluster_weights,
)


def test_allocate_budget_hand_computed():
    # quotas 10*[5,3,2]/10 are exact
    np.testing.assert_array_equal(allocate_budget([5, 3, 2], 10), [5, 3, 2])
    # quotas 4*[5,3,2]/10 = [2.0, 1.2, 0.8]: floors [2,1,0], one leftover to the largest remainder (0.8)
    np.testing.assert_array_equal(allocate_budget([5, 3, 2], 4), [2, 1, 1])
    # equal remainders go to the lower index: 1*[1,1,1]/3
    np.testing.assert_array_equal(allocate_budget([1, 1, 1], 1), [1, 0, 0])
    np.testing.assert_array_equal(allocate_budget([1, 1, 1], 2), [1, 1, 0])
    np.testing.assert_array_equal(allocate_budget([0, 4, 0], 3), [0, 3, 0])
    np.testing.assert_array_equal(allocate_budget([3, 4], 0), [0, 0])


def test_allocate_budget_caps_and_redistributes_weighted_surplus():
    # mass favours cluster 0 (quota 9 * 0.9 = 8.1) but it only has 2 rows; the other 7 go to 1 and 2
    np.testing.assert_array_equal(allocate_weighted_budget([9.0, 0.5, 0.5], [2, 10, 10], 9), [2, 4, 3])
    np.testing.assert_array_equal(allocate_weighted_budget([1.0, 1.0], [1, 1], 2), [1, 1])
    with pytest.raises(ValueError, match="positive weight"):
        allocate_weighted_budget([1.0, 0.0], [1, 5], 2)


def test_allocate_budget_sums_exactly_and_respects_sizes_randomized():
    rng = np.random.default_rng(0)
    for _ in range(200):
        sizes = rng.integers(0, 50, size=rng.integers(1, 12))
        if sizes.sum() == 0:
            continue
        budget = int(rng.integers(0, sizes.sum() + 1))
        alloc = allocate_budget(sizes, budget)
        assert alloc.sum() == budget and np.all(alloc <= sizes) and np.all(alloc >= 0)
        # largest remainder: never more than one away from the exact quota
        assert np.all(np.abs(alloc - budget * sizes / sizes.sum()) < 1 + 1e-9)


def test_allocate_budget_errors():
    with pytest.raises(ValueError, match="exceeds the total"):
        allocate_budget([2, 3], 6)
    for sizes, budget in [([2, -1], 1), ([2, 3], -1), ([2.5, 3], 1), ([2, 3], 1.5)]:
        with pytest.raises(ValueError):
            allocate_budget(sizes, budget)


def test_silhouette_picks_planted_k():
    X, _ = make_blobs(n_samples=300, centers=5, n_features=8, cluster_std=0.6, random_state=0)
    best, curve = choose_k_by_silhouette(X, [2, 3, 5, 7], seed=0)
    assert best == 5 and set(curve) == {2, 3, 5, 7}
    assert curve[5] == max(curve.values())


def test_silhouette_picks_planted_k_with_minibatch_and_sampling():
    X, _ = make_blobs(n_samples=1500, centers=4, n_features=16, cluster_std=1.0, random_state=1)
    best, _ = choose_k_by_silhouette(X, [3, 4, 6], seed=0, sample_size=500, minibatch_above=1000)
    assert best == 4
    with pytest.raises(ValueError, match="2 <= k"):
        choose_k_by_silhouette(X, [1, 4], seed=0)


def test_cluster_is_seeded():
    X, _ = make_blobs(n_samples=200, centers=3, n_features=4, random_state=2)
    labels_a, centers = cluster(X, 3, seed=5)
    labels_b, _ = cluster(X, 3, seed=5)
    np.testing.assert_array_equal(labels_a, labels_b)
    assert centers.shape == (3, 4) and set(labels_a.tolist()) == {0, 1, 2}


def test_cluster_pool_searches_k_among_fitting_candidates_or_uses_a_fixed_k():
    X, _ = make_blobs(n_samples=60, centers=3, n_features=4, cluster_std=0.5, random_state=3)
    searched = cluster_pool(X, None, [1, 3, 5, 60], seed=0)  # 1 and 60 cannot be scored on 60 rows
    assert searched.k == 3 and set(searched.silhouette) == {3, 5}
    np.testing.assert_array_equal(searched.labels, cluster(X, 3, seed=0)[0])
    np.testing.assert_array_equal(searched.sizes, np.bincount(searched.labels, minlength=3))
    fixed = cluster_pool(X, 4, [3, 5], seed=0)
    assert fixed.k == 4 and fixed.silhouette == {} and fixed.sizes.sum() == 60
    with pytest.raises(ValueError, match=r"no k candidate in \[1, 60\] fits a pool of 60"):
        cluster_pool(X, None, [1, 60], seed=0)


def test_sampling_reproducible_within_cluster_and_respects_exclude():
    labels = np.repeat([0, 1, 2], 20)
    quality = np.linspace(-1, 1, 60)
    budget = [5, 0, 7]
    a = sample_within_clusters(labels, quality, budget, 0.5, seed=3)
    b = sample_within_clusters(labels, quality, budget, 0.5, seed=3)
    np.testing.assert_array_equal(a, b)
    assert np.unique(a).size == 12
    np.testing.assert_array_equal(np.bincount(labels[a], minlength=3), budget)
    exclude = np.arange(40, 50)
    c = sample_within_clusters(labels, quality, budget, 0.5, seed=3, exclude=exclude)
    assert not set(c.tolist()) & set(exclude.tolist())
    # taking a whole cluster returns all its rows
    whole = sample_within_clusters(labels, quality, [0, 20, 0], 1.0, seed=0)
    assert sorted(whole.tolist()) == list(range(20, 40))


def test_sampling_follows_softmax_quality():
    labels = np.zeros(3, dtype=int)
    quality = np.log(np.array([0.7, 0.2, 0.1]))  # softmax(quality / 1) == [0.7, 0.2, 0.1]
    rng = np.random.default_rng(0)
    firsts = [sample_within_clusters(labels, quality, [1], 1.0, rng)[0] for _ in range(4000)]
    np.testing.assert_allclose(np.bincount(firsts, minlength=3) / 4000, [0.7, 0.2, 0.1], atol=0.03)
    # a tiny temperature makes it greedy on quality
    greedy = sample_within_clusters(np.zeros(5, int), [0.1, 0.5, 0.3, 0.9, 0.2], [2], 1e-6, seed=1)
    np.testing.assert_array_equal(greedy, [3, 1])


def test_sampling_errors():
    labels = np.array([0, 0, 1])
    with pytest.raises(ValueError, match="NaN/infinite"):
        sample_within_clusters(labels, [0.1, np.nan, 0.2], [1, 1], 1.0, 0)
    with pytest.raises(ValueError, match="NaN/infinite"):
        sample_within_clusters(labels, [0.1, -np.inf, 0.2], [1, 1], 1.0, 0)
    with pytest.raises(ValueError, match="cluster 1 has 1 available"):
        sample_within_clusters(labels, [0.1, 0.1, 0.2], [1, 2], 1.0, 0)
    with pytest.raises(ValueError, match="temperature"):
        sample_within_clusters(labels, [0.1, 0.1, 0.2], [1, 1], 0.0, 0)


def test_kmq_select_with_labels_and_embeddings():
    labels = np.repeat([0, 1], [30, 10])
    result = kmq_select(np.zeros(40), 8, labels=labels, seed=0)
    np.testing.assert_array_equal(result.per_cluster_budget, [6, 2])
    assert result.indices.size == 8 and np.unique(result.indices).size == 8
    X, _ = make_blobs(n_samples=300, centers=3, n_features=5, cluster_std=0.5, random_state=4)
    result = kmq_select(np.zeros(300), 30, embeddings=X, k_candidates=(2, 3, 4), seed=0)
    assert result.k == 3 and result.per_cluster_budget.sum() == 30 and set(result.silhouette) == {2, 3, 4}


def test_iterative_round_budget_sums_exactly():
    assert [iterative_round_budget(9, 3, r) for r in range(3)] == [3, 3, 3]
    assert [iterative_round_budget(10, 3, r) for r in range(3)] == [4, 3, 3]
    assert sum(iterative_round_budget(101, 7, r) for r in range(7)) == 101
    with pytest.raises(ValueError):
        iterative_round_budget(10, 3, 3)


def test_update_cluster_weights_formula_and_negative_scores():
    w = np.array([0.5, 0.25, 0.25])
    # w * s / sum(s) = [0.5*2, 0.25*1, 0.25*1] / 4, renormalized -> [1, .25, .25] / 1.5
    np.testing.assert_allclose(update_cluster_weights(w, [2.0, 1.0, 1.0]), np.array([1, 0.25, 0.25]) / 1.5)
    clipped = update_cluster_weights(w, [-3.0, 1.0, 0.0], floor=1e-6)
    assert clipped[1] > 0.99 and np.all(clipped > 0) and clipped.sum() == pytest.approx(1.0)
    np.testing.assert_allclose(update_cluster_weights(w, [-1.0, -2.0, 0.0]), w)  # all clipped: unchanged
    # an unscored cluster gets the mean score of the others -> neutral
    np.testing.assert_allclose(update_cluster_weights([0.5, 0.5], [1.0, np.nan]), [0.5, 0.5])
    with pytest.raises(ValueError, match="no cluster"):
        update_cluster_weights(w, [np.nan] * 3)


def test_iterative_round_never_reselects():
    labels = np.repeat([0, 1, 2], [10, 5, 5])
    quality = np.zeros(20)
    first = iterative_kmq_round(labels, quality, np.full(3, 1 / 3), 10, [], seed=0)
    np.testing.assert_array_equal(np.bincount(labels[first], minlength=3), [5, 3, 2])
    second = iterative_kmq_round(labels, quality, [0.8, 0.1, 0.1], 10, first, seed=0)
    assert not set(first.tolist()) & set(second.tolist())
    assert np.unique(np.concatenate([first, second])).size == 20


def test_run_iterative_kmq_adds_b_over_n_and_moves_weights():
    labels = np.repeat([0, 1, 2], 40)
    quality = np.random.default_rng(0).standard_normal(120)
    seen = []

    def feedback(selected):
        seen.append(selected.size)
        return np.where(labels[selected] == 2, 3.0, 1.0)  # the model lags most on cluster 2

    picked, records = run_iterative_kmq(labels, quality, 30, 3, feedback, seed=1)
    assert picked.size == 30 and np.unique(picked).size == 30
    assert [r.new_indices.size for r in records] == [10, 10, 10]
    assert seen == [10, 20]  # no feedback after the last round by default
    np.testing.assert_allclose(records[0].weights, [1 / 3] * 3)
    assert records[1].weights[2] > records[1].weights[0]
    assert records[2].weights[2] > records[1].weights[2]  # weights compound across rounds
    assert records[-1].cluster_scores is None
    np.testing.assert_array_equal(picked, np.concatenate([r.new_indices for r in records]))
    again, _ = run_iterative_kmq(labels, quality, 30, 3, feedback, seed=1)
    np.testing.assert_array_equal(picked, again)


def test_cluster_mean_scores():
    labels = np.array([0, 0, 1, 2])
    means = cluster_mean_scores(labels, np.array([0, 1, 2]), np.array([1.0, 3.0, 5.0]), 3)
    np.testing.assert_allclose(means, [2.0, 5.0, np.nan])
    # unscored (NaN) examples are left out of their cluster's mean
    means = cluster_mean_scores(labels, np.array([0, 1, 2, 3]), np.array([np.nan, 3.0, np.nan, 4.0]), 3)
    np.testing.assert_allclose(means, [3.0, np.nan, 4.0])
    with pytest.raises(ValueError, match="infinite"):
        cluster_mean_scores(labels, np.array([0]), np.array([np.inf]), 3)
