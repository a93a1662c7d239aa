import numpy as np
import pytest

from selection.baselines import (
    cosine_similarity_matrix,
    full_data,
    random_select,
    round_robin_select,
)
from selection.selectors import per_task_less_scores


def test_random_select_seeded_distinct_and_budget_checked():
    a = random_select(100, 10, seed=4)
    np.testing.assert_array_equal(a, random_select(100, 10, seed=4))
    assert np.unique(a).size == 10 and a.min() >= 0 and a.max() < 100
    assert not np.array_equal(a, random_select(100, 10, seed=5))
    assert random_select(100, 0.05, seed=0).size == 5
    with pytest.raises(ValueError, match="exceeds the pool"):
        random_select(10, 11, seed=0)


def test_full_data():
    np.testing.assert_array_equal(full_data(4), [0, 1, 2, 3])
    with pytest.raises(ValueError):
        full_data(0)


def test_round_robin_hand_computed():
    rankings = {"math": [3, 1, 0, 2], "code": [3, 2, 4, 0]}
    # task order code, math: code->3, math->1 (3 taken), code->2, math->0, code->4
    np.testing.assert_array_equal(round_robin_select(rankings, 5), [3, 1, 2, 0, 4])
    np.testing.assert_array_equal(round_robin_select({"only": [2, 0, 1]}, 2), [2, 0])
    # an exhausted task is skipped, the others keep going
    np.testing.assert_array_equal(round_robin_select({"a": [0], "b": [0, 1, 2]}, 3), [0, 1, 2])
    with pytest.raises(ValueError, match="exceeds the 3 distinct"):
        round_robin_select({"a": [0], "b": [0, 1, 2]}, 4)
    with pytest.raises(ValueError):
        round_robin_select({}, 1)


def test_rds_cosine_then_less_aggregation():
    pool = np.array([[1.0, 0.0], [0.0, 2.0], [1.0, 1.0]])
    target = np.array([[2.0, 0.0], [0.0, 1.0], [1.0, 0.0]])
    sims = cosine_similarity_matrix(pool, target, chunk_rows=2)
    r = np.sqrt(0.5)
    np.testing.assert_allclose(sims, [[1, 0, 1], [0, 1, 0], [r, r, r]], atol=1e-6)
    # RDS aggregates the similarities per task like LESS; one subtask: plain mean over target rows
    one = [{"task": "t", "subtask": "a", "val_example_id": str(i)} for i in range(3)]
    np.testing.assert_allclose(per_task_less_scores(sims, one)["t"], [2 / 3, 1 / 3, r], atol=1e-6)
    # subtasks a={0,2}, b={1}: max(mean_a, mean_b)
    two = [{**column, "subtask": subtask} for column, subtask in zip(one, ["a", "b", "a"])]
    np.testing.assert_allclose(per_task_less_scores(sims, two)["t"], [1, 1, r], atol=1e-6)
    with pytest.raises(ValueError, match="zero or non-finite"):
        cosine_similarity_matrix(np.zeros((1, 2)), target)
    with pytest.raises(ValueError, match="equal width"):
        cosine_similarity_matrix(pool, np.ones((1, 3)))
