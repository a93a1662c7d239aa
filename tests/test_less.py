import numpy as np
import pytest

from selection.less import (
    aggregate_target_scores,
    checkpoint_weights,
    influence_scores,
    multi_target_scores,
    resolve_budget,
    top_k,
)
from selection.selectors import ALL_TARGETS, ScoredPool, less_selections


def test_checkpoint_weights_normalize_and_reject_bad_input():
    np.testing.assert_allclose(checkpoint_weights([2e-5, 1e-5, 1e-5]), [0.5, 0.25, 0.25])
    for bad in ([], [1e-5, 0.0], [1e-5, -1e-5], [float("nan")]):
        with pytest.raises(ValueError):
            checkpoint_weights(bad)


def _unit(x):
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _fp16_memmap(path, array):
    mm = np.lib.format.open_memmap(path, mode="w+", dtype=np.float16, shape=array.shape)
    mm[:] = array
    mm.flush()
    return np.load(path, mmap_mode="r")


def test_influence_scores_match_dense_weighted_cosine(tmp_path):
    rng = np.random.default_rng(0)
    n_train, n_val, dims = 37, 5, (16, 24)
    weights = checkpoint_weights([3.0, 1.0])
    trains, vals = [], []
    for c, d in enumerate(dims):
        trains.append(_fp16_memmap(tmp_path / f"train{c}.npy", _unit(rng.standard_normal((n_train, d)))))
        vals.append(_unit(rng.standard_normal((n_val, d))).astype(np.float16))
    out = influence_scores(trains, vals, weights, tmp_path / "scores.npy", chunk_rows=8)
    expected = sum(
        w * _unit(tr.astype(np.float64)) @ _unit(va.astype(np.float64)).T for w, tr, va in zip(weights, trains, vals)
    )
    assert out.shape == (n_train, n_val) and out.dtype == np.float32
    np.testing.assert_allclose(out, expected, atol=1e-5)
    np.testing.assert_allclose(np.load(tmp_path / "scores.npy"), expected, atol=1e-5)


def test_influence_scores_renormalizes_and_writes_into_given_array():
    train = np.array([[3.0, 4.0], [0.0, 2.0]], dtype=np.float16)  # not unit length
    val = np.array([[1.0, 0.0]], dtype=np.float16)
    out = np.zeros((2, 1), dtype=np.float32)
    influence_scores([train], [val], [1.0], out, chunk_rows=1)
    np.testing.assert_allclose(out[:, 0], [0.6, 0.0], atol=1e-6)


def test_influence_scores_rejects_zero_rows_and_mismatches():
    val = np.ones((2, 3), dtype=np.float16)
    train = np.ones((4, 3), dtype=np.float16)
    zero_row = train.copy()
    zero_row[2] = 0
    with pytest.raises(ValueError, match=r"first rows \[2\]"):
        influence_scores([zero_row], [val], [1.0], np.zeros((4, 2), np.float32), chunk_rows=2)
    with pytest.raises(ValueError, match="zero or non-finite"):
        influence_scores([train], [np.zeros((2, 3), np.float16)], [1.0], np.zeros((4, 2), np.float32))
    with pytest.raises(ValueError, match="one per checkpoint"):
        influence_scores([train], [val], [0.5, 0.5], np.zeros((4, 2), np.float32))
    with pytest.raises(ValueError, match="dim"):
        influence_scores([train], [np.ones((2, 5), np.float16)], [1.0], np.zeros((4, 2), np.float32))
    with pytest.raises(ValueError, match="shape"):
        influence_scores([train], [val], [1.0], np.zeros((3, 2), np.float32))


def test_aggregate_mean_per_subtask_then_max():
    scores = np.array(
        [
            [1.0, 3.0, 0.0, 0.0, 9.0],
            [2.0, 2.0, 4.0, 0.0, -9.0],
        ]
    )
    # subtasks: a -> cols 0,1 ; b -> cols 2,3 ; c -> col 4 (labels need not be contiguous)
    labels = ["a", "a", "b", "b", "c"]
    np.testing.assert_allclose(aggregate_target_scores(scores, labels), [9.0, 2.0])
    interleaved = ["a", "b", "a", "b", "a"]  # a: 1,0,9 -> 10/3 ; b: 3,0 -> 1.5 | a: 2,4,-9 -> -1 ; b: 1
    np.testing.assert_allclose(aggregate_target_scores(scores, interleaved), [10 / 3, 1.0])


def test_aggregate_single_subtask_and_single_column():
    scores = np.array([[1.0, 2.0, 6.0], [0.0, 0.0, 3.0]])
    np.testing.assert_allclose(aggregate_target_scores(scores, ["t"] * 3), [3.0, 1.0])
    np.testing.assert_allclose(aggregate_target_scores(scores[:, :1], [0]), [1.0, 0.0])


def test_aggregate_many_subtasks_uses_labels_not_a_fixed_count():
    rng = np.random.default_rng(1)
    scores = rng.standard_normal((50, 60))
    labels = np.repeat(np.arange(20), 3)  # 20 subtasks
    expected = scores.reshape(50, 20, 3).mean(axis=2).max(axis=1)
    np.testing.assert_allclose(aggregate_target_scores(scores, labels, chunk_rows=7), expected)


def test_aggregate_validates_shapes():
    with pytest.raises(ValueError, match="3 labels"):
        aggregate_target_scores(np.zeros((2, 2)), ["a", "b", "c"])
    with pytest.raises(ValueError, match="2-D"):
        aggregate_target_scores(np.zeros(3), ["a"] * 3)
    with pytest.raises(ValueError, match="NaN"):
        aggregate_target_scores(np.array([[np.nan]]), ["a"])


def test_resolve_budget_counts_and_fractions():
    assert resolve_budget(5, 10) == 5
    assert resolve_budget(np.int64(10), 10) == 10
    assert resolve_budget(0.05, 270_000) == 13_500
    assert resolve_budget(0.29, 100) == 29  # 0.29 * 100 == 28.999... in floating point
    assert resolve_budget(1.0, 7) == 7
    for bad, match in [
        (11, "exceeds the pool"),
        (0, "positive"),
        (-1, "positive"),
        (1.5, r"\(0, 1\]"),
        (0.0, r"\(0, 1\]"),
        (0.01, "selects no examples"),
        (True, "count or a fraction"),
    ]:
        with pytest.raises(ValueError, match=match):
            resolve_budget(bad, 10)


def test_top_k_descending_ties_to_lowest_index():
    scores = np.array([0.5, 0.9, 0.5, 0.9, 0.1])
    np.testing.assert_array_equal(top_k(scores, 4), [1, 3, 0, 2])
    np.testing.assert_array_equal(top_k(scores, 0.4), [1, 3])
    with pytest.raises(ValueError, match="exceeds the pool"):
        top_k(scores, 6)


def test_multi_target_takes_max_over_tasks():
    per_task = {"math": np.array([0.1, 0.8, 0.3]), "code": np.array([0.7, 0.2, 0.3])}
    scores, task = multi_target_scores(per_task)
    np.testing.assert_allclose(scores, [0.7, 0.8, 0.3])
    assert task.tolist() == ["code", "math", "code"]  # tie at row 2 -> first task in name order
    # The multi-target selection picks the top of these maxima.
    columns = [{"task": task, "subtask": "s", "val_example_id": task} for task in per_task]
    matrix = np.stack(list(per_task.values()), axis=1)
    (*_, multi) = less_selections(ScoredPool(matrix, columns), 2)
    assert multi.target == ALL_TARGETS
    np.testing.assert_array_equal(multi.indices, [1, 0])
    with pytest.raises(ValueError, match="differ in shape"):
        multi_target_scores({"a": np.zeros(2), "b": np.zeros(3)})
