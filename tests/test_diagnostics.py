"""Feature diagnostics: collapsed gradient features are flagged, isotropic ones are not."""

from __future__ import annotations

import duckdb
import numpy as np
import pytest

from selection.influence.diagnostics import COLLAPSE_MEAN_NORM, collapsed_feature_reason, feature_diagnostics
from selection.influence.influence_store import FeatureKey, ensure_store_table, record_diagnostics


def unit(rows: np.ndarray) -> np.ndarray:
    return (rows / np.linalg.norm(rows, axis=1, keepdims=True)).astype(np.float16)


def collapsed_features(n: int = 800, dim: int = 256, noise: float = 0.7, seed: int = 0) -> np.ndarray:
    """Every row = one shared direction plus small isotropic noise (as stored: unit fp16)."""
    rng = np.random.default_rng(seed)
    shared = rng.standard_normal(dim)
    shared /= np.linalg.norm(shared)
    return unit(shared + noise * rng.standard_normal((n, dim)) / np.sqrt(dim))


def test_collapsed_features_trip_the_flag():
    result = feature_diagnostics(collapsed_features())
    assert result.collapsed and result.mean_feature_norm > 0.8 and result.mean_pairwise_cosine > 0.6
    assert result.n_rows == 800 and result.n_sampled == 512 and result.dim == 256
    assert f"mean-feature norm {result.mean_feature_norm:.2f} over 800 rows" in result.describe()


def test_isotropic_features_do_not():
    rows = unit(np.random.default_rng(1).standard_normal((800, 256)))
    result = feature_diagnostics(rows)
    assert not result.collapsed
    assert result.mean_feature_norm == pytest.approx(1 / np.sqrt(800), rel=0.2)
    assert abs(result.mean_pairwise_cosine) < 0.01
    assert result.saturated_share < 0.05


def test_blocks_give_the_same_numbers_as_the_whole_matrix():
    rows = collapsed_features(n=700, seed=3)
    whole = feature_diagnostics(rows, sample_size=100, seed=5)
    blocks = feature_diagnostics([rows[:250], rows[250:251], rows[251:]], sample_size=100, seed=5)
    assert blocks == whole
    # The pairwise mean matches an explicit computation on the same rows when all are sampled.
    small = rows[:40].astype(np.float32)
    small /= np.linalg.norm(small, axis=1, keepdims=True)
    gram = small @ small.T
    explicit = (gram.sum() - np.trace(gram)) / (40 * 39)
    assert feature_diagnostics(rows[:40], sample_size=64).mean_pairwise_cosine == pytest.approx(explicit, abs=1e-5)


def test_few_rows_are_not_judged_and_sign_like_rows_are_saturated():
    few = unit(np.random.default_rng(2).standard_normal((3, 64)))
    result = feature_diagnostics(few)
    assert result.mean_feature_norm > COLLAPSE_MEAN_NORM - 0.2 and not result.collapsed  # 3 rows: too few to judge
    signs = unit(np.sign(np.random.default_rng(4).standard_normal((50, 64))))
    assert feature_diagnostics(signs).saturated_share == 1.0
    empty = feature_diagnostics(np.zeros((0, 8), np.float16))
    assert empty.n_rows == 0 and empty.mean_feature_norm is None and not empty.collapsed
    with pytest.raises(ValueError, match="differ in dim"):
        feature_diagnostics([np.zeros((2, 4)), np.zeros((2, 5))])


def _row(store_id: str, kind: str, epoch: int, collapsed: bool, part: str | None = None) -> dict:
    return {
        "store_id": store_id,
        "model": "m",
        "kind": kind,
        "warmup_run_key": "run",
        "epoch": epoch,
        "part": part,
        "mode": "fast",
        "dim": 64,
        "seed": 0,
        "warmup_steps": 3,
        "n_rows": 100,
        "mean_feature_norm": 0.83 if collapsed else 0.1,
        "mean_pairwise_cosine": 0.69 if collapsed else 0.0,
        "saturated_share": 0.0,
        "collapsed": collapsed,
    }


def _key(dim: int = 64, loss_tokens: str = "response") -> FeatureKey:
    return FeatureKey(mode="fast", dim=dim, seed=0, train_transform="adam", loss_tokens=loss_tokens)


def test_selections_learn_whether_their_features_collapsed():
    con = duckdb.connect()
    assert collapsed_feature_reason(con, "m", "run", _key())[0] is None
    record_diagnostics(
        con,
        [
            _row("a", "train", 1, False, "00-of-02"),
            _row("b", "train", 1, False, "01-of-02"),
            _row("t", "target", 1, False),
        ],
    )
    informative, reason = collapsed_feature_reason(con, "m", "run", _key())
    assert informative is True and "none of 3" in reason
    record_diagnostics(con, [_row("b", "train", 1, True, "01-of-02")])  # the shard was recomputed: replaced
    informative, reason = collapsed_feature_reason(con, "m", "run", _key())
    assert informative is False
    assert "1 of 3 feature sets collapsed" in reason and "train features of epoch 1 shard 01-of-02" in reason
    assert "0.83" in reason and "3 warmup optimizer steps" in reason
    # Scores computed without the pool's common directions are not ranked by the collapsed one.
    informative, reason = collapsed_feature_reason(con, "m", "run", _key(), dropped_directions=8)
    assert informative is True and "1 of 3 feature sets collapsed" in reason and "top 8 directions" in reason
    # A collapsed store of other loss tokens does not speak for these features.
    ensure_store_table(con)
    con.execute(
        "INSERT INTO gradient_stores BY NAME SELECT 'b' AS store_id, 'train' AS kind, 'adam' AS transform, "
        "'sequence' AS loss_tokens"
    )
    assert collapsed_feature_reason(con, "m", "run", _key())[0] is True
    assert collapsed_feature_reason(con, "m", "run", _key(loss_tokens="sequence"))[0] is False
    # Other settings are not affected.
    assert collapsed_feature_reason(con, "m", "run", _key(dim=128))[0] is None


def _scored(collapsed: bool, n_rows: int = 10) -> dict:
    return {
        "epoch": 1,
        "n_rows": n_rows,
        "mean_feature_norm": 0.94 if collapsed else 0.2,
        "mean_pairwise_cosine": 0.9 if collapsed else 0.0,
        "collapsed": collapsed,
    }


def test_collapsed_targets_are_never_informative_whatever_the_train_side() -> None:
    con = duckdb.connect()
    record_diagnostics(con, [_row("a", "train", 1, False, "00-of-01"), _row("t", "target", 1, True)])
    # Clean train features, collapsed targets: removing the pool's directions (fitted on train rows) does
    # not take the targets' shared direction out, so the scores are not informative.
    informative, reason = collapsed_feature_reason(con, "m", "run", _key(), dropped_directions=8)
    assert informative is False and "target features as stored: collapsed" in reason
    assert collapsed_feature_reason(con, "m", "run", _key())[0] is False
    from selection.influence.diagnostics import assess_collapse

    # Measured as scored (after the removal): collapsed there too -> not informative.
    scored = {"target": [_scored(True)], "train": [_scored(False)]}
    result = assess_collapse(con, "m", "run", _key(), 8, scored)
    assert result.informative is False and result.target.collapsed and not result.train.collapsed
    assert "target features as scored (after removing the pool's mean and top 8 directions)" in result.reason
    assert result.metadata()["target_features_collapsed"] is True
    assert result.metadata()["train_features_collapsed"] is False
    # ... while targets clean as scored are informative, whatever they were as stored.
    scored = {"target": [_scored(False)], "train": [_scored(False)]}
    assert assess_collapse(con, "m", "run", _key(), 8, scored).informative is True


def test_collapsed_train_features_with_clean_targets() -> None:
    from selection.influence.diagnostics import assess_collapse

    con = duckdb.connect()
    record_diagnostics(con, [_row("a", "train", 1, True, "00-of-01"), _row("t", "target", 1, False)])
    # Scored as stored (no directions removed): the train collapse ranks the scores.
    result = assess_collapse(con, "m", "run", _key(), 0, {"target": [_scored(False)], "train": []})
    assert result.informative is False and result.train.collapsed and not result.target.collapsed
    assert "train features as stored: collapsed in 1 of 1 stores" in result.reason
    # Directions removed and the train features measured as scored: no longer collapsed.
    scored = {"target": [_scored(False)], "train": [_scored(False, 100)]}
    result = assess_collapse(con, "m", "run", _key(), 8, scored)
    assert result.informative is True and result.train.collapsed is False
    assert "collapsed onto one direction as stored" in result.reason and "top 8 directions" in result.reason
    # ... unless they are still collapsed after the removal.
    scored = {"target": [_scored(False)], "train": [_scored(True, 100)]}
    assert assess_collapse(con, "m", "run", _key(), 8, scored).informative is False


def test_a_small_collapsed_target_set_is_judged() -> None:
    # 10 val rows: the old 16-row minimum left them unjudged.
    assert feature_diagnostics(collapsed_features(n=10, dim=64, seed=7)).collapsed
    assert feature_diagnostics(collapsed_features(n=8, dim=64, seed=7)).collapsed
    # Isotropic rows of the same count are not flagged (|mean|^2 ~ 1/8, half the threshold's square).
    for seed in range(20):
        assert not feature_diagnostics(unit(np.random.default_rng(seed).standard_normal((8, 32)))).collapsed


def test_direction_removal_centres_train_features_but_not_collapsed_targets() -> None:
    from selection.influence import directions

    rng = np.random.default_rng(0)
    train = collapsed_features(n=200, dim=64, noise=0.6, seed=1)
    shared = rng.standard_normal(64)
    val = unit(shared / np.linalg.norm(shared) + 0.6 * rng.standard_normal((10, 64)) / 8)
    assert feature_diagnostics(train).collapsed and feature_diagnostics(val).collapsed
    common = directions.fit(train, 8)
    # The view the scores read (row slices): the train side is centred on its own mean ...
    assert not feature_diagnostics(directions.WithoutDirections(train, common)).collapsed
    # ... the targets, centred on the train mean, stay collapsed.
    assert feature_diagnostics(common.remove(val)).collapsed
