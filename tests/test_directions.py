"""Removing the pool's common directions before the cosine (selection.influence.directions)."""

import numpy as np
import pytest

from selection import less
from selection.influence import directions


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _pool_with_common_direction(seed: int = 0, n: int = 200, dim: int = 64):
    """Every row shares one direction and half the rows a second, "format" one (like an answer
    letter), the pool's largest variance; rows 0-9 also carry the target's own direction. The val
    row has the shared part, one of the formats and the target's direction."""
    rng = np.random.default_rng(seed)
    common, form, target = np.eye(dim)[0], np.eye(dim)[1], np.eye(dim)[2]
    rows = 3.0 * common + 2.0 * rng.choice([-1.0, 1.0], size=(n, 1)) * form + 0.2 * rng.normal(size=(n, dim))
    rows[:10] += 1.5 * target
    val = (3.0 * common + 2.0 * form + 1.5 * target)[None, :]
    return _unit(rows).astype(np.float32), _unit(val).astype(np.float32)


def test_removing_the_common_direction_lets_the_target_rows_rank_first():
    train, val = _pool_with_common_direction()
    plain = (train @ val.T)[:, 0]
    # Plain cosine ranks by the format: fewer than half of the top 10 are the target's rows.
    assert len(set(np.argsort(-plain)[:10]) & set(range(10))) < 5
    common = directions.fit(train, 1)
    cleaned = _unit(common.remove(train)) @ _unit(common.remove(val)).T
    assert set(np.argsort(-cleaned[:, 0])[:10]) == set(range(10))
    # The removed direction is the format's (up to sign), and nothing of it is left.
    assert abs(common.directions[0, 1]) > 0.99
    assert np.allclose(common.remove(train) @ common.directions.T, 0, atol=1e-5)


def test_fit_on_a_sample_agrees_with_the_whole_pool_and_is_deterministic():
    train, _ = _pool_with_common_direction(n=600)
    whole = directions.fit(train, 1, sample_rows=600)
    sampled = directions.fit(train, 1, sample_rows=300, seed=3)
    assert np.array_equal(sampled.directions, directions.fit(train, 1, sample_rows=300, seed=3).directions)
    assert not np.array_equal(sampled.mean, whole.mean)  # it did fit on a sample
    # Same leading direction (up to sign) from half the rows, and from fewer rows than dims (the Gram side).
    assert abs(float(sampled.directions[0] @ whole.directions[0])) > 0.99
    assert abs(float(directions.fit(train[:40], 1).directions[0] @ whole.directions[0])) > 0.99


def test_view_matches_removing_from_the_whole_array():
    train, _ = _pool_with_common_direction()
    common = directions.fit(train, 3)
    view = directions.WithoutDirections(train, common)
    assert view.shape == train.shape and len(view) == len(train)
    assert np.allclose(np.concatenate([view[0:77], view[77:200]]), common.remove(train), atol=1e-6)


def test_influence_with_directions_removed_matches_the_hand_computed_cosine(tmp_path):
    train, val = _pool_with_common_direction()
    common = directions.fit(train, 2)
    view = directions.WithoutDirections(train, common)
    scores = less.influence_scores([view], [common.remove(val)], [1.0], tmp_path / "s.npy", chunk_rows=33)
    expected = _unit(common.remove(train)) @ _unit(common.remove(val)).T
    assert np.allclose(np.asarray(scores), expected, atol=1e-5)


@pytest.mark.parametrize(
    ("count", "message"),
    [(-1, "must be >= 0"), (200, "below the number of train rows"), (64, "feature dim")],
)
def test_bad_counts_are_refused_naming_the_setting(count, message):
    train, _ = _pool_with_common_direction()
    with pytest.raises(ValueError, match=message) as raised:
        directions.fit(train, count)
    assert "dropped_directions" in str(raised.value)


def test_rows_that_span_too_few_directions_are_refused():
    rows = np.tile(np.eye(8)[:2], (10, 1)).astype(np.float32)  # two distinct rows: one direction beyond the mean
    with pytest.raises(ValueError, match="fewer than 3 directions"):
        directions.fit(rows, 3)


def test_why_is_empty_only_for_lesss_plain_cosine():
    assert directions.dropped_why(0) == ""
    assert "top 8 principal directions" in directions.dropped_why(8)


def test_usable_count_is_lowered_for_small_pools_and_refuses_negatives():
    assert directions.usable_count(8, 800, 8192) == 8
    assert directions.usable_count(8, 16, 16) == 4
    assert directions.usable_count(8, 3, 8192) == 0
    with pytest.raises(ValueError, match="dropped_directions must be >= 0"):
        directions.usable_count(-1, 800, 8192)
